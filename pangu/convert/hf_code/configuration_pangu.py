"""The configuration of PanGu-α in the GPTPangu layout, for transformers (remote code).

Written by the pangu project and copied next to the weights by `pangu convert export-hf`; it
imports only transformers (not pangu), so `AutoConfig.from_pretrained(DIR, trust_remote_code=True)`
works wherever transformers is installed.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ACTIVATIONS = ("gelu", "quick_gelu")  # exact erf GELU; x * sigmoid(1.702 x), PanGu-α's fast GELU
FINAL_LAYERNORMS = ("before", "after")  # ln_f just before the query layer (the released models), or after it


class GPTPanguConfig(PretrainedConfig):
    """`num_layers` counts the query layer (the last of `transformer.h`). `vocab_size` is the number
    of rows of the word embedding; where they are padded (`pangu convert export-hf --pad-vocab`),
    `pangu_vocab_size` is the real vocabulary and the logits of the padding rows are -inf."""

    model_type = "gpt_pangu"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "n_positions": "max_position_embeddings",
        "n_embd": "hidden_size",
    }

    def __init__(
        self,
        vocab_size: int = 40000,
        max_position_embeddings: int = 1024,
        hidden_size: int = 2560,
        intermediate_size: int | None = None,
        num_layers: int = 32,
        num_heads: int = 32,
        activation_function: str = "quick_gelu",
        final_layernorm: str = "before",
        resid_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        attn_pdrop: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        pangu_vocab_size: int | None = None,
        bos_token_id: int = 9,
        eos_token_id: int = 9,
        pad_token_id: int = 6,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        if activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function {activation_function!r} is not one of {ACTIVATIONS}")
        if final_layernorm not in FINAL_LAYERNORMS:
            raise ValueError(f"final_layernorm {final_layernorm!r} is not one of {FINAL_LAYERNORMS}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if num_layers < 1:
            raise ValueError("num_layers counts the query layer: it is at least 1")
        if not scale_attn_weights:
            raise ValueError("PanGu-α scales its attention scores by 1/sqrt(head_dim): scale_attn_weights is true")
        if pangu_vocab_size is not None and not 0 < pangu_vocab_size <= vocab_size:
            raise ValueError(f"pangu_vocab_size {pangu_vocab_size} is not in [1, vocab_size {vocab_size}]")
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.activation_function = activation_function
        self.final_layernorm = final_layernorm
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.pangu_vocab_size = pangu_vocab_size
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
