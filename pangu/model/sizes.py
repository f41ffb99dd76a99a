"""Sizes of a PanGu-alpha, computed from its declaration (declaration.py) without building anything
(and without importing torch, so that `pangu plan` stays fast): parameters, and training FLOPs
per token by layer."""

from __future__ import annotations

from pangu.config import ModelConfig
from pangu.model import declaration


def parameter_count(config: ModelConfig) -> int:
    """Number of parameters (the unpadded vocabulary, as papers count)."""
    padding = (config.padded_vocab_size - config.vocab_size) * config.hidden_size
    return sum(p.numel for p in declaration.parameters(config)) - padding


def forward_flops_per_token(config: ModelConfig, layer: declaration.Layer) -> float:
    """Forward matmul FLOPs per token of one layer: 2 per weight element a token is multiplied
    with (the head multiplies with the whole tied word embedding), plus attention scores and
    context (2 * 2 * seq * h, causal not discounted, as Megatron counts)."""
    if layer.kind == declaration.HEAD:
        return 2.0 * sum(p.numel for p in layer.parameters)
    flops = 2.0 * sum(p.numel for p in layer.parameters if p.matmul)
    if layer.kind in declaration.TRANSFORMER_KINDS:
        flops += 4 * config.seq_length * config.hidden_size
    return flops


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only."""
    return 3.0 * sum(forward_flops_per_token(config, layer) for layer in declaration.layers(config))
