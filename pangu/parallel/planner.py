"""Auto-parallel planner: `pangu plan --config CFG --gpus N --gpu-memory 80GiB`.

Enumerates the layouts of N devices -- the engine, (dp, tp, pp), the torch engine's pipeline
schedule, virtual stages and sequence parallelism, recomputation, micro-batch size -- for one
config, estimates each one's per-device memory under what pangu really runs and its step time
under a simple cost model, drops those that do not fit and ranks the rest by step time.

Everything here is arithmetic on the config (no torch, no DeepSpeed import). The memory model
(pangu/parallel/memory_model.py, memory_torch.py) is checked by tests/parallel/test_planner.py
against tensors measured in real CPU runs of both engines (tests/probes/memory_probe.py,
memory_probe_torch.py); docs/planner.md explains the terms and shows plans for the PanGu-alpha
sizes.

Step time (seconds), a deliberately simple model:

    per micro-batch on pipeline rank r (the stages it holds: one, or v with virtual stages):
        compute   = FLOPs of its layers (6 x weights x tokens + attention 12 s h per token per
                    layer, as pangu.model.sizes.flops_per_token counts; + one more forward of
                    every layer with full recomputation, + the attention core's forward with
                    selective) / (tp x peak x efficiency)
        tensor    = 4 ring all-reduces of e T h bytes per layer (2 forward, 2 backward; 6 with
                    full recomputation), 1 for the embedding, 1 for the head. Sequence
                    parallelism replaces each all-reduce by an all-gather and a reduce-scatter:
                    the same bytes on the same ring (a ring all-reduce is a reduce-scatter and
                    an all-gather), so the same time. Ring cost 2 (t-1)/t bytes / bandwidth
                    + 2 (t-1) latency, intra-node bandwidth when tp <= gpus-per-node
        p2p       = 2 v sends of e T h bytes (/ tp with sequence parallelism) when pp > 1
    pipeline      = m x max_r (compute + tensor + p2p) / (1 - bubble), the schedule's bubble
                    (pangu/parallel/schedule_model.py; docs/pipeline.md): 1F1B (p-1)/(m+p-1),
                    interleaved 1F1B (p-1)/(v m+p-1), interleaved zero bubble (p-1)/(3 v m+p-1),
                    ZBV (p-1)/(6 m+p-1) (not zero: the step is synchronous)
    data parallel, DeepSpeed: ring all-reduce of the largest stage's gradients in the
                    communication dtype (bf16 for bf16, else the model dtype), then ZeRO-1's
                    all-gather of the updated parameters, over inter-node bandwidth when the dp
                    group spans nodes; the tied embedding's gradient all-reduce between the first
                    and last stage. The pipeline engine runs them after the last backward: all
                    exposed.
    data parallel, torch (FSDP2, when it shards): each unit's parameters all-gathered in the
                    training dtype at its first forward of the step, its fp32 gradients
                    reduce-scattered after its last backward, both overlapped with compute:
                    exposed are the first unit's all-gather and the last unit's reduce-scatter
                    (a stage's root unit: its embeddings, final LayerNorm), and what of the rest
                    one micro-batch's forward (all-gathers) and backward (reduce-scatters)
                    cannot hide; plus the tied embedding's (sharded) gradient all-reduce.
    step          = pipeline + exposed data parallel
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

from pangu.config import Config, ModelConfig
from pangu.model import declaration
from pangu.model.sizes import flops_per_token, forward_flops_per_token
from pangu.optim import registry
from pangu.parallel.memory_model import (
    Kernels,
    MemoryEstimate,
    dtype_bytes,
    estimate_memory,
    model_pipeline_layers,
    model_stage_cut,
)
from pangu.parallel.memory_torch import rank_stages
from pangu.parallel.schedule_model import bubble_fraction, runs
from pangu.schema import ConfigError

GiB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")
ENGINES = ("torch", "deepspeed")


# ---------------------------------------------------------------------------------------------
# Inputs and results


@dataclass(frozen=True)
class Hardware:
    """The devices and their links. Defaults: an A100-class GPU (dense bf16 peak 312 TFLOP/s),
    NVLink within a node and one 200 Gb/s NIC per GPU between nodes: replace them by measured
    figures (bandwidths are ring all-reduce bus bandwidths per device)."""

    gpus: int
    gpu_memory_bytes: int
    gpus_per_node: int = 8
    tflops: float = 312.0  # peak per device, TFLOP/s, in the training dtype
    efficiency: float = 0.5  # fraction of the peak that the matmuls reach
    bandwidth: float = 150e9  # bytes/s per device within a node
    inter_node_bandwidth: float = 25e9  # bytes/s per device between nodes
    latency: float = 10e-6  # seconds per step of a ring collective
    memory_margin: float = 0.10  # fraction of the device memory kept free (CUDA context, NCCL, fragmentation)

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory_bytes * (1.0 - self.memory_margin)


@dataclass(frozen=True)
class StepTime:
    compute: float  # seconds of the step the slowest rank's compute accounts for, bubble included
    tensor_parallel: float
    pipeline_p2p: float
    data_parallel: float  # exposed (not hidden behind compute)
    data_parallel_hidden: float  # overlapped with compute (torch engine)
    bubble_fraction: float
    total: float
    mfu: float  # model FLOPs (no recomputation) / (devices x peak x total)
    tokens_per_second: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Layout:
    """One way to run a config on dp x tp x pp devices."""

    dp: int
    tp: int
    pp: int
    recompute: str
    micro_batch_size: int
    micro_batches: int
    engine: str = "torch"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    memory: MemoryEstimate | None = field(default=None, compare=False)
    step_time: StepTime | None = field(default=None, compare=False)

    @classmethod
    def of_config(cls, config: Config, gpus: int) -> Layout | None:
        """The layout the config itself describes on `gpus` devices (None: it does not divide them)."""
        parallel, train = config.parallel, config.train
        tp, pp, mbs = parallel.tp, parallel.pp, train.micro_batch_size
        if gpus % (tp * pp) or train.global_batch_size % (gpus // (tp * pp) * mbs):
            return None
        dp = gpus // (tp * pp)
        return cls(
            dp,
            tp,
            pp,
            parallel.recompute,
            mbs,
            train.global_batch_size // (dp * mbs),
            parallel.engine,
            parallel.schedule,
            parallel.virtual_stages,
            parallel.sequence_parallel,
        )

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def overrides(self) -> list[str]:
        """The `--set` values that make a config train with this layout (dp is what the world
        size leaves: world / (tp x pp))."""
        return [
            f"parallel.engine={self.engine}",
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.schedule={self.schedule}",
            f"parallel.virtual_stages={self.virtual_stages}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"parallel.recompute={self.recompute}",
            f"train.micro_batch_size={self.micro_batch_size}",
        ]

    def set_args(self) -> str:
        return "--set " + " ".join(self.overrides())

    def describe(self) -> str:
        """The layout in a few words: engine and parallel sizes, then what differs from the defaults."""
        words = [f"{self.engine}", f"dp={self.dp} tp={self.tp} pp={self.pp}"]
        if self.pp > 1 and self.engine == "torch":
            words.append(self.schedule + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""))
        if self.sequence_parallel:
            words.append("sp")
        words.append(f"recompute={self.recompute} mbs={self.micro_batch_size}")
        return " ".join(words)

    def as_dict(self) -> dict:
        return {
            "engine": self.engine,
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "schedule": self.schedule,
            "virtual_stages": self.virtual_stages,
            "sequence_parallel": self.sequence_parallel,
            "recompute": self.recompute,
            "micro_batch_size": self.micro_batch_size,
            "micro_batches": self.micro_batches,
            "overrides": self.overrides(),
            "memory": self.memory.as_dict() if self.memory else None,
            "step_time": self.step_time.as_dict() if self.step_time else None,
        }


# ---------------------------------------------------------------------------------------------
# Step time


def _ring_allreduce(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def _ring_gather(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """All-gather or reduce-scatter of `nbytes` in total."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


