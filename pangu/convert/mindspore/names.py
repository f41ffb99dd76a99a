"""MindSpore PanGu-α parameter names and layouts <-> pangu's canonical ones.

The MindSpore side is a table (the names the 2021 release and mindformers use are facts of those
formats); the pangu side is read from the network's declaration, pangu/model/declaration.py: its
canonical names, which parameters a model of a given size has, and their shapes. A MindSpore
name maps to a pangu name and whether the stored matrix is [in, out] (transposed to torch's
[out, in]); `to_pangu_names` applies the map to a stream of arrays, `stored_shape` gives the
shape MindSpore stores a parameter with, and `infer_model_shape` reads the model size off the
stored shapes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypedDict

import numpy as np

from pangu.config import ModelConfig
from pangu.model import declaration

logger = logging.getLogger(__name__)

# Sub-names inside a block (and the query layer): MindSpore name -> (pangu name under
# declaration.block_name(i) or declaration.QUERY_LAYER, whether the stored matrix is [in, out] and must be
# transposed to torch's [out, in]). dense1/2/3 are already stored [out, in]. In layout's order.
BLOCK_PARAMETERS: dict[str, tuple[str, bool]] = {
    "layernorm1.gamma": ("input_layernorm.weight", False),
    "layernorm1.beta": ("input_layernorm.bias", False),
    "attention.dense1.weight": ("attention.query.weight", False),
    "attention.dense1.bias": ("attention.query.bias", False),
    "attention.dense2.weight": ("attention.key.weight", False),
    "attention.dense2.bias": ("attention.key.bias", False),
    "attention.dense3.weight": ("attention.value.weight", False),
    "attention.dense3.bias": ("attention.value.bias", False),
    "attention.projection.weight": ("attention.dense.weight", True),
    "attention.projection.bias": ("attention.dense.bias", False),
    "layernorm2.gamma": ("post_attention_layernorm.weight", False),
    "layernorm2.beta": ("post_attention_layernorm.bias", False),
    "output.mapping.weight": ("mlp.dense_h_to_4h.weight", True),
    "output.mapping.bias": ("mlp.dense_h_to_4h.bias", False),
    "output.projection.weight": ("mlp.dense_4h_to_h.weight", True),
    "output.projection.bias": ("mlp.dense_4h_to_h.bias", False),
}

# The parameters outside the blocks, as the 2021 release names them.
MINDSPORE_WORD_EMBEDDING = "backbone.word_embedding.embedding_table"
MINDSPORE_POSITION_EMBEDDING = "backbone.position_embedding.embedding_table"
MINDSPORE_QUERY_EMBEDDING = "backbone.top_query_embedding.embedding_table"
MINDSPORE_FINAL_LAYERNORM_GAMMA = "backbone.layernorm.gamma"
MINDSPORE_FINAL_LAYERNORM_BETA = "backbone.layernorm.beta"

# The 2021 release and mindformers differ only in where the two input embeddings live:
# (release name, mindformers name).
MINDSPORE_WORD_EMBEDDINGS = (MINDSPORE_WORD_EMBEDDING, "backbone.embedding.word_embedding.embedding_table")
MINDSPORE_POSITION_EMBEDDINGS = (MINDSPORE_POSITION_EMBEDDING, "backbone.embedding.position_embedding.embedding_table")

# MindSpore name -> pangu name of the parameters outside the blocks.
TOP_LEVEL_PARAMETERS: dict[str, str] = {
    **dict.fromkeys(MINDSPORE_WORD_EMBEDDINGS, declaration.WORD_EMBEDDING_WEIGHT),
    **dict.fromkeys(MINDSPORE_POSITION_EMBEDDINGS, declaration.POSITION_EMBEDDING_WEIGHT),
    MINDSPORE_QUERY_EMBEDDING: declaration.QUERY_EMBEDDING_WEIGHT,
    MINDSPORE_FINAL_LAYERNORM_GAMMA: f"{declaration.FINAL_LAYERNORM}.weight",
    MINDSPORE_FINAL_LAYERNORM_BETA: f"{declaration.FINAL_LAYERNORM}.bias",
}

BLOCK_NAME = re.compile(r"backbone\.blocks\.(\d+)\.(.+)")  # groups: the block's index, the sub-name
QUERY_LAYER_PREFIX = "backbone.top_query_layer."


def pangu_name(mindspore_name: str) -> tuple[str, bool] | None:
    """(pangu name, transpose?) of a model parameter; None for a non-model entry.

    Every name under "backbone." is a model parameter and must be known (else `ValueError`); all
    other entries (optimizer moments "adam_m.*", "moments.*", "global_step", "learning_rate",
    "scale_sense", ...) are not part of the model.
    """
    if mindspore_name in TOP_LEVEL_PARAMETERS:
        return TOP_LEVEL_PARAMETERS[mindspore_name], False
    block = BLOCK_NAME.fullmatch(mindspore_name)
    if block and block.group(2) in BLOCK_PARAMETERS:
        sub_name, transpose = BLOCK_PARAMETERS[block.group(2)]
        return f"{declaration.block_name(int(block.group(1)))}.{sub_name}", transpose
    if mindspore_name.startswith(QUERY_LAYER_PREFIX):
        sub = mindspore_name.removeprefix(QUERY_LAYER_PREFIX)
        if sub in BLOCK_PARAMETERS:
            sub_name, transpose = BLOCK_PARAMETERS[sub]
            return f"{declaration.QUERY_LAYER}.{sub_name}", transpose
    if mindspore_name.startswith("backbone."):
        raise ValueError(f"unknown PanGu-alpha parameter {mindspore_name!r}: no pangu equivalent is known")
    return None


def stored_shape(mindspore_name: str, model: ModelConfig) -> tuple[int, ...]:
    """The shape MindSpore stores a parameter of `model` with: pangu's full shape (declaration.py),
    reversed for the matrices stored [in, out]. (The word embedding's rows are pangu's padded
    vocabulary; MindSpore files hold the unpadded or the padded number.)"""
    mapped = pangu_name(mindspore_name)
    if mapped is None:
        raise ValueError(f"{mindspore_name!r} is not a PanGu-alpha model parameter")
    name, transpose = mapped
    parameter = declaration.parameter_table(model).get(name)
    if parameter is None:
        raise ValueError(f"{mindspore_name!r} ({name}) is not a parameter of a {model.num_layers}-layer model")
    return parameter.shape[::-1] if transpose else parameter.shape


def to_pangu_names(
    named_arrays: Iterable[tuple[str, np.ndarray]],
    *,
    padded_vocab_multiple: int = 128,
    ignored: list[str] | None = None,
    model: ModelConfig | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Rename and re-lay-out MindSpore PanGu-alpha parameters into pangu's canonical form.

    Accepts the 2021 release names and the mindformers names. Matrices stored [in, out]
    (attention.projection, output.mapping, output.projection) are transposed to torch's
    [out, in]; LayerNorm gamma/beta become weight/bias; the word embedding gets zero rows up to a
    multiple of `padded_vocab_multiple` (40000 -> 40064; an already padded embedding is left as
    is). Arrays keep their dtype.

    Entries that are not model parameters (optimizer state, step counters, loss scale) are
    skipped; their names are appended to `ignored` when given and their count is logged. An
    unknown name under "backbone." is an error. After the last entry the set of parameters is
    checked against declaration.parameters(model) (without `model`: of a model with blocks 0 to the
    highest one seen): `ValueError` lists what is missing. With `model`, every array's shape must
    also be the one declaration.py declares.
    """
    expected = declaration.parameter_table(model) if model is not None else None
    skipped: list[str] = []
    produced: set[str] = set()
    for mindspore_name, array in named_arrays:
        mapped = pangu_name(mindspore_name)
        if mapped is None:
            skipped.append(mindspore_name)
            continue
        name, transpose = mapped
        if name in produced:
            raise ValueError(f"{mindspore_name!r} maps to {name!r}, which an earlier entry already provided")
        produced.add(name)
        if transpose:
            array = np.ascontiguousarray(array.T)
        if name == declaration.WORD_EMBEDDING_WEIGHT:
            array = pad_rows(array, padded_vocab_multiple)
        if expected is not None:
            if name not in expected:
                raise ValueError(f"{mindspore_name!r} ({name}) is not a parameter of a {model.num_layers}-layer model")
            if tuple(array.shape) != expected[name].shape:
                raise ValueError(
                    f"{mindspore_name!r} gives {name} shape {array.shape}, expected {expected[name].shape}"
                )
        yield name, array

    if skipped:
        logger.info("ignored %d non-model entries, e.g. %s", len(skipped), ", ".join(skipped[:5]))
    if ignored is not None:
        ignored.extend(skipped)
    missing = missing_parameters(produced, model)
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"the checkpoint lacks {len(missing)} PanGu-alpha parameters: {shown}")


