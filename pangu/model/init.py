"""Layout-independent initialisation whose cost follows each rank's share.

Every parameter's full tensor, seen as rows x columns (the last dimension is the columns), is cut
into fixed tiles, and each tile is drawn from its own generator, seeded by (seed, canonical
parameter name, tile). A rank draws only the tiles that overlap its tensor-parallel slice and
keeps the overlap: the initial model is the same whatever the (dp, tp, pp) layout and whichever
layers a pipeline stage builds, and no rank draws a full tensor it holds a slice of. The tiles
depend only on the full shape: TILE_COLUMNS columns (a divisor of every tensor-parallel slice of
the PanGu-α sizes, so slices cut no tile) and about TILE_ELEMENTS elements. A resumed run skips
drawing altogether (`zero_parameters`): the checkpoint overwrites every weight. The rule of each
parameter (the original PanGu-α initialisation) is declared in declaration.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from pangu.config import ModelConfig
from pangu.model import declaration

TILE_COLUMNS = 1024
TILE_ELEMENTS = 1 << 20


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def tile_shape(rows: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of the tiles of a rows x columns tensor."""
    width = min(columns, TILE_COLUMNS)
    return max(1, min(rows, TILE_ELEMENTS // width)), width


def _draw_tile(tile: torch.Tensor, spec: declaration.Parameter, generator: torch.Generator) -> None:
    if spec.init == declaration.NORMAL:
        tile.normal_(0.0, spec.std, generator=generator)
    else:  # truncated at two standard deviations, as MindSpore's TruncatedNormal
        std = spec.std
        torch.nn.init.trunc_normal_(tile, 0.0, std, -2 * std, 2 * std, generator=generator)


def draw(spec: declaration.Parameter, box: tuple[tuple[int, int], ...], seed: int) -> torch.Tensor:
    """The region `box` ([start, stop) per dimension) of parameter `spec`'s initial value (fp32)."""
    shape = tuple(stop - start for start, stop in box)
    if spec.init == declaration.ONES:
        return torch.ones(shape)
    if spec.init == declaration.ZEROS:
        return torch.zeros(shape)
    if len(spec.shape) > 2:
        raise ValueError(f"{spec.name}: initialisation of {len(spec.shape)}-dimensional tensors is not declared")
    rows, columns = (1, spec.shape[0]) if len(spec.shape) == 1 else spec.shape
    (r0, r1), (c0, c1) = ((0, 1), box[0]) if len(spec.shape) == 1 else box
    height, width = tile_shape(rows, columns)
    out = torch.empty(r1 - r0, c1 - c0)
    for i in range(r0 // height, (r1 - 1) // height + 1):
        for j in range(c0 // width, (c1 - 1) // width + 1):
            t0, t1 = i * height, min(rows, (i + 1) * height)
            u0, u1 = j * width, min(columns, (j + 1) * width)
            tile = torch.empty(t1 - t0, u1 - u0)  # contiguous: torch draws differently otherwise
            _draw_tile(tile, spec, generator_for(seed, f"{spec.name}#{i}.{j}"))
            a0, a1, b0, b1 = max(r0, t0), min(r1, t1), max(c0, u0), min(c1, u1)
            out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = tile[a0 - t0 : a1 - t0, b0 - u0 : b1 - u0]
    return out.reshape(shape)


@torch.no_grad()
def initialize_parameters(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    config: ModelConfig,
    seed: int,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Initialise every parameter (canonical names) of this tensor-parallel rank: only its slice
    is drawn."""
    table = declaration.parameter_table(config)
    for name, param in named_parameters:
        param.copy_(initial_value(table[name], table[name].local_range(tp_rank, tp_size), config, seed))


def initial_value(spec: declaration.Parameter, box: tuple[tuple[int, int], ...], config: ModelConfig, seed: int):
    """The region `box` of parameter `spec`'s initial value: `draw`, with the word embedding's
    padding rows (never looked up, masked out of the logits) at zero."""
    value = draw(spec, box, seed)
    if spec.name == declaration.WORD_EMBEDDING_WEIGHT:
        value[max(0, config.vocab_size - box[0][0]) :] = 0.0
    return value


@torch.no_grad()
def zero_parameters(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
    """Defined values without drawing, for a model whose weights a checkpoint is about to set."""
    for _, param in named_parameters:
        param.zero_()
