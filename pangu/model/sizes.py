"""Sizes of a PanGu-alpha, computed from its config without building anything (and without
importing torch, so that `pangu plan` stays fast): parameters, and training FLOPs per token by
layer kind as the pipeline lays the layers out (pangu.parallel.pipeline)."""

from __future__ import annotations

from pangu.config import ModelConfig


def parameter_count(config: ModelConfig) -> int:
    """Number of parameters (the unpadded vocabulary, as papers count)."""
    h, f = config.hidden_size, config.ffn_size
    si = config.scale_invariant  # no LayerNorm parameters, no output biases, plus the stem
    layernorm = 0 if si else 2 * h
    attention = 4 * h * h + 3 * h + (0 if si else h)
    ffn = h * f + f + f * h + (0 if si else h)
    layer = 2 * layernorm + attention + ffn
    embeddings = config.vocab_size * h + config.seq_length * h  # word (tied head) + position
    query_embedding = config.seq_length * h
    stem = ffn if si else 0
    return embeddings + stem + config.num_layers * layer + query_embedding + layernorm


def forward_flops_per_token(config: ModelConfig, kind: str) -> float:
    """Forward matmul FLOPs per token of one layer of `kind`: weights (2 FLOPs per weight),
    attention scores and context (2 * 2 * seq * h, causal not discounted, as Megatron counts)."""
    h, s, f = config.hidden_size, config.seq_length, config.ffn_size
    if kind in ("block", "query_layer"):
        return 2 * (4 * h * h + 2 * h * f) + 4 * s * h
    if kind == "stem":  # the scale-invariant trunk's W2 ReLU(W1 x)
        return 2 * 2 * h * f
    if kind == "head":
        return 2 * h * config.padded_vocab_size
    return 0.0  # embeddings (lookups) and LayerNorms


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only; num_layers
    counts the query layer."""
    forward = (config.num_layers * forward_flops_per_token(config, "block")
               + forward_flops_per_token(config, "head")
               + (forward_flops_per_token(config, "stem") if config.scale_invariant else 0.0))
    return 3.0 * forward
