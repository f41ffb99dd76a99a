"""Layout-independent initialisation.

Each parameter is drawn as the FULL tensor from its own generator, seeded by (seed, canonical
parameter name), and each tensor-parallel rank keeps its slice. So the initial model is the same
whatever the (dp, tp, pp) layout and whichever layers a pipeline stage builds. The rule of each
parameter (the original PanGu-α initialisation) is declared in layout.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from pangu.config import ModelConfig
from pangu.model import layout


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def initialize_parameters(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    config: ModelConfig,
    seed: int,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Initialise every parameter (canonical names) of this tensor-parallel rank."""
    table = layout.parameter_table(config)
    for name, param in named_parameters:
        spec = table[name]
        full = torch.empty(spec.shape, dtype=torch.float32)
        if spec.init == layout.ONES:
            full.fill_(1.0)
        elif spec.init == layout.ZEROS:
            full.zero_()
        elif spec.init == layout.NORMAL:
            full.normal_(0.0, spec.std, generator=generator_for(seed, name))
        else:  # truncated at two standard deviations, as MindSpore's TruncatedNormal
            std = spec.std
            torch.nn.init.trunc_normal_(full, 0.0, std, -2 * std, 2 * std, generator=generator_for(seed, name))
        if name == layout.WORD_EMBEDDING_WEIGHT:
            full[config.vocab_size :] = 0.0  # padding rows: never looked up, masked out of the logits
        param.copy_(full[spec.local_index(tp_rank, tp_size)])
