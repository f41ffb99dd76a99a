"""An independent NumPy (float64) forward pass of PanGu-alpha, for tests.

Written only from the model description (docs/reference.md section 1), and
keyed by the ORIGINAL MindSpore parameter names with their stored layouts,
so that comparing it with pangu's torch model also tests the name mapping and
transposes of `pangu.convert.mindspore` rather than sharing them.

Stored layouts (MindSpore): attention.dense1/2/3 weights are [out, in]
(y = x W^T + b); attention.projection, output.mapping and output.projection
weights are [in, out] (y = x W + b). The head is tied to the word embedding.
No dropout. LayerNorm eps 1e-5.

Attention mask semantics: `attention_mask[b, i, j]` is 1 where position i may
attend to position j, 0 elsewhere, applied ADDITIVELY as
`scores + (1 - mask) * -10000` (not -inf), after scaling by 1/sqrt(head_dim).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

LAYER_NORM_EPS = 1e-5
MASKED_SCORE = -10000.0

_WORD_EMBEDDING_NAMES = ("backbone.word_embedding.embedding_table", "backbone.embedding.word_embedding.embedding_table")
_POSITION_EMBEDDING_NAMES = (
    "backbone.position_embedding.embedding_table",
    "backbone.embedding.position_embedding.embedding_table",
)


def numpy_pangu_logits(
    ms_params: dict[str, np.ndarray],
    input_ids: np.ndarray,
    position_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    num_heads: int,
    activation: Literal["fast_gelu", "gelu"] = "fast_gelu",
    final_ln: Literal["before", "after"] = "before",
) -> np.ndarray:
    """Logits [batch, seq, vocab] (vocab = rows of the stored word embedding).

    `final_ln="before"`: the final LayerNorm is applied to the output of the
    last ordinary block, before the query layer (the released 2.6B/13B
    models); `"after"`: after the query layer, just before the head.
    """
    params = {name: np.asarray(value, np.float64) for name, value in ms_params.items()}
    word_embedding = _first_present(params, _WORD_EMBEDDING_NAMES)
    position_embedding = _first_present(params, _POSITION_EMBEDDING_NAMES)
    mask = np.asarray(attention_mask, np.float64)

    x = word_embedding[input_ids] + position_embedding[position_ids]
    for block in range(_count_blocks(params)):
        prefix = f"backbone.blocks.{block}."
        normed = _layer_norm(x, params, prefix + "layernorm1")
        x = x + _attention(params, prefix, normed, normed, mask, num_heads)
        x = x + _feed_forward(params, prefix, _layer_norm(x, params, prefix + "layernorm2"), activation)

    if final_ln == "before":
        x = _layer_norm(x, params, "backbone.layernorm")

    # Query layer: the attention query comes from a separate learned table
    # indexed by position (not normalised); keys and values from LN1(x); the
    # residual carries x.
    prefix = "backbone.top_query_layer."
    query_input = params["backbone.top_query_embedding.embedding_table"][position_ids]
    normed = _layer_norm(x, params, prefix + "layernorm1")
    x = x + _attention(params, prefix, query_input, normed, mask, num_heads)
    x = x + _feed_forward(params, prefix, _layer_norm(x, params, prefix + "layernorm2"), activation)

    if final_ln == "after":
        x = _layer_norm(x, params, "backbone.layernorm")
    return x @ word_embedding.T


def _first_present(params: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    for name in names:
        if name in params:
            return params[name]
    raise KeyError(f"none of {names} in the parameters")


def _count_blocks(params: dict[str, np.ndarray]) -> int:
    count = 0
    while f"backbone.blocks.{count}.layernorm1.gamma" in params:
        count += 1
    return count


def _layer_norm(x: np.ndarray, params: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * params[prefix + ".gamma"] + params[prefix + ".beta"]


def _attention(
    params: dict[str, np.ndarray],
    prefix: str,
    query_input: np.ndarray,
    key_value_input: np.ndarray,
    mask: np.ndarray,
    num_heads: int,
) -> np.ndarray:
    def out_in_linear(name: str, x: np.ndarray) -> np.ndarray:
        return x @ params[f"{prefix}attention.{name}.weight"].T + params[f"{prefix}attention.{name}.bias"]

    def split_heads(x: np.ndarray) -> np.ndarray:  # [b, s, h] -> [b, heads, s, d]
        batch, seq, hidden = x.shape
        return x.reshape(batch, seq, num_heads, hidden // num_heads).transpose(0, 2, 1, 3)

    query = split_heads(out_in_linear("dense1", query_input))
    key = split_heads(out_in_linear("dense2", key_value_input))
    value = split_heads(out_in_linear("dense3", key_value_input))
    head_dim = query.shape[-1]

    scores = query @ key.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    scores = scores + (1.0 - mask[:, None, :, :]) * MASKED_SCORE
    scores = scores - scores.max(axis=-1, keepdims=True)
    probabilities = np.exp(scores)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)

    context = probabilities @ value
    batch, _, seq, _ = context.shape
    context = context.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
    # attention.projection is stored [in, out].
    return context @ params[f"{prefix}attention.projection.weight"] + params[f"{prefix}attention.projection.bias"]


def _feed_forward(params: dict[str, np.ndarray], prefix: str, x: np.ndarray, activation: str) -> np.ndarray:
    # output.mapping and output.projection are stored [in, out].
    hidden = x @ params[prefix + "output.mapping.weight"] + params[prefix + "output.mapping.bias"]
    if activation == "fast_gelu":
        hidden = hidden / (1.0 + np.exp(-1.702 * hidden))  # x * sigmoid(1.702 x)
    elif activation == "gelu":
        hidden = 0.5 * hidden * (1.0 + np.vectorize(math.erf)(hidden / math.sqrt(2.0)))
    else:
        raise ValueError(f"activation must be 'fast_gelu' or 'gelu', got {activation!r}")
    return hidden @ params[prefix + "output.projection.weight"] + params[prefix + "output.projection.bias"]


def causal_attention_mask(batch: int, seq: int) -> np.ndarray:
    """[batch, seq, seq] with 1 where key position <= query position."""
    return np.broadcast_to(np.tril(np.ones((seq, seq))), (batch, seq, seq)).copy()


def eod_reset_positions_and_mask(input_ids: np.ndarray, separator_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids and attention mask for packed documents ("EOD reset").

    After each separator token, position ids restart at 0 and attention
    becomes block-diagonal causal: a token attends only to earlier tokens of
    its own document (the separator belongs to the document it ends).
    """
    batch, seq = input_ids.shape
    position_ids = np.zeros((batch, seq), np.int64)
    document = np.zeros((batch, seq), np.int64)
    for row in range(batch):
        current_document = 0
        start = 0
        for position in range(seq):
            document[row, position] = current_document
            position_ids[row, position] = position - start
            if input_ids[row, position] == separator_id:
                current_document += 1
                start = position + 1
    same_document = document[:, :, None] == document[:, None, :]
    return position_ids, causal_attention_mask(batch, seq) * same_document


