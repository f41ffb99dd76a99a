"""The PanGu-α network declared once: its layers in order, and every parameter with its canonical
name, full shape, tensor-parallel split, initialisation and optimizer role.

Everything that needs to know the network's structure reads it from here: the model
(pangu_alpha.py builds its modules in this order and the test suite checks that their
parameters match), both engines' pipeline stages (cut between `Layer`s), initialisation, the parameter
count and FLOPs (sizes.py), the optimizer's parameter groups, the planner's memory model,
checkpoint names and slices, and the MindSpore and Hugging Face name maps. It imports no torch,
so `pangu plan` stays fast.

    [word embedding | position embedding | (stem) | block 0 .. block n-2 |
     final LayerNorm, query layer (or query layer, final LayerNorm) | head]

`num_layers` counts the query layer, so there are num_layers - 1 blocks. The head is the word
embedding again (tied weights): it holds no parameter of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from pangu.config import ModelConfig

# Canonical module names: the prefixes of the parameter names in checkpoints.
EMBEDDING = "embedding"
WORD_EMBEDDINGS = "embedding.word_embeddings"
POSITION_EMBEDDINGS = "embedding.position_embeddings"
STEM = "stem"
BLOCKS = "blocks"
FINAL_LAYERNORM = "final_layernorm"
QUERY_LAYER = "query_layer"
WORD_EMBEDDING_WEIGHT = f"{WORD_EMBEDDINGS}.weight"  # shared with the head
POSITION_EMBEDDING_WEIGHT = f"{POSITION_EMBEDDINGS}.weight"
QUERY_EMBEDDING_WEIGHT = f"{QUERY_LAYER}.query_embeddings.weight"

# Kinds of layer, in the pipeline's order.
WORD_EMBEDDING, POSITION_EMBEDDING, STEM_LAYER, BLOCK, FINAL_NORM, QUERY, HEAD = (
    "word_embedding",
    "position_embedding",
    "stem",
    "block",
    "final_layernorm",
    "query_layer",
    "head",
)
TRANSFORMER_KINDS = (BLOCK, QUERY)  # the layers that attention and recomputation concern
TRUNK_KINDS = (STEM_LAYER, BLOCK, FINAL_NORM, QUERY)  # between the embedding and the head

# Initialisation rules (the original code's, see docs/reference.md).
NORMAL, TRUNC_NORMAL, ZEROS, ONES = "normal", "trunc_normal", "zeros", "ones"
QKV_STD = 0.01


def block_name(index: int) -> str:
    return f"{BLOCKS}.{index}"


@dataclass(frozen=True)
class Parameter:
    """One parameter of the whole network (not of a tensor-parallel slice)."""

    name: str  # canonical
    shape: tuple[int, ...]  # of the full tensor
    init: str  # NORMAL | TRUNC_NORMAL | ZEROS | ONES
    std: float = 0.0
    split_dim: int | None = None  # split across the tensor-parallel group along it; None: replicated
    matmul: bool = False  # a weight every token is multiplied with (2 FLOPs per element per token)
    scale_invariant: bool = False  # in the trunk of the scale-invariant variant

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def weight_decay(self) -> bool:
        """The PanGu-α recipe decays matrices only: no LayerNorm parameter, no bias."""
        return len(self.shape) >= 2

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.local_range(0, tp_size))

    def local_range(self, tp_rank: int, tp_size: int) -> tuple[tuple[int, int], ...]:
        """[start, stop) in every dimension of the slice that tensor-parallel rank `tp_rank` holds."""
        ranges = [(0, n) for n in self.shape]
        if self.split_dim is not None and tp_size > 1:
            size = self.shape[self.split_dim] // tp_size
            ranges[self.split_dim] = (tp_rank * size, (tp_rank + 1) * size)
        return tuple(ranges)

    def local_index(self, tp_rank: int, tp_size: int) -> tuple[slice, ...]:
        return tuple(slice(start, stop) for start, stop in self.local_range(tp_rank, tp_size))


@dataclass(frozen=True)
class Layer:
    kind: str
    module: str  # canonical module name, the prefix of its parameters' names
    parameters: tuple[Parameter, ...]
    tied: bool = False  # holds the word embedding (the first layer and the head)


# ---------------------------------------------------------------------------------------------
# The parameters of each kind of layer


def _layernorm(prefix: str, config: ModelConfig) -> list[Parameter]:
    if config.scale_invariant:  # LayerNorm without affine parameters
        return []
    h = config.hidden_size
    return [Parameter(f"{prefix}.weight", (h,), ONES), Parameter(f"{prefix}.bias", (h,), ZEROS)]


def _linear(
    prefix: str, fan_in: int, fan_out: int, *, parallel: str, bias: bool, std: float, trunk: bool
) -> list[Parameter]:
    """torch's [out, in] weight: column-parallel splits the outputs (and the bias), row-parallel
    the inputs (the bias, added after the sum over the group, is replicated)."""
    split = 0 if parallel == "column" else 1
    out = [Parameter(f"{prefix}.weight", (fan_out, fan_in), NORMAL, std, split, matmul=True, scale_invariant=trunk)]
    if bias:
        bias_split = 0 if parallel == "column" else None
        out.append(Parameter(f"{prefix}.bias", (fan_out,), ZEROS, split_dim=bias_split, scale_invariant=trunk))
    return out


def _feed_forward(prefix: str, config: ModelConfig, output_std: float) -> list[Parameter]:
    h, f, si = config.hidden_size, config.ffn_size, config.scale_invariant
    return [
        *_linear(f"{prefix}.dense_h_to_4h", h, f, parallel="column", bias=True, std=config.init_std, trunk=si),
        *_linear(f"{prefix}.dense_4h_to_h", f, h, parallel="row", bias=not si, std=output_std, trunk=si),
    ]


def _transformer_layer(prefix: str, config: ModelConfig) -> list[Parameter]:
    h, si = config.hidden_size, config.scale_invariant
    residual_std = config.init_std / math.sqrt(2.0 * config.num_layers)  # scaled down with depth
    params = _layernorm(f"{prefix}.input_layernorm", config)
    for projection in ("query", "key", "value"):
        params += _linear(f"{prefix}.attention.{projection}", h, h, parallel="column", bias=True, std=QKV_STD, trunk=si)
    params += _linear(f"{prefix}.attention.dense", h, h, parallel="row", bias=not si, std=residual_std, trunk=si)
    params += _layernorm(f"{prefix}.post_attention_layernorm", config)
    params += _feed_forward(f"{prefix}.mlp", config, residual_std)
    return params


def _table(name: str, rows: int, config: ModelConfig, init: str = TRUNC_NORMAL) -> Parameter:
    return Parameter(name, (rows, config.hidden_size), init, config.init_std)


# ---------------------------------------------------------------------------------------------
# The network


@lru_cache(maxsize=64)
def layers(config: ModelConfig) -> tuple[Layer, ...]:
    """The network's layers in the order data flows through them (the pipeline's order)."""
    # vocabulary rows are split across the tensor-parallel group
    word = (replace(_table(WORD_EMBEDDING_WEIGHT, config.padded_vocab_size, config, NORMAL), split_dim=0),)
    out = [
        Layer(WORD_EMBEDDING, WORD_EMBEDDINGS, word, tied=True),
        Layer(POSITION_EMBEDDING, POSITION_EMBEDDINGS, (_table(POSITION_EMBEDDING_WEIGHT, config.seq_length, config),)),
    ]
    if config.scale_invariant:  # h = W2 ReLU(W1 N(e)): its output is not a residual branch
        out.append(Layer(STEM_LAYER, STEM, tuple(_feed_forward(f"{STEM}.mlp", config, config.init_std))))
    for i in range(config.num_layers - 1):
        out.append(Layer(BLOCK, block_name(i), tuple(_transformer_layer(block_name(i), config))))
    final = Layer(FINAL_NORM, FINAL_LAYERNORM, tuple(_layernorm(FINAL_LAYERNORM, config)))
    query_params = _transformer_layer(QUERY_LAYER, config)
    query_params.append(_table(QUERY_EMBEDDING_WEIGHT, config.seq_length, config))  # not normalised, not trunk
    query = Layer(QUERY, QUERY_LAYER, tuple(query_params))
    out += [final, query] if config.final_layernorm == "before" else [query, final]
    out.append(Layer(HEAD, WORD_EMBEDDINGS, word, tied=True))
    return tuple(out)


@lru_cache(maxsize=64)
def parameters(config: ModelConfig) -> tuple[Parameter, ...]:
    """Every parameter once, in the order of the layers (the head's tied weight not repeated)."""
    return tuple(p for layer in layers(config) if layer.kind != HEAD for p in layer.parameters)


@lru_cache(maxsize=64)
def parameter_table(config: ModelConfig) -> dict[str, Parameter]:
    """{canonical name: Parameter}."""
    return {p.name: p for p in parameters(config)}
