"""From token shards to training samples and batches.

- `PackedDataset`: a shard's token stream (every document already followed by the separator) cut
  into non-overlapping samples of `seq_length + 1` tokens; the shorter tail is dropped.
- `BlendedDataset`: several sources interleaved sample by sample in fixed proportions.
- `make_batch`: a [B, seq_length + 1] array of samples -> model inputs, labels and masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from pangu.data import DataError
from pangu.data.indexed import IndexedShard


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


class PackedDataset:
    """Sample i is tokens[i * (seq_length + 1) : (i + 1) * (seq_length + 1)] of the shard."""

    def __init__(self, shard: IndexedShard, seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.shard = shard
        self.sample_length = seq_length + 1
        self.num_samples = shard.num_tokens // self.sample_length

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        start = int(i) * self.sample_length
        return self.shard.tokens[start : start + self.sample_length].astype(np.int64)


class BlendedDataset:
    """Interleaves datasets so that every prefix of the blend holds them in proportion to
    `weights`: sample k comes from the dataset whose realised share is furthest below its weight
    (ties go to the first), as in Megatron. The blend is as long as the datasets together; a
    dataset drawn more often than it has samples (a weight above its share of the samples)
    starts over from its first sample."""

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float]) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be > 0, got {list(weights)}")
        if any(len(d) == 0 for d in datasets):
            raise DataError(f"cannot blend an empty dataset (sample counts {[len(d) for d in datasets]})")
        self.datasets = list(datasets)
        self.weights = [w / sum(weights) for w in weights]
        size = sum(len(d) for d in datasets)
        self.dataset_index = np.empty(size, dtype=np.int32)
        self.dataset_sample_index = np.empty(size, dtype=np.int64)
        drawn = [0] * len(datasets)
        for k in range(size):
            d = max(range(len(datasets)), key=lambda j: self.weights[j] * (k + 1) - drawn[j])
            self.dataset_index[k] = d
            self.dataset_sample_index[k] = drawn[d] % len(datasets[d])
            drawn[d] += 1

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]


def make_batch(samples: np.ndarray, *, pad_id: int, eod_id: int, eod_reset: bool) -> dict[str, np.ndarray]:
    """Model inputs for a batch of packed samples [B, S + 1]:

    - `input_ids` [B, S] int64 = samples[:, :-1]; `labels` [B, S] int64 = samples[:, 1:]
    - `loss_mask` [B, S] float32: 1 where the INPUT token is not `<pad>` (as in PanGu-alpha)
    - `position_ids` [B, S] int64: 0..S-1, or with `eod_reset` restarting at 0 on the token after
      each separator
    - with `eod_reset` only, `attention_mask` [B, S, S] bool, True where query i may attend key j:
      j <= i and both in the same document (block-diagonal causal). Without `eod_reset` there is
      no `attention_mask` key: plain causal attention.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] < 2:
        raise ValueError(f"samples must be [batch, seq_length + 1] with seq_length >= 1, got {samples.shape}")
    input_ids = samples[:, :-1].astype(np.int64)
    batch_size, seq_length = input_ids.shape
    batch = {
        "input_ids": input_ids,
        "labels": samples[:, 1:].astype(np.int64),
        "loss_mask": (input_ids != pad_id).astype(np.float32),
    }
    positions = np.broadcast_to(np.arange(seq_length, dtype=np.int64), (batch_size, seq_length))
    if not eod_reset:
        batch["position_ids"] = positions.copy()
        return batch
    # a document starts at position 0 and after every separator; the separator itself still
    # belongs to the document it ends
    starts_document = np.zeros_like(input_ids, dtype=bool)
    starts_document[:, 0] = True
    starts_document[:, 1:] = input_ids[:, :-1] == eod_id
    document_start = np.maximum.accumulate(np.where(starts_document, positions, 0), axis=1)
    batch["position_ids"] = positions - document_start
    document = np.cumsum(starts_document, axis=1)
    causal = np.tril(np.ones((seq_length, seq_length), dtype=bool))
    batch["attention_mask"] = (document[:, :, None] == document[:, None, :]) & causal
    return batch