@dataclass(frozen=True)
class _Stage:
    """One pipeline stage's cost per micro-batch: forward FLOPs (recomputation included),
    tensor-parallel all-reduces, and its parameters on one tp rank (FSDP's root unit apart)."""

    forward_flops: float
    backward_flops: float
    collectives: int
    numel: int
    root_numel: int


def _stage_costs(config: Config, layout: Layout) -> tuple[_Stage, ...]:
    return _costs(
        config.model,
        config.parallel.partition,
        registry.get(config.optim.name).scale_invariant_group,
        layout.tp,
        layout.pp * layout.virtual_stages,
        layout.micro_batch_size,
        layout.recompute,
    )


@lru_cache(maxsize=64)
def _flops(model: ModelConfig) -> tuple[tuple[float, ...], float]:
    """(forward FLOPs per token of each declared layer, training FLOPs per token of the model)."""
    return tuple(forward_flops_per_token(model, layer) for layer in declaration.layers(model)), flops_per_token(model)


@lru_cache(maxsize=4096)
def _costs(
    model: ModelConfig,
    partition: str,
    scale_invariant_group: bool,
    tp: int,
    stages: int,
    micro_batch_size: int,
    recompute: str,
) -> tuple[_Stage, ...]:
    T = model.seq_length * micro_batch_size
    declared = declaration.layers(model)
    forward_flops = _flops(model)[0]
    sizes = model_pipeline_layers(model, tp, scale_invariant_group)
    bounds = model_stage_cut(model, partition, tp, stages)
    out = []
    for j in range(stages):
        forward = backward = 0.0
        collectives = numel = root = 0
        tied_seen = False
        for i in range(bounds[j], bounds[j + 1]):
            layer, size, flops = declared[i], sizes[i], forward_flops[i] * T
            forward, backward = forward + flops, backward + 2 * flops
            if layer.kind in ("block", "query_layer", "stem"):
                collectives += 4
                if recompute == "full":
                    backward += flops
                    collectives += 2
                elif recompute == "selective" and layer.kind != "stem":
                    backward += 4 * model.seq_length * model.hidden_size * T
            elif layer.kind in ("word_embedding", "head"):
                collectives += 1
            if size.tied and tied_seen:
                continue
            tied_seen = tied_seen or size.tied
            numel += size.numel
            root += 0 if layer.kind in declaration.TRANSFORMER_KINDS else size.numel
        out.append(_Stage(forward, backward, collectives, numel, root))
    return tuple(out)


