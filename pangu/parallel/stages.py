"""Where the network is cut into pipeline stages, and which stages a rank holds: one answer for
both engines and the planner (pure Python: `pangu plan` reads it without torch).

The declared layers (pangu/model/declaration.py) are cut into pp x virtual_stages contiguous stages
the way DeepSpeed's PipelineModule partitions a layer list, so both engines and every checkpoint
see the same cut: `parallel.partition = "parameters"` balances each stage's parameters (on one
tensor-parallel rank), "uniform" the transformer layers. With virtual stages a rank holds several
non-adjacent stages: stage r, r + pp, r + 2 pp, ... (the loop order of interleaved 1F1B and
interleaved zero bubble), or r and 2 pp - 1 - r for ZBV's V shape.
"""

from __future__ import annotations

import math
from functools import lru_cache

from pangu.config import Config, ParallelConfig
from pangu.model import declaration


def num_stages(parallel: ParallelConfig) -> int:
    return parallel.pp * parallel.virtual_stages


def stages_of_rank(parallel: ParallelConfig, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, in the order its schedule lists them."""
    pp, virtual = parallel.pp, parallel.virtual_stages
    if parallel.schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def stage_bounds(config: Config, tp: int, stages: int) -> list[int]:
    """Layer indices where each of `stages` stages starts (stages + 1 numbers)."""
    layers = declaration.layers(config.model)
    if config.parallel.partition == "parameters":
        weights = tuple(sum(math.prod(p.local_shape(tp)) for p in layer.parameters) for layer in layers)
    else:  # the transformer layers, one each
        weights = tuple(int(layer.kind in declaration.TRANSFORMER_KINDS) for layer in layers)
    return list(_cached_partition(weights, stages))


@lru_cache(maxsize=4096)
def _cached_partition(weights: tuple[int, ...], parts: int) -> tuple[int, ...]:
    return tuple(_partition_balanced(list(weights), parts))


def _partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    parts = [p * chunk for p in range(num_parts + 1)]
    for i in range(residual):
        for k in range(i + 1, num_parts + 1):
            parts[k] += 1
    return parts


def _partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_balanced, the same dynamic programme and tie-breaking
    (it minimises max - min of the parts' weights). Only the states the answer can come from are
    computed (the first i items in j parts, j <= i <= n - num_parts + j; a split after k >= j - 1
    items), which leaves the choice at each of them unchanged."""
    n, m = len(weights), num_parts
    if n <= m:
        return _partition_uniform(n, m)
    inf = math.inf
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + float(w)
    # column j: the best split of the first i items into j parts (max, min of the parts, where j - 1 ends)
    col_max, col_min = [inf] * (n + 1), [inf] * (n + 1)
    col_max[0] = 0.0  # (and min inf: DeepSpeed leaves it so)
    position = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        prev_max, prev_min = col_max, col_min
        col_max, col_min = [inf] * (n + 1), [inf] * (n + 1)
        for i in range(j, n - m + j + 1):
            best_cost, best_max, best_min, best_k = inf, inf, inf, 0
            total = prefix[i]
            for k in range(j - 1, i):
                part = total - prefix[k]
                max_sum = prev_max[k] if prev_max[k] > part else part
                min_sum = prev_min[k] if prev_min[k] < part else part
                cost = max_sum - min_sum
                if best_cost >= cost:
                    best_cost, best_max, best_min, best_k = cost, max_sum, min_sum, k
            col_max[i], col_min[i], position[i][j] = best_max, best_min, best_k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    parts.reverse()
    return parts
