"""The PanGu-α network (Zeng et al. 2021): a GPT decoder plus a top "query layer".

    h = dropout(word_emb[ids] + pos_emb[positions])
    for each of the num_layers - 1 blocks (pre-LayerNorm):
        h = h + dropout(Attention(LN1(h)))
        h = h + dropout(FFN(LN2(h)))
    h = LN_final(h)                      # "before" the query layer (released 2.6B/13B); option "after"
    query layer: a block whose attention query comes from a learned, position-indexed
                 query embedding instead of the hidden state:
        q = top_query_emb[positions]
        h = h + dropout(Wo softmax(Wq q . (Wk LN1(h))^T / sqrt(d) + mask) (Wv LN1(h)))
        h = h + dropout(FFN(LN2(h)))
    logits = h @ word_emb^T              # head tied to the word embedding, no bias

`num_layers` counts the query layer. Masked attention scores get -10000 in the original; exp of
that underflows to exactly 0 in fp32, so a boolean mask through scaled_dot_product_attention
(flash kernels on GPU) computes the same thing.

`model.scale_invariant: true` builds the scale-invariant variant of the SIBERT recipe (Li et al.
2022), for training the trunk with plain SGD: the logits do not change when every trunk weight
is multiplied by c. The residual stream must then be homogeneous of degree 2 in the trunk:

    e  = word_emb[ids] + pos_emb[positions]         (not trunk: degree 0)
    h  = W2 ReLU(W1 N(e))                            the stem: degree 2
    h  = h + Wo A V,  A = N_row(ReLU(Q K^T))         Q, K, V of N(h) (degree 1); no bias on Wo
    h  = h + W_down ReLU(W_up N(h))                   no bias on W_down
    query layer likewise (Q from the query embedding), then logits = N(h) @ word_emb^T
N is LayerNorm without affine parameters and N_row divides each row by its sum; their eps is
tiny (1e-30, only guarding all-zero rows) or invariance fails at small scales.

The layers that tensor parallelism splits (Q/K/V and FFN-up column-parallel, attention-output
and FFN-down row-parallel, the vocabulary-parallel word embedding) come from a `LayerFactory`
(factory.py): plain torch layers by default, megatron-core's under pangu.parallel. The order of
the layers and every parameter's name and shape are declared in layout.py; the modules here are
built in that order, and each trunk layer takes (x, mask, position_ids, kv_cache) so that this
model and the pipeline (pangu/parallel/pipeline.py) run them the same way.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pangu.config import ModelConfig
from pangu.model import layout
from pangu.model.factory import PLAIN, LayerFactory


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    """The activation of the released MindSpore code (Ascend's FastGelu)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"fast_gelu": fast_gelu, "gelu": F.gelu, "relu": F.relu}
SCALE_INVARIANT_EPS = 1e-30  # only guards all-zero rows: any larger eps breaks invariance at small scales


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for numerically sensitive ops; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the hidden size, computed in fp32 whatever the parameter dtype, as in the
    original; without affine parameters (and with a tiny eps) in the scale-invariant variant."""

    def __init__(self, config: ModelConfig):
        if config.scale_invariant:
            super().__init__(config.hidden_size, eps=SCALE_INVARIANT_EPS, elementwise_affine=False)
        else:
            super().__init__(config.hidden_size, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        weight = None if self.weight is None else self.weight.to(x32.dtype)
        bias = None if self.bias is None else self.bias.to(x32.dtype)
        return F.layer_norm(x32, self.normalized_shape, weight, bias, self.eps).type_as(x)


def relu_attention(q, k, v, attention_mask, causal: bool, dropout: float) -> torch.Tensor:
    """N_row(ReLU(q k^T / sqrt(d))) v: row-normalised ReLU attention, masked after the ReLU."""
    scores = torch.relu(at_least_fp32(q) @ at_least_fp32(k).transpose(-1, -2) / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.tril(diagonal=k.shape[-2] - q.shape[-2])
    elif attention_mask is not None:
        scores = scores * attention_mask.unsqueeze(1)
    probs = scores / (scores.sum(dim=-1, keepdim=True) + SCALE_INVARIANT_EPS)
    probs = F.dropout(probs, dropout, training=dropout > 0)
    return (probs @ at_least_fp32(v)).type_as(v)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def masked_attention(q, k, v, attention_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v under a boolean mask [b, s_q, s_k] (EOD reset's
    block-diagonal causal mask) through FlexAttention: blocks the mask leaves empty are skipped,
    and no [b, heads, s, s] score tensor is made, where scaled_dot_product_attention would fall
    back to a kernel that makes one. No dropout (FlexAttention has none); no backward on the CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        return attention_mask[batch, query, key]

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[-2], k.shape[-2], device=q.device)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask)


class Attention(nn.Module):
    """Multi-head attention with separate Q, K, V projections (each with bias), split over heads.
    With `selective_recompute` the attention core (scores, softmax, dropout) is recomputed in
    backward instead of kept (parallel.recompute = selective)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory, selective_recompute: bool = False):
        super().__init__()
        h = config.hidden_size
        self.layers = layers
        self.heads_per_rank = config.num_heads // layers.tp_size
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout_rate
        self.scale_invariant = config.scale_invariant
        self.selective_recompute = selective_recompute
        self.query = layers.column_linear(h, h, bias=True)
        self.key = layers.column_linear(h, h, bias=True)
        self.value = layers.column_linear(h, h, bias=True)
        self.dense = layers.row_linear(h, h, bias=not config.scale_invariant)

    def forward(
        self,
        x: torch.Tensor,
        query_input: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv_cache: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q = self._heads(self.query(query_input))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        causal = attention_mask is None
        if kv_cache is not None:  # generation: keys and values of earlier positions are kept
            if kv_cache:
                k, v = torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
                causal = False  # one new position attends to everything before it
            kv_cache[:] = [k, v]
        if self.selective_recompute and self.training:
            context = self.layers.recompute(self._core, q, k, v, attention_mask, causal)
        else:
            context = self._core(q, k, v, attention_mask, causal)
        batch, _, seq, _ = context.shape
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads_per_rank, self.head_dim).transpose(1, 2)

    def _core(self, q, k, v, attention_mask, causal: bool):
        """softmax(q k^T / sqrt(d) + mask) v, with dropout on the probabilities."""
        dropout = self.dropout if self.training else 0.0
        mask = None if attention_mask is None else attention_mask.unsqueeze(1)
        # Attention probabilities are split over heads, so their dropout masks differ per tp
        # rank: they come from the tensor-parallel RNG stream.
        with self.layers.tensor_parallel_rng(enabled=dropout > 0):
            if self.scale_invariant:
                return relu_attention(q, k, v, attention_mask, causal, dropout)
            if mask is not None and dropout == 0 and q.is_cuda:
                return masked_attention(q, k, v, attention_mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


class FeedForward(nn.Module):
    """h -> ffn -> h with bias, the activation in between."""

    def __init__(self, config: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.dense_h_to_4h = layers.column_linear(config.hidden_size, config.ffn_size, bias=True)
        self.dense_4h_to_h = layers.row_linear(config.ffn_size, config.hidden_size, bias=not config.scale_invariant)
        self.activation = ACTIVATIONS["relu" if config.scale_invariant else config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))


# Trunk layers: each takes (x, attention_mask, position_ids, kv_cache) and returns the new x.


class TransformerLayer(nn.Module):
    """One pre-LayerNorm block. The query layer is the same block with a different query input."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN, selective_recompute: bool = False):
        super().__init__()
        self.input_layernorm = LayerNorm(config)
        self.attention = Attention(config, layers, selective_recompute)
        self.post_attention_layernorm = LayerNorm(config)
        self.mlp = FeedForward(config, layers)
        self.hidden_dropout = config.dropout

    def forward(self, x, attention_mask=None, position_ids=None, kv_cache=None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        query_input = self.query_input(normed, position_ids)
        x = x + self._dropout(self.attention(normed, query_input, attention_mask, kv_cache))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def query_input(self, normed: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return normed

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Outputs of row-parallel layers are replicated across the tp group: the default RNG,
        # seeded alike on every tp rank, gives every rank the same mask.
        return F.dropout(x, self.hidden_dropout, training=self.training)


class QueryLayer(TransformerLayer):
    """The top layer: its attention query is a learned embedding of the position (not normalised)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN, selective_recompute: bool = False):
        super().__init__(config, layers, selective_recompute)
        self.query_embeddings = nn.utils.skip_init(nn.Embedding, config.seq_length, config.hidden_size)

    def query_input(self, normed: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return self.query_embeddings(position_ids).to(normed.dtype)


class FinalLayerNorm(LayerNorm):
    def forward(self, x, attention_mask=None, position_ids=None, kv_cache=None) -> torch.Tensor:
        return super().forward(x)


class Stem(nn.Module):
    """Scale-invariant variant only: h = W2 ReLU(W1 N(e)), the embedding lifted to degree 2."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN):
        super().__init__()
        self.norm = LayerNorm(config)
        self.mlp = FeedForward(config, layers)

    def forward(self, x, attention_mask=None, position_ids=None, kv_cache=None) -> torch.Tensor:
        return self.mlp(self.norm(x))


class Embedding(nn.Module):
    """word_emb[ids] + pos_emb[positions], then dropout."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN):
        super().__init__()
        self.word_embeddings = layers.vocab_embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.utils.skip_init(nn.Embedding, config.seq_length, config.hidden_size)
        self.dropout = config.dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return F.dropout(x, self.dropout, training=self.training)


def trunk_layer(kind: str, config: ModelConfig, layers: LayerFactory, selective_recompute: bool) -> nn.Module:
    """The module of a trunk layer of `kind` (see layout.py)."""
    if kind == layout.BLOCK:
        return TransformerLayer(config, layers, selective_recompute)
    if kind == layout.QUERY:
        return QueryLayer(config, layers, selective_recompute)
    if kind == layout.FINAL_NORM:
        return FinalLayerNorm(config)
    if kind == layout.STEM_LAYER:
        return Stem(config, layers)
    raise ValueError(f"{kind!r} is not a trunk layer")


class PanguAlpha(nn.Module):
    """The whole network as one module, for inference, evaluation and single-process use.

    Training runs the same layer classes in a DeepSpeed PipelineModule (pangu/parallel/pipeline.py);
    parameter names here are the canonical names of pangu checkpoints (layout.py).
    """

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN, selective_recompute: bool = False):
        super().__init__()
        self.config = config
        self.layers = layers
        self.embedding = Embedding(config, layers)
        trunk = []
        for layer in layout.layers(config):
            if layer.kind not in layout.TRUNK_KINDS:
                continue
            module = trunk_layer(layer.kind, config, layers, selective_recompute)
            if layer.kind == layout.BLOCK:
                if layout.BLOCKS not in self._modules:
                    self.blocks = nn.ModuleList()
                self.blocks.append(module)
            else:
                self.add_module(layer.module, module)
            trunk.append(module)
        self.trunk = trunk  # a plain list: the modules are registered above, under their canonical names

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: list[list] | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab_size]. `attention_mask` is [batch, seq, seq], 1 where a position
        may attend (PanGu's convention); None means causal. `kv_cache` (from `new_kv_cache()`) keeps
        keys and values across calls for generation: feed the prompt once, then one token per call
        with its position_ids."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()
        caches = kv_cache or [None] * len(self.trunk)
        x = self.embedding(input_ids, position_ids)
        for layer, cache in zip(self.trunk, caches):
            x = layer(x, mask, position_ids, cache)
        return self.logits(x)

    def new_kv_cache(self) -> list[list]:
        return [[] for _ in self.trunk]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (the padding rows of the vocabulary removed)."""
        logits = self.layers.lm_logits(hidden, self.embedding.word_embeddings.weight)
        return self.layers.gather_vocab(logits)[..., : self.config.vocab_size]