def estimate_step_time(config: Config, layout: Layout, hardware: Hardware) -> StepTime:
    """Seconds per optimizer step (see the module docstring for the model)."""
    model, precision = config.model, config.train.precision
    e = dtype_bytes(precision)
    dp, tp, pp, v, m = layout.dp, layout.tp, layout.pp, layout.virtual_stages, layout.micro_batches
    G = hardware.gpus_per_node
    T = model.seq_length * layout.micro_batch_size
    peak = hardware.tflops * 1e12 * hardware.efficiency
    tp_bw = hardware.bandwidth if tp <= G else hardware.inter_node_bandwidth
    hidden_bytes = e * T * model.hidden_size
    allreduce = _ring_allreduce(hidden_bytes, tp, tp_bw, hardware.latency)
    costs = _stage_costs(config, layout)
    ranks = [[costs[j] for j in rank_stages(layout.schedule, pp, v, r)] for r in range(pp)]

    def rank_time(held: list[_Stage]) -> tuple[float, float]:
        return (
            sum(c.forward_flops + c.backward_flops for c in held) / tp / peak,
            sum(c.collectives for c in held) * allreduce,
        )

    times = [rank_time(held) for held in ranks]
    slowest = max(range(pp), key=lambda r: sum(times[r]))
    compute, tensor = times[slowest]
    p2p = 0.0
    if pp > 1:
        pp_bw = hardware.bandwidth if dp * tp * pp <= G else hardware.inter_node_bandwidth
        sent = hidden_bytes // (tp if layout.sequence_parallel and tp > 1 else 1)
        p2p = 2 * v * (sent / pp_bw + hardware.latency)
    if layout.engine == "torch":
        bubble = bubble_fraction(layout.schedule, pp, v, m)
    else:
        bubble = (pp - 1) / (m + pp - 1)
    stretch = m / (1 - bubble)  # micro-batch times a step lasts on the slowest rank

    dp_bw = hardware.bandwidth if dp * tp <= G else hardware.inter_node_bandwidth
    if layout.engine == "torch":
        exposed, hidden = _fsdp_time(config, layout, hardware, ranks, peak, dp_bw)
    else:
        exposed, hidden = _zero1_time(config, layout, hardware, costs, dp_bw), 0.0
    total = stretch * (compute + tensor + p2p) + exposed
    tokens = config.train.global_batch_size * model.seq_length
    mfu = tokens * _flops(model)[1] / (layout.gpus * hardware.tflops * 1e12 * total)
    return StepTime(
        compute=stretch * compute,
        tensor_parallel=stretch * tensor,
        pipeline_p2p=stretch * p2p,
        data_parallel=exposed,
        data_parallel_hidden=hidden,
        bubble_fraction=bubble,
        total=total,
        mfu=mfu,
        tokens_per_second=tokens / total,
    )


