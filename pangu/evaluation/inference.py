"""Using a model: per-token losses, and generation (greedy, temperature, top-k, top-p).

One generation loop for every caller (`pangu generate`, the task harness): `generate` takes a
function from the tokens so far to the next token's logits. For a `PanguAlpha` in this process
that function keeps a KV cache (`generate_ids`); the harness's pipeline-engine scorer passes
its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pangu.model.pangu_alpha import PanguAlpha
from pangu.schema import ConfigError

LogitsFn = Callable[[list[int]], torch.Tensor]  # tokens so far -> logits [vocab] of the next one


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab] (padding rows already cut)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def token_losses(model: PanguAlpha, batch: dict) -> torch.Tensor:
    """Cross entropy of every label of a batch from `pangu.data.dataset.make_batch`: [B, S], fp32
    (multiply by batch["loss_mask"] to count only the positions training counts)."""
    device = next(model.parameters()).device
    documents = batch.get("document_ids")
    logits = model(
        torch.from_numpy(batch["input_ids"]).to(device),
        torch.from_numpy(batch["position_ids"]).to(device),
        document_ids=None if documents is None else torch.from_numpy(documents).to(device),
    )
    labels = torch.from_numpy(batch["labels"]).to(device)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def current_document(ids: Sequence[int], eod_id: int) -> list[int]:
    """The tokens the last position attends to under EOD reset (data.eod_reset): everything after
    the last separator before it. Generating from them with plain causal attention is exactly
    generating from `ids` with the block-diagonal mask and restarted positions."""
    for i in range(len(ids) - 2, -1, -1):
        if ids[i] == eod_id:
            return list(ids[i + 1 :])
    return list(ids)


def cached_logits(model: PanguAlpha) -> LogitsFn:
    """A LogitsFn for `model` that feeds only the tokens it has not seen, keeping keys and values:
    the first call takes the prompt, every later call must add exactly one token (as `generate`
    does), since a new token attends to all the cached ones."""
    cache = model.new_kv_cache()
    device = next(model.parameters()).device
    seen = 0

    def logits_of(ids: list[int]) -> torch.Tensor:
        nonlocal seen
        new = torch.tensor([ids[seen:]], device=device)
        positions = torch.arange(seen, len(ids), device=device).unsqueeze(0)
        seen = len(ids)
        return model(new, position_ids=positions, kv_cache=cache)[0, -1]

    return logits_of


@torch.no_grad()
def generate(
    logits_of: LogitsFn,
    prompt_ids: Sequence[int],
    *,
    seq_length: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    stop: Callable[[list[int]], bool] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Continues `prompt_ids`; stops at a stop id (not included), when `stop(tokens so far)`
    says so (included), after max_new_tokens, or at the model's length."""
    prompt = list(prompt_ids)
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token")
    if len(prompt) > seq_length:
        raise ConfigError(f"the prompt has {len(prompt)} tokens; the model reads at most {seq_length}: shorten it")
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[int] = []
    for _ in range(min(max_new_tokens, seq_length - len(prompt))):
        logits = logits_of(prompt + out).unsqueeze(0)
        token = int(sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
        if token in stop_ids:
            break
        out.append(token)
        if stop is not None and stop(out):
            break
    return out


def generate_ids(model: PanguAlpha, prompt_ids: Sequence[int], **options) -> list[int]:
    """`generate` with a KV cache, for a model in this process (options as `generate`'s)."""
    device = next(model.parameters()).device
    return generate(cached_logits(model), prompt_ids, seq_length=model.config.seq_length, device=device, **options)