def random_ms_params(
    num_layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    vocab: int,
    seq: int,
    rng: np.random.Generator,
    names: Literal["release", "mindformers"] = "release",
) -> dict[str, np.ndarray]:
    """float32 parameters of a PanGu-alpha model under MindSpore names and stored layouts.

    `num_layers` counts the query layer (num_layers - 1 ordinary blocks).
    Weights follow the original initialisation scales; biases and LayerNorm
    parameters are drawn around their initial 0 / 1 (as in a trained model)
    so that a swapped bias, gamma or beta changes the output.
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    if names not in ("release", "mindformers"):
        raise ValueError(f"names must be 'release' or 'mindformers', got {names!r}")

    def normal(std: float, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def truncated_normal(std: float, *shape: int) -> np.ndarray:
        values = rng.standard_normal(shape)
        outside = np.abs(values) > 2.0
        while outside.any():  # redraw beyond two standard deviations
            values[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        return (values * std).astype(np.float32)

    output_std = 0.02 / math.sqrt(2 * num_layers)

    def layer(prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}layernorm1.gamma": 1.0 + normal(0.05, hidden),
            f"{prefix}layernorm1.beta": normal(0.02, hidden),
            f"{prefix}attention.dense1.weight": normal(0.01, hidden, hidden),  # [out, in]
            f"{prefix}attention.dense1.bias": normal(0.02, hidden),
            f"{prefix}attention.dense2.weight": normal(0.01, hidden, hidden),
            f"{prefix}attention.dense2.bias": normal(0.02, hidden),
            f"{prefix}attention.dense3.weight": normal(0.01, hidden, hidden),
            f"{prefix}attention.dense3.bias": normal(0.02, hidden),
            f"{prefix}attention.projection.weight": normal(output_std, hidden, hidden),  # [in, out]
            f"{prefix}attention.projection.bias": normal(0.02, hidden),
            f"{prefix}layernorm2.gamma": 1.0 + normal(0.05, hidden),
            f"{prefix}layernorm2.beta": normal(0.02, hidden),
            f"{prefix}output.mapping.weight": normal(0.02, hidden, ffn),  # [in, out]
            f"{prefix}output.mapping.bias": normal(0.02, ffn),
            f"{prefix}output.projection.weight": normal(output_std, ffn, hidden),  # [in, out]
            f"{prefix}output.projection.bias": normal(0.02, hidden),
        }

    embedding_prefix = "backbone.embedding." if names == "mindformers" else "backbone."
    params = {
        f"{embedding_prefix}word_embedding.embedding_table": normal(0.02, vocab, hidden),
        f"{embedding_prefix}position_embedding.embedding_table": truncated_normal(0.02, seq, hidden),
        "backbone.top_query_embedding.embedding_table": truncated_normal(0.02, seq, hidden),
    }
    for block in range(num_layers - 1):
        params.update(layer(f"backbone.blocks.{block}."))
    params.update(layer("backbone.top_query_layer."))
    params["backbone.layernorm.gamma"] = 1.0 + normal(0.05, hidden)
    params["backbone.layernorm.beta"] = normal(0.02, hidden)
    return params