def _tied_embedding(config: Config, layout: Layout, hardware: Hardware, shards: int) -> float:
    """The all-reduce of the word embedding's gradient between its two copies (first and last
    stage) when different ranks hold them, each its 1/shards."""
    last = layout.pp * layout.virtual_stages - 1
    if layout.pp == 1 or last in rank_stages(layout.schedule, layout.pp, layout.virtual_stages, 0):
        return 0.0
    word = config.model.padded_vocab_size * config.model.hidden_size // layout.tp
    return _ring_allreduce(4 * word / shards, 2, hardware.inter_node_bandwidth, hardware.latency)


def _zero1_time(config: Config, layout: Layout, hardware: Hardware, costs: list[_Stage], dp_bw: float) -> float:
    """DeepSpeed: the gradient reduction and ZeRO-1's parameter all-gather after the last backward."""
    dp, precision = layout.dp, config.train.precision
    numel = max(c.numel for c in costs)
    comm_bytes = 2 if precision in ("bf16", "fp16") else 4
    if precision == "bf16":  # BF16_Optimizer: all-reduce of the whole buffer
        reduction = _ring_allreduce(comm_bytes * numel, dp, dp_bw, hardware.latency)
    else:  # DeepSpeedZeroOptimizer stage 1: each partition reduced to its owner
        reduction = _ring_gather(comm_bytes * numel, dp, dp_bw, hardware.latency)
    gather = _ring_gather(dtype_bytes(precision) * numel, dp, dp_bw, hardware.latency)
    return reduction + gather + _tied_embedding(config, layout, hardware, 1)


def _fsdp_time(
    config: Config, layout: Layout, hardware: Hardware, ranks: list[list[_Stage]], peak: float, dp_bw: float
) -> tuple[float, float]:
    """Torch engine: (exposed, hidden) seconds of FSDP2's all-gathers and reduce-scatters, the
    most loaded rank's (module docstring)."""
    dp, tp, e = layout.dp, layout.tp, dtype_bytes(config.train.precision)
    sharded = dp > 1 or config.train.precision != "fp32"
    if not sharded or dp == 1:
        return _tied_embedding(config, layout, hardware, 1), 0.0
    worst = (0.0, 0.0)
    for held in ranks:
        numel = sum(c.numel for c in held)
        root = held[0].root_numel
        forward = sum(c.forward_flops for c in held) / tp / peak
        backward = sum(c.backward_flops for c in held) / tp / peak
        gather = [_ring_gather(e * n, dp, dp_bw, hardware.latency) for n in (root, numel - root)]
        scatter = [_ring_gather(4 * n, dp, dp_bw, hardware.latency) for n in (root, numel - root)]
        exposed = gather[0] + scatter[0] + max(0.0, gather[1] - forward) + max(0.0, scatter[1] - backward)
        hidden = sum(gather) + sum(scatter) - exposed
        worst = max(worst, (exposed, hidden))
    return worst[0] + _tied_embedding(config, layout, hardware, dp), worst[1]


# ---------------------------------------------------------------------------------------------
# Enumeration and ranking