def pad_rows(embedding: np.ndarray, multiple: int) -> np.ndarray:
    """`embedding` with zero rows appended up to a multiple of `multiple` (itself if none are needed)."""
    rows = embedding.shape[0]
    padded_rows = -(-rows // multiple) * multiple
    if padded_rows == rows:
        return embedding
    padding = np.zeros((padded_rows - rows, *embedding.shape[1:]), embedding.dtype)
    return np.concatenate([embedding, padding])


def missing_parameters(produced: set[str], model: ModelConfig | None = None) -> list[str]:
    """The pangu names of `model`'s parameters (declaration.py) not in `produced`, sorted. Without
    `model`: those of a model with blocks 0 to the highest index in `produced`."""
    if model is None:
        prefix = f"{declaration.BLOCKS}."
        indices = {int(name.removeprefix(prefix).split(".")[0]) for name in produced if name.startswith(prefix)}
        model = ModelConfig(num_layers=max(indices, default=-1) + 2)  # the blocks and the query layer
    return sorted({p.name for p in declaration.parameters(model)} - produced)


class ModelShape(TypedDict):
    num_layers: int  # ordinary blocks + the query layer, as in PanGu configs
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int  # rows of the stored word embedding (40000, or 40064 from the PyTorch ports)
    seq_length: int


def infer_model_shape(names_to_shapes: Mapping[str, Sequence[int]]) -> ModelShape:
    """Read a PanGu-alpha model's size off its MindSpore-named parameter shapes.

    Every model parameter's shape is checked against the inferred size (the shapes declaration.py
    declares for it), so an inconsistent checkpoint fails here, naming the parameter, before any
    conversion. The number of attention heads is not recorded in the weights and must come from
    the config.
    """
    shapes = {name: tuple(shape) for name, shape in names_to_shapes.items() if pangu_name(name) is not None}
    word = _shape_of_any(shapes, *MINDSPORE_WORD_EMBEDDINGS)
    position = _shape_of_any(shapes, *MINDSPORE_POSITION_EMBEDDINGS)
    mapping = _shape_of_any(shapes, f"{QUERY_LAYER_PREFIX}output.mapping.weight")
    if len(word) != 2 or len(position) != 2 or len(mapping) != 2:
        raise ValueError("the embeddings and output.mapping weights must be matrices")
    vocab_size, hidden_size = word
    seq_length = position[0]
    ffn_hidden_size = mapping[1]  # stored [in, out] = [hidden, ffn]

    block_indices = sorted({int(match.group(1)) for name in shapes if (match := BLOCK_NAME.fullmatch(name))})
    if block_indices != list(range(len(block_indices))):
        raise ValueError(f"block indices are not 0..n-1: {block_indices}")

    model = ModelConfig(
        num_layers=len(block_indices) + 1,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        seq_length=seq_length,
    )
    for name, shape in shapes.items():
        if name in MINDSPORE_WORD_EMBEDDINGS:  # any number of rows
            continue
        expected = stored_shape(name, model)
        if shape != expected:
            raise ValueError(
                f"{name} has shape {shape}, expected {expected} for hidden {hidden_size}, "
                f"ffn {ffn_hidden_size}, seq {seq_length}"
            )
    return ModelShape(
        num_layers=model.num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        vocab_size=vocab_size,
        seq_length=seq_length,
    )


def _shape_of_any(shapes: Mapping[str, tuple[int, ...]], *names: str) -> tuple[int, ...]:
    for name in names:
        if name in shapes:
            return shapes[name]
    raise ValueError(f"the checkpoint has no {' or '.join(names)}")
