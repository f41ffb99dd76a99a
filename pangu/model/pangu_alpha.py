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
the layers and every parameter's name and shape are declared in declaration.py; the modules here are
built in that order by `PanguStage`, which every engine uses for its pipeline stages (any cut of
the declared layers) and of which `PanguAlpha`, the whole network, is the one-stage case.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pangu.config import ModelConfig
from pangu.model import declaration
from pangu.model.factory import PLAIN, LayerFactory, mix_seed


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


# ---------------------------------------------------------------------------------------------
# Attention masks: built once per forward of a stage, from what flows between stages


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """EOD reset's block-diagonal causal mask [b, 1, s, s] (True: may attend) from the document
    index of every position [b, s]."""
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return ((document_ids[:, :, None] == document_ids[:, None, :]) & causal).unsqueeze(1)


def document_block_mask(document_ids: torch.Tensor):
    """The same mask as FlexAttention's BlockMask: blocks the mask leaves empty are skipped, and no
    [b, heads, s, s] score tensor is made (scaled_dot_product_attention falls back to a kernel that
    makes one under a dense mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        return (document_ids[batch, query] == document_ids[batch, key]) & (query >= key)

    batch, seq = document_ids.shape
    return create_block_mask(mask_mod, batch, None, seq, seq, device=document_ids.device)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def relu_attention(q, k, v, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """N_row(ReLU(q k^T / sqrt(d))) v: row-normalised ReLU attention, masked after the ReLU
    (`mask` None: causal)."""
    scores = torch.relu(at_least_fp32(q) @ at_least_fp32(k).transpose(-1, -2) / math.sqrt(q.shape[-1]))
    if mask is None:
        scores = scores.tril(diagonal=k.shape[-2] - q.shape[-2])
    else:
        scores = scores * mask
    probs = scores / (scores.sum(dim=-1, keepdim=True) + SCALE_INVARIANT_EPS)
    probs = F.dropout(probs, dropout, training=dropout > 0)
    return (probs @ at_least_fp32(v)).type_as(v)


def attention_core(q, k, v, mask, dropout: float, scale_invariant: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v with dropout on the probabilities. `mask`: None (causal),
    "none" (every key: a new position against a KV cache), a bool tensor [b, 1, s_q, s_k], or a
    FlexAttention BlockMask (document_block_mask)."""
    if isinstance(mask, str):  # "none"
        mask = torch.ones(1, 1, q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
    if scale_invariant:
        return relu_attention(q, k, v, mask, dropout)
    if mask is not None and not torch.is_tensor(mask):
        return _compiled_flex_attention()(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)


# ---------------------------------------------------------------------------------------------
# Dropout seeds


class DropoutSeeds:
    """Where dropout draws its masks in training: one seed per (run seed, step, micro-batch, layer).

    A micro-batch is named by its place in the global batch (samples [c x micro_batch_size, ...)),
    which no layout changes, and a layer by its index in the declaration (declaration.py); so every
    layer of every pipeline stage draws masks of its own, and a sample gets the same masks under
    any (dp, pp) (and any tp, but for the attention probabilities, which are split over heads).
    Nothing about it needs saving: a resumed run derives the same seeds. Each stage runs the
    forwards of a step's micro-batches in order (every pipeline schedule does), so the j-th
    forward of a layer in a step is micro-batch `micro_batches[j]` of `start_step`.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.step = 0
        self.micro_batches: list[int] = []
        self._forwards: dict[int, int] = {}

    def start_step(self, step: int, micro_batches: list[int]) -> None:
        """Before the step's first forward: the global indices of the micro-batches this rank runs, in order."""
        self.step, self.micro_batches, self._forwards = step, list(micro_batches), {}

    def next_seed(self, layer: int) -> int:
        j = self._forwards.get(layer, 0)
        self._forwards[layer] = j + 1
        micro_batch = self.micro_batches[j] if j < len(self.micro_batches) else j
        return mix_seed(self.seed, self.step, micro_batch, layer)


# ---------------------------------------------------------------------------------------------
# Layers


class Attention(nn.Module):
    """Multi-head attention with separate Q, K, V projections (each with bias), split over heads.
    Q, K and V are column-parallel linears fed the same input: the input enters the
    tensor-parallel region once, so backward all-reduces its gradient once, not three times. With
    `selective_recompute` the attention core (scores, softmax, dropout) is recomputed in backward
    instead of kept (parallel.recompute = selective)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory, selective_recompute: bool = False):
        super().__init__()
        h = config.hidden_size
        self.layers = layers
        self.heads_per_rank = config.num_heads // layers.tp_size
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout_rate
        self.scale_invariant = config.scale_invariant
        self.selective_recompute = selective_recompute
        self.query = layers.column_linear(h, h, bias=True, shared_input=True)
        self.key = layers.column_linear(h, h, bias=True, shared_input=True)
        self.value = layers.column_linear(h, h, bias=True, shared_input=True)
        self.dense = layers.row_linear(h, h, bias=not config.scale_invariant)

    def forward(self, x, query_input, mask, kv_cache: list[torch.Tensor] | None = None, seed: int | None = None):
        """`query_input`: what the queries are computed from; None: `x`, like the keys and values."""
        shared = self.layers.tensor_parallel_input(x)
        queries = shared if query_input is None else self.layers.tensor_parallel_input(query_input)
        q = self._heads(self.query(queries))
        k = self._heads(self.key(shared))
        v = self._heads(self.value(shared))
        if kv_cache is not None:  # generation: keys and values of earlier positions are kept
            if kv_cache:
                k, v = torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
                mask = "none"  # one new position attends to everything before it
            kv_cache[:] = [k, v]
        if self.selective_recompute and self.training:
            context = self.layers.recompute(self._core, q, k, v, mask, seed)
        else:
            context = self._core(q, k, v, mask, seed)
        batch, _, seq, _ = context.shape
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads_per_rank, self.head_dim).transpose(1, 2)

    def _core(self, q, k, v, mask, seed: int | None):
        dropout = self.dropout if self.training else 0.0
        # Attention probabilities are split over heads, so their dropout masks must differ per
        # tp rank: the factory draws them from a stream of the rank's own.
        with self.layers.tensor_parallel_rng(seed if dropout > 0 else None, q.device):
            return attention_core(q, k, v, mask, dropout, self.scale_invariant)


class FeedForward(nn.Module):
    """h -> ffn -> h with bias, the activation in between."""

    def __init__(self, config: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.dense_h_to_4h = layers.column_linear(config.hidden_size, config.ffn_size, bias=True)
        self.dense_4h_to_h = layers.row_linear(config.ffn_size, config.hidden_size, bias=not config.scale_invariant)
        self.activation = ACTIVATIONS["relu" if config.scale_invariant else config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))


# Trunk layers: each takes (x, mask, position_ids, kv_cache, seed) and returns the new x.


class TransformerLayer(nn.Module):
    """One pre-LayerNorm block. The query layer is the same block with a different query input."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN, selective_recompute: bool = False):
        super().__init__()
        self.input_layernorm = LayerNorm(config)
        self.attention = Attention(config, layers, selective_recompute)
        self.post_attention_layernorm = LayerNorm(config)
        self.mlp = FeedForward(config, layers)
        self.hidden_dropout = config.dropout

    def forward(self, x, mask=None, position_ids=None, kv_cache=None, seed=None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        query_input = self.query_input(normed, position_ids)
        x = x + self._dropout(self.attention(normed, query_input, mask, kv_cache, seed))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def query_input(self, normed: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        return None  # the normalised hidden state, as for the keys and values

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Outputs of row-parallel layers are replicated across the tp group: the layer's seed is
        # the same on every tp rank, so every rank draws the same mask.
        return F.dropout(x, self.hidden_dropout, training=self.training)


class QueryLayer(TransformerLayer):
    """The top layer: its attention query is a learned embedding of the position (not normalised)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN, selective_recompute: bool = False):
        super().__init__(config, layers, selective_recompute)
        self.query_embeddings = layers.make(nn.Embedding, config.seq_length, config.hidden_size)

    def query_input(self, normed: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return self.query_embeddings(position_ids).to(normed.dtype)


class FinalLayerNorm(LayerNorm):
    def forward(self, x, mask=None, position_ids=None, kv_cache=None, seed=None) -> torch.Tensor:
        return super().forward(x)


class Stem(nn.Module):
    """Scale-invariant variant only: h = W2 ReLU(W1 N(e)), the embedding lifted to degree 2."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN):
        super().__init__()
        self.norm = LayerNorm(config)
        self.mlp = FeedForward(config, layers)

    def forward(self, x, mask=None, position_ids=None, kv_cache=None, seed=None) -> torch.Tensor:
        return self.mlp(self.norm(x))


def trunk_layer(kind: str, config: ModelConfig, layers: LayerFactory, selective_recompute: bool) -> nn.Module:
    """The module of a trunk layer of `kind` (see declaration.py)."""
    if kind == declaration.BLOCK:
        return TransformerLayer(config, layers, selective_recompute)
    if kind == declaration.QUERY:
        return QueryLayer(config, layers, selective_recompute)
    if kind == declaration.FINAL_NORM:
        return FinalLayerNorm(config)
    if kind == declaration.STEM_LAYER:
        return Stem(config, layers)
    raise ValueError(f"{kind!r} is not a trunk layer")


# ---------------------------------------------------------------------------------------------
# The network, or any contiguous run of its layers


class PanguStage(nn.Module):
    """Layers [first, last) of the declaration (declaration.layers) as one module: the whole network,
    or one pipeline stage of it. Every engine builds its stages with this class, so the network
    is assembled in one place for every stage cut; parameter names are the canonical names of
    checkpoints (a last stage that holds the head but not the word embedding has its own copy of
    the tied embedding, under the same name).

    forward(*inputs): a first stage takes (input_ids, position_ids[, document_ids]), any other
    (hidden, position_ids[, document_ids]); a last stage returns the logits of this rank's
    vocabulary slice, any other (hidden, position_ids[, document_ids]) for the next stage.
    `document_ids` (data.eod_reset) name each position's document: the stage builds the attention
    mask from them once per forward, for all its layers.

    `recompute`: "full" recomputes each transformer layer in backward, "selective" its attention
    core. `dropout_seeds` (DropoutSeeds) seeds each layer's dropout in training; without it
    dropout draws from the default generator.
    """

    def __init__(
        self,
        config: ModelConfig,
        layers: LayerFactory = PLAIN,
        *,
        first: int = 0,
        last: int | None = None,
        recompute: str = "none",
        dropout_seeds: DropoutSeeds | None = None,
    ):
        super().__init__()
        declared = declaration.layers(config)
        last = len(declared) if last is None else last
        self.config = config
        self.layers = layers
        self.recompute = recompute
        self.dropout_seeds = dropout_seeds
        self.first, self.last = first, last
        self.kinds = [layer.kind for layer in declared[first:last]]
        self.is_first = first == 0
        self.is_last = last == len(declared)
        self.embedding = nn.Module()
        if declaration.WORD_EMBEDDING in self.kinds or declaration.HEAD in self.kinds:
            self.embedding.word_embeddings = layers.vocab_embedding(config.padded_vocab_size, config.hidden_size)
        if declaration.POSITION_EMBEDDING in self.kinds:
            self.embedding.position_embeddings = layers.make(nn.Embedding, config.seq_length, config.hidden_size)
        self.trunk: list[tuple[int, nn.Module]] = []  # (layer index, module): registered under canonical names
        for index, layer in enumerate(declared[first:last], start=first):
            if layer.kind not in declaration.TRUNK_KINDS:
                continue
            module = trunk_layer(layer.kind, config, layers, recompute == "selective")
            if layer.kind == declaration.BLOCK:
                if declaration.BLOCKS not in self._modules:  # registered in the declared order
                    self.blocks = nn.ModuleDict()
                self.blocks[layer.module.removeprefix(declaration.BLOCKS + ".")] = module
            else:
                self.add_module(layer.module, module)
            self.trunk.append((index, module))
        self.uses_attention = any(kind in declaration.TRANSFORMER_KINDS for kind in self.kinds)

    def forward(self, *inputs: torch.Tensor):
        first, position_ids, *document_ids = inputs
        document_ids = document_ids[0] if document_ids else None
        x = self.run(first, position_ids, self.attention_mask(document_ids, first.device))
        if self.is_last:
            return x
        return (x, position_ids) if document_ids is None else (x, position_ids, document_ids)

    def attention_mask(self, document_ids: torch.Tensor | None, device: torch.device):
        """None (causal) without document ids; else the document mask, as a FlexAttention block
        mask where that kernel applies (CUDA, no attention dropout, softmax attention)."""
        if document_ids is None or not self.uses_attention:
            return None
        flex = (
            device.type == "cuda"
            and not self.config.scale_invariant
            and not (self.training and self.config.attention_dropout_rate > 0)
        )
        return document_block_mask(document_ids) if flex else document_mask(document_ids)

    def run(self, x, position_ids, mask, kv_cache: list[list] | None = None) -> torch.Tensor:
        """This stage's layers on `x` (token ids on a first stage, hidden states otherwise)."""
        index = self.first
        if declaration.WORD_EMBEDDING in self.kinds:
            x = self.embedding.word_embeddings(x)
            index += 1
        if declaration.POSITION_EMBEDDING in self.kinds:
            self._seed(index, self.config.dropout)
            x = x + self.embedding.position_embeddings(position_ids)
            x = F.dropout(x, self.config.dropout, training=self.training)
            x = self.layers.enter_sequence_parallel(x)
        for i, (index, layer) in enumerate(self.trunk):
            seed = self._seed(index, max(self.config.dropout, self.config.attention_dropout_rate), residual=True)
            cache = kv_cache[i] if kv_cache is not None else None
            if self.recompute == "full" and self.training and isinstance(layer, TransformerLayer):
                x = self.layers.recompute(layer, x, mask, position_ids, cache, seed)
            else:
                x = layer(x, mask, position_ids, cache, seed)
        if self.is_last:
            x = self.layers.lm_logits(x, self.embedding.word_embeddings.weight)
        return x

    def _seed(self, index: int, rate: float, residual: bool = False) -> int | None:
        """Seeds the default generator for layer `index`'s dropout (training with DropoutSeeds
        only; a trunk layer's `residual` stream as the factory says); returns the layer's seed,
        from which split regions derive theirs."""
        if not (self.training and rate > 0 and self.dropout_seeds is not None):
            return None
        seed = self.dropout_seeds.next_seed(index)
        torch.manual_seed(self.layers.residual_seed(seed) if residual else seed)
        return seed


class PanguAlpha(PanguStage):
    """The whole network as one module, for inference, evaluation and single-process use (training
    runs the same class, cut into stages, inside an engine: pangu/parallel)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory = PLAIN, recompute: str = "none"):
        super().__init__(config, layers, recompute=recompute)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: list[list] | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab_size]. `attention_mask` is [batch, seq, seq], 1 where a position
        may attend (PanGu's convention), or give `document_ids` [batch, seq] (EOD reset); neither
        means causal. `kv_cache` (from `new_kv_cache()`) keeps keys and values across calls for
        generation: feed the prompt once, then one token per call with its position_ids."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if attention_mask is not None:
            mask = attention_mask.bool().unsqueeze(1)
        else:
            mask = self.attention_mask(document_ids, input_ids.device)
        return self.logits(self.run(input_ids, position_ids, mask, kv_cache))

    def new_kv_cache(self) -> list[list]:
        return [[] for _ in self.trunk]

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (the padding rows of the vocabulary removed) from this rank's slice."""
        return self.layers.gather_vocab(logits)[..., : self.config.vocab_size]
