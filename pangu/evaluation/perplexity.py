"""`pangu evaluate`: validation loss and perplexity of a model on the prepared validation split,
and the unigram baseline it must beat."""

from __future__ import annotations

import math

import numpy as np
import torch

from pangu.config import Config
from pangu.data.dataset import make_batch, read_samples
from pangu.data.prepare import load_prepared
from pangu.evaluation.inference import token_losses
from pangu.model.pangu_alpha import PanguAlpha


def validation_perplexity(model: PanguAlpha, config: Config, max_samples: int = 256, batch_size: int = 8) -> dict:
    dataset, meta = load_prepared(config.data.prepared_dir, "valid", model.config.seq_length)
    count = min(len(dataset), max_samples)
    total, tokens = 0.0, 0
    for start in range(0, count, batch_size):
        samples = read_samples(dataset, range(start, min(start + batch_size, count)), model.config.vocab_size)
        batch = make_batch(samples, pad_id=meta["pad_id"], eod_id=meta["eod_id"], eod_reset=config.data.eod_reset)
        total += float((token_losses(model, batch).cpu() * torch.from_numpy(batch["loss_mask"])).sum())
        tokens += int(batch["loss_mask"].sum())
    loss = total / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(loss), "tokens": tokens, "samples": count}


def unigram_perplexity(config: Config, seq_length: int) -> float:
    """Perplexity on the validation split of a unigram model of the training shards (add-one
    smoothed): the baseline a language model must beat by far."""
    train, meta = load_prepared(config.data.prepared_dir, "train", seq_length)
    valid, _ = load_prepared(config.data.prepared_dir, "valid", seq_length)
    counts = np.ones(meta["vocab_size"], dtype=np.float64)
    for i in range(len(train)):
        counts += np.bincount(train[i][:-1], minlength=meta["vocab_size"])
    log_probs = np.log(counts / counts.sum())
    targets = np.concatenate([valid[i][1:] for i in range(len(valid))])
    return float(np.exp(-log_probs[targets].mean()))
