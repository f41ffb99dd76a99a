"""From token shards to training samples and batches.

- `PackedDataset`: the token stream of a source's shards, back to back (every document already
  followed by the separator), cut into non-overlapping samples of `seq_length + 1` tokens; the
  shorter tail is dropped. A sample may span two shards: the stream is what counts.
- `BlendedDataset`: several sources interleaved sample by sample in fixed proportions; its index
  is built once (`blend_indices`, vectorised) and cached beside the shards.
- `read_samples`: a batch of samples, every token id checked against the model's vocabulary on the
  host (an id outside it would fail in the embedding, on a GPU as a device-side assert that kills
  the process): a damaged shard, or one of another tokenizer, is named with the sample.
- `make_batch`: a [B, seq_length + 1] array of samples -> model inputs, labels and masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pangu.data import DataError
from pangu.data.cache import IndexCache, cached_array


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...

    def locate(self, i: int, offset: int) -> str:
        """Where token `offset` of sample i is stored, in words (for error messages)."""


class TokenSource(Protocol):
    """A shard's token stream: IndexedShard, or ShardTokens (which maps its file on first use)."""

    num_tokens: int
    bin_path: Path

    @property
    def tokens(self) -> np.ndarray: ...


class PackedDataset:
    """Sample i is tokens[i * (seq_length + 1) : (i + 1) * (seq_length + 1)] of the shards' stream."""

    def __init__(self, shards: TokenSource | Sequence[TokenSource], seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.shards = list(shards) if isinstance(shards, Sequence) else [shards]
        self.sample_length = seq_length + 1
        self.starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([shard.num_tokens for shard in self.shards], out=self.starts[1:])
        self.num_tokens = int(self.starts[-1])
        self.num_samples = self.num_tokens // self.sample_length

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        start = int(i) * self.sample_length
        end = start + self.sample_length
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        if end <= self.starts[s + 1]:  # the usual case: inside one shard
            offset = start - int(self.starts[s])
            return self.shards[s].tokens[offset : offset + self.sample_length].astype(np.int64)
        parts = []
        while start < end:
            offset = start - int(self.starts[s])
            take = min(end, int(self.starts[s + 1])) - start
            parts.append(self.shards[s].tokens[offset : offset + take])
            start += take
            s += 1
        return np.concatenate(parts).astype(np.int64)

    def locate(self, i: int, offset: int) -> str:
        position = int(i) * self.sample_length + offset
        s = int(np.searchsorted(self.starts, position, side="right")) - 1
        return f"{self.shards[s].bin_path}, its token {position - int(self.starts[s])}"


class BlendedDataset:
    """Interleaves datasets so that every prefix of the blend holds them in proportion to
    `weights`: sample k comes from the dataset whose realised share is furthest below its weight
    (ties go to the first), as in Megatron. The blend is as long as the datasets together; a
    dataset drawn more often than it has samples (a weight above its share of the samples)
    starts over from its first sample. With `cache_dir`, the index is built once, by one
    process, and memory-mapped from there afterwards."""

    def __init__(
        self, datasets: Sequence[SampleDataset], weights: Sequence[float], cache_dir: IndexCache | None = None
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be > 0, got {list(weights)}")
        sizes = [len(d) for d in datasets]
        if any(size == 0 for size in sizes):
            raise DataError(f"cannot blend an empty dataset (sample counts {sizes})")
        self.datasets = list(datasets)
        self.weights = [w / sum(weights) for w in weights]
        key = {"rule": "largest-deficit-v1", "weights": [float(w) for w in weights], "sizes": sizes}
        total = sum(sizes)
        self.dataset_index = cached_array(
            cache_dir, "blend-dataset", key, total, lambda: blend_indices(weights, sizes)[0]
        )
        self.dataset_sample_index = cached_array(
            cache_dir, "blend-sample", key, total, lambda: blend_indices(weights, sizes)[1]
        )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]

    def locate(self, i: int, offset: int) -> str:
        return self.datasets[self.dataset_index[i]].locate(int(self.dataset_sample_index[i]), offset)


def blend_indices(weights: Sequence[float], sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int32, dataset_sample_index int64) of the blend of datasets of `sizes`
    samples. Step k takes the dataset j maximising weights[j] * (k + 1) - drawn[j] (the first on
    ties), exactly as the plain loop `_greedy_steps` would, float for float.

    Vectorised by guess and check: a guess for the next block of steps (dataset j's m-th draw
    placed at (m + 0.5) / weights[j], which is the greedy's own order for two datasets) is checked
    against the rule at every step at once; the steps up to the first disagreement are kept and
    the greedy loop takes a few steps from there before the next guess. Blends the guess gets
    wrong often (three or more datasets with irregular weights) approach the loop's speed
    (about 1.5 us a sample), once, since the result is cached."""
    total_weight = sum(weights)
    w = [x / total_weight for x in weights]
    wv = np.array(w, dtype=np.float64)
    num, total = len(w), int(sum(sizes))
    order = np.empty(total, dtype=np.int32)
    drawn = np.zeros(num, dtype=np.int64)
    k, block, slow = 0, 4096, 16
    while k < total:
        b = min(block, total - k)
        guess = _stride_guess(wv, drawn, b)
        onehot = guess[None, :] == np.arange(num)[:, None]
        before = drawn[:, None] + np.cumsum(onehot, axis=1) - onehot
        deficit = wv[:, None] * np.arange(k + 1, k + b + 1, dtype=np.float64)[None, :] - before
        right = np.argmax(deficit, axis=0) == guess
        accepted = b if right.all() else int(np.argmin(right))
        order[k : k + accepted] = guess[:accepted]
        drawn += onehot[:, :accepted].sum(axis=1)
        k += accepted
        if accepted == b:
            block, slow = min(2 * block, 1 << 18), 16
            continue
        steps = min(slow, total - k)
        counts = [int(x) for x in drawn]
        _greedy_steps(w, counts, k, steps, order)
        drawn = np.array(counts, dtype=np.int64)
        k += steps
        slow = min(2 * slow, 1 << 16) if accepted < 64 else 16
        block = max(4096, 2 * accepted)
    sample_index = np.empty(total, dtype=np.int64)
    drawn[:] = 0
    for start in range(0, total, 1 << 22):  # in chunks: no full-length temporaries
        chunk = order[start : start + (1 << 22)]
        out = sample_index[start : start + (1 << 22)]
        for j, size in enumerate(sizes):
            chosen = chunk == j
            count = int(chosen.sum())
            out[chosen] = (drawn[j] + np.arange(count, dtype=np.int64)) % size
            drawn[j] += count
    return order, sample_index


def _stride_guess(w: np.ndarray, drawn: np.ndarray, steps: int) -> np.ndarray:
    counts = np.ceil(w * steps).astype(np.int64) + 2
    times = np.concatenate([(drawn[j] + np.arange(counts[j]) + 0.5) / w[j] for j in range(len(w))])
    which = np.repeat(np.arange(len(w)), counts)
    return which[np.lexsort((which, times))[:steps]].astype(np.int64)


def _greedy_steps(w: list[float], drawn: list[int], k: int, steps: int, order: np.ndarray) -> None:
    """`steps` steps of the rule from step k, in plain Python (the reference)."""
    datasets = range(len(w))
    for step in range(k, k + steps):
        d = max(datasets, key=lambda j: w[j] * (step + 1) - drawn[j])
        order[step] = d
        drawn[d] += 1


def read_samples(dataset: SampleDataset, indices: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Samples `indices` of `dataset` as one [len(indices), seq_length + 1] int64 array, every
    token id checked to lie in [0, vocab_size) (model.vocab_size)."""
    samples = np.stack([dataset[int(i)] for i in indices])
    check_token_ids(
        samples,
        vocab_size,
        lambda row, column: (
            f"token {column} of sample {int(indices[row])} ({dataset.locate(int(indices[row]), column)})"
        ),
    )
    return samples


_SHARD_FIX = (
    "the data was written with another tokenizer or is damaged; re-run `pangu prepare` with this model's tokenizer"
)


def check_token_ids(
    tokens: np.ndarray, vocab_size: int, where: Callable[[int, int], str], fix: str = _SHARD_FIX
) -> None:
    """A DataError naming the first token of a [rows, columns] array outside [0, vocab_size) by
    `where(row, column)`, and saying `fix`; two reductions over the batch when every id is in range."""
    if not tokens.size or (tokens.min() >= 0 and tokens.max() < vocab_size):
        return
    row, column = (int(k[0]) for k in np.nonzero((tokens < 0) | (tokens >= vocab_size)))
    raise DataError(
        f"{where(row, column)} is token id {int(tokens[row, column])}, outside the model's vocabulary of "
        f"{vocab_size} (model.vocab_size): {fix}"
    )


def make_batch(samples: np.ndarray, *, pad_id: int, eod_id: int, eod_reset: bool) -> dict[str, np.ndarray]:
    """Model inputs for a batch of packed samples [B, S + 1]:

    - `input_ids` [B, S] int64 = samples[:, :-1]; `labels` [B, S] int64 = samples[:, 1:]
    - `loss_mask` [B, S] float32: 1 where the INPUT token is not `<pad>` (as in PanGu-alpha)
    - `position_ids` [B, S] int64: 0..S-1, or with `eod_reset` restarting at 0 on the token after
      each separator
    - with `eod_reset` only, `document_ids` [B, S] int32: the index of each position's document
      within its sample. Query i may attend key j when j <= i and both are in the same document
      (block-diagonal causal); the model builds that mask from these ids, once per forward (a
      [B, S, S] mask would be S times larger to build and to send between pipeline stages).
      Without `eod_reset` there is no `document_ids` key: plain causal attention.
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
    batch["document_ids"] = np.cumsum(starts_document, axis=1, dtype=np.int32)
    return batch