def _divisors(n: int, limit: int) -> list[int]:
    """The divisors of n up to `limit`, in O(limit) whatever n is (a device count may be huge or
    prime; the limits are the model's heads and layers and the global batch)."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


VIRTUAL_STAGES = (2, 4)  # stages per rank of the interleaved schedules: beyond, little bubble for more p2p and memory


def _pipelines(config: Config, pp: int, micro_batches: int) -> list[tuple[str, str, int]]:
    """(engine, schedule, virtual stages) that can run `micro_batches` through `pp` ranks: DeepSpeed's
    1F1B, and the torch engine's schedules (the interleaved ones with VIRTUAL_STAGES stages per
    rank, ZBV with 2)."""
    out = [("deepspeed", "1f1b", 1)]
    if pp == 1:
        return out + [("torch", "1f1b", 1)]
    candidates = [("torch", "1f1b", 1), ("torch", "zbv", 2)]
    for v in VIRTUAL_STAGES:
        candidates += [("torch", "interleaved_1f1b", v), ("torch", "zero_bubble", v)]
    layers = config.model.num_layers
    for engine, schedule, v in candidates:
        if pp * v <= layers and runs(schedule, pp, v, micro_batches):
            out.append((engine, schedule, v))
    return out


def enumerate_layouts(
    config: Config, gpus: int, recompute: tuple[str, ...] = RECOMPUTE_MODES, engines: tuple[str, ...] = ENGINES
) -> list[Layout]:
    """Every layout of `gpus` devices that pangu can run with this config's model and global batch:
    dp x tp x pp = gpus; tp divides the heads, the FFN size and the padded vocabulary; the
    pipeline's stages at most num_layers; dp x micro_batch_size x micro_batches =
    train.global_batch_size; each engine's schedules (`_pipelines`). The torch engine runs
    sequence parallelism wherever tp > 1 divides the sequence: it moves the same bytes in the
    same time (module docstring) and keeps less, so a layout without it never ranks first."""
    model, batch = config.model, config.train.global_batch_size
    layouts = []
    for tp in _divisors(gpus, model.num_heads):
        if model.num_heads % tp or model.ffn_size % tp or model.padded_vocab_size % tp:
            continue
        sequence_parallel = tp > 1 and model.seq_length % tp == 0
        for pp in _divisors(gpus // tp, model.num_layers):
            dp = gpus // (tp * pp)
            if batch % dp:
                continue
            for mbs in _divisors(batch // dp, batch):
                m = batch // (dp * mbs)
                for engine, schedule, v in _pipelines(config, pp, m):
                    if engine not in engines:
                        continue
                    # the zero-bubble schedules cannot split a sequence-parallel stage's backward
                    # (torch 2.13 detaches its output, a view, in place)
                    sp = sequence_parallel and engine == "torch" and schedule not in ("zero_bubble", "zbv")
                    for mode in recompute:
                        layouts.append(Layout(dp, tp, pp, mode, mbs, m, engine, schedule, v, sp))
    return layouts


def plan(config: Config, hardware: Hardware, kernels: Kernels = Kernels(), limit: int | None = None) -> list[Layout]:
    """The layouts of `hardware.gpus` devices that fit in their usable memory, fastest first
    (ties: less memory), each with its memory and step-time estimate; with `limit`, the fastest
    `limit` of them. Memory is estimated in order of step time, so that a short list costs only
    the layouts faster than its last."""
    if hardware.gpus < 1:
        raise ConfigError(f"--gpus = {hardware.gpus} is not allowed: expected >= 1")
    timed = [
        dataclasses.replace(layout, step_time=estimate_step_time(config, layout, hardware))
        for layout in enumerate_layouts(config, hardware.gpus)
    ]
    timed.sort(key=lambda lay: (round(lay.step_time.total, 9), lay.tp, lay.pp, lay.engine))
    fitting: list[Layout] = []
    start = 0
    while start < len(timed) and (limit is None or len(fitting) < limit):
        # the layouts as fast as the next one, the least memory first
        end = start + 1
        while end < len(timed) and round(timed[end].step_time.total, 9) == round(timed[start].step_time.total, 9):
            end += 1
        tied = [dataclasses.replace(lay, memory=estimate_memory(config, lay, kernels)) for lay in timed[start:end]]
        tied.sort(key=lambda lay: lay.memory.peak)
        fitting += [lay for lay in tied if lay.memory.peak <= hardware.usable_memory]
        start = end
    return fitting if limit is None else fitting[:limit]


def smallest_memory(config: Config, gpus: int, kernels: Kernels = Kernels()) -> Layout | None:
    """The layout needing the least memory (to say how far from fitting a plan is): one with full
    recomputation, which keeps less than the others at the same sizes."""
    best = None
    for layout in enumerate_layouts(config, gpus, recompute=("full",)):
        memory = estimate_memory(config, layout, kernels)
        if best is None or memory.peak < best.memory.peak:
            best = dataclasses.replace(layout, memory=memory)
    return best
