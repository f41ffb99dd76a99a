"""PanGu-α (Zeng et al. 2021) for transformers, in the GPTPangu layout (remote code).

Written by the pangu project from its own model (pangu/model/pangu_alpha.py) and copied next to
the weights by `pangu convert export-hf`. It imports torch and transformers only (not pangu), so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works wherever they are
installed; `generate` runs with a transformers Cache (DynamicCache by default).

    h = dropout(wte[ids] + wpe[positions])
    for the blocks transformer.h[0 .. n-2] (pre-LayerNorm):
        h = h + dropout(c_proj(Attention(q, k, v of ln_1(h))))
        h = h + dropout(MLP(ln_2(h)))
    h = ln_f(h)                                  final_layernorm "before" (the released models)
    query layer transformer.h[n-1]: the same block, but its attention query is q_proj(wqe[positions])
    h = ln_f(h)                                  final_layernorm "after" instead
    logits = h @ wte^T                           lm_head tied to wte; padding rows of the vocabulary -inf

`num_layers` counts the query layer. LayerNorms compute in fp32 whatever the weights' dtype, as
pangu does; the activation is exact GELU or fast GELU x * sigmoid(1.702 x) ("quick_gelu").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_pangu import GPTPanguConfig

# transformers 5 names the cache `cache` (forward argument and output field); 4.x `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    """PanGu-α's activation (Ascend's FastGelu); transformers' "quick_gelu"."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": fast_gelu}


class GPTPanguLayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32 and returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        weight = None if self.weight is None else self.weight.to(x32.dtype)
        bias = None if self.bias is None else self.bias.to(x32.dtype)
        return F.layer_norm(x32, self.normalized_shape, weight, bias, self.eps).type_as(x)


class GPTPanguAttention(nn.Module):
    def __init__(self, config: GPTPanguConfig, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = hidden // config.num_heads
        self.dropout = config.attn_pdrop
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(
        self,
        hidden: torch.Tensor,
        query_input: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        q = self._heads(self.q_proj(query_input))
        k = self._heads(self.k_proj(hidden))
        v = self._heads(self.v_proj(hidden))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # no mask: causal when the queries are all the keys (a prompt), none for one new token
        causal = mask is None and q.shape[-2] > 1
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        batch, _, seq, _ = context.shape
        return self.c_proj(context.transpose(1, 2).reshape(batch, seq, -1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)


class GPTPanguMLP(nn.Module):
    def __init__(self, config: GPTPanguConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTPanguBlock(nn.Module):
    """A pre-LayerNorm block; the query layer is this block fed the query embedding as its query."""

    def __init__(self, config: GPTPanguConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = GPTPanguLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTPanguAttention(config, layer_idx)
        self.ln_2 = GPTPanguLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTPanguMLP(config)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden, mask, cache, query_embeds=None) -> torch.Tensor:
        normed = self.ln_1(hidden)
        query_input = normed if query_embeds is None else query_embeds.to(normed.dtype)
        hidden = hidden + self.dropout(self.attn(normed, query_input, mask, cache))
        return hidden + self.dropout(self.mlp(self.ln_2(hidden)))


class GPTPanguPreTrainedModel(PreTrainedModel):
    config_class = GPTPanguConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTPanguBlock"]
    _supports_cache_class = True  # transformers 4.x: hand the model a DynamicCache in generate
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """For weights a checkpoint lacks (from_pretrained) or a new model: the layout's usual init."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _as_cache(cache) -> Cache | None:
    if cache is None or isinstance(cache, Cache):
        return cache
    return DynamicCache(cache)  # legacy ((key, value), ...) per layer


class GPTPanguModel(GPTPanguPreTrainedModel):
    """The trunk: embeddings, blocks, final LayerNorm and query layer; returns the last hidden state."""

    _keys_to_ignore_on_load_unexpected = [r"lm_head\.weight"]  # the head of an export, loaded as AutoModel

    def __init__(self, config: GPTPanguConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.wqe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPTPanguBlock(config, i) for i in range(config.num_layers))
        self.ln_f = GPTPanguLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.wte = embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = _as_cache(cache if cache is not None else past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != past + seq:
                raise ValueError(
                    f"attention_mask must be [batch, past + new tokens] = [{batch}, {past + seq}], "
                    f"got {list(attention_mask.shape)}"
                )
            if bool(attention_mask.all()):
                attention_mask = None  # nothing padded: the causal fast path
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count the real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).unsqueeze(0)
        position_ids = position_ids.expand(batch, seq)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the {self.config.max_position_embeddings} "
                f"positions PanGu-α was trained with"
            )
        mask = self._mask(attention_mask, batch, seq, past, inputs_embeds.device)

        hidden = self.drop(inputs_embeds + self.wpe(position_ids).to(inputs_embeds.dtype))
        states = (hidden,) if output_hidden_states else None
        query = len(self.h) - 1
        for i, block in enumerate(self.h):
            if i == query and self.config.final_layernorm == "before":
                hidden = self.ln_f(hidden)
            hidden = block(hidden, mask, cache, self.wqe(position_ids) if i == query else None)
            if output_hidden_states:
                states += (hidden,)
        if self.config.final_layernorm == "after":
            hidden = self.ln_f(hidden)
            if output_hidden_states:
                states = states[:-1] + (hidden,)

        if not (return_dict if return_dict is not None else getattr(self.config, "return_dict", True)):
            return tuple(x for x in (hidden, cache, states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=states, **{_CACHE_FIELD: cache})

    @staticmethod
    def _mask(attention_mask, batch: int, seq: int, past: int, device) -> torch.Tensor | None:
        """Boolean [batch, 1, seq, past + seq] (True: may attend), or None for plain causal attention
        (no padding, and either no past or one new token)."""
        if attention_mask is None and (past == 0 or seq == 1):
            return None
        allowed = torch.ones(seq, past + seq, dtype=torch.bool, device=device).tril(diagonal=past).unsqueeze(0)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool().unsqueeze(1)
        # a query with nothing to attend to (a left-padding position) attends everywhere: its output
        # is finite and nobody reads it
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        return allowed.expand(batch, seq, past + seq).unsqueeze(1)


class GPTPanguForCausalLM(GPTPanguPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: GPTPanguConfig):
        super().__init__(config)
        self.transformer = GPTPanguModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.transformer.wte = embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Linear) -> None:
        self.lm_head = head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ):
        """Logits [batch, seq, vocab_size]; with `labels`, the mean next-token cross entropy
        (labels -100 ignored; the model shifts them)."""
        out = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=cache,
        )
        logits = self.lm_head(out.last_hidden_state)
        real = self.config.pangu_vocab_size
        if real is not None and real < logits.shape[-1]:  # the padding rows of the vocabulary
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= real, -math.inf)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        cache = getattr(out, _CACHE_FIELD)
        if not (return_dict if return_dict is not None else getattr(self.config, "return_dict", True)):
            return tuple(x for x in (loss, logits, cache, out.hidden_states) if x is not None)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: cache}
        )
