"""The order in which samples are consumed, independent of the parallel layout and exactly resumable.

The sample stream is epoch after epoch of a permutation of all sample indices, seeded by
(seed, epoch). Global batch k is stream positions [k*B, (k+1)*B) in order, passing over any
position inside a skipped range. The sampler's whole state is (seed, consumed_samples,
skipped_ranges): a checkpoint that stores `state_dict()` resumes the stream exactly, under any
global batch size or data-parallel layout.

How a global batch is split is fixed too: micro-batch j of data-parallel rank d is
global_batch[(j * dp_size + d) * mbs : (j * dp_size + d + 1) * mbs], so every layout trains on
the same samples in the same global batches.

With `cache_dir` (the trainer passes the prepared directory's `IndexCache`) an epoch's permutation
is computed once, by one process, and memory-mapped by every rank and every later start: O(1)
start-up in the number of samples. It is the same permutation either way.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import numpy as np

from pangu.data.cache import IndexCache, cached_array


class GlobalBatchSampler:
    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        consumed_samples: int = 0,
        skipped_ranges: Iterable[tuple[int, int]] = (),
        cache_dir: IndexCache | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.skipped_ranges: list[tuple[int, int]] = []
        for start, end in skipped_ranges:
            self.skip(start, end)
        self.cache_dir = cache_dir
        self._epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def skip(self, start: int, end: int) -> None:
        """Never yield the stream positions [start, end) (e.g. the data around a loss spike).
        Positions, not sample indices: the same sample in a later epoch is still used."""
        if not 0 <= start < end:
            raise ValueError(f"a skipped range needs 0 <= start < end, got [{start}, {end})")
        merged: list[tuple[int, int]] = []
        for s, e in sorted([*self.skipped_ranges, (start, end)]):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.skipped_ranges = merged

    def next_global_batch(self) -> np.ndarray:
        """The next global batch of sample indices (int64, length global_batch_size)."""
        positions = self._next_positions()
        self.consumed_samples = int(positions[-1]) + 1
        return self._samples_at(positions)

    def peek_global_batch(self) -> np.ndarray:
        """The global batch `next_global_batch` will return, without consuming it (for reading ahead)."""
        return self._samples_at(self._next_positions())

    def _next_positions(self) -> np.ndarray:
        positions = np.empty(self.global_batch_size, dtype=np.int64)
        position = self.consumed_samples
        for n in range(self.global_batch_size):
            position = self._first_unskipped(position)
            positions[n] = position
            position += 1
        return positions

    def _first_unskipped(self, position: int) -> int:
        # ranges are sorted and disjoint: only the last one starting at or before position can hold it
        i = bisect.bisect_right(self.skipped_ranges, (position, float("inf"))) - 1
        if i >= 0 and position < self.skipped_ranges[i][1]:
            return self.skipped_ranges[i][1]
        return position

    def _samples_at(self, positions: np.ndarray) -> np.ndarray:
        samples = np.empty_like(positions)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            samples[in_epoch] = self._epoch_permutation(int(epoch))[positions[in_epoch] % self.num_samples]
        return samples

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            key = {"rule": "default_rng-permutation", "seed": self.seed, "epoch": epoch, "samples": self.num_samples}
            self._permutation = cached_array(
                self.cache_dir, "permutation", key, self.num_samples, lambda: self._build_permutation(epoch)
            )
            self._epoch = epoch
        return self._permutation

    def _build_permutation(self, epoch: int) -> np.ndarray:
        # shuffling arange(n) in 4-byte integers gives the same order as permutation(n) (the
        # shuffle does not depend on the dtype; the tests check it) in half the memory
        rng = np.random.default_rng([self.seed, epoch])
        if self.num_samples <= 1 << 32:
            return rng.permutation(np.arange(self.num_samples, dtype=np.uint32))
        return rng.permutation(self.num_samples)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; with num_samples and global_batch_size it rebuilds this sampler."""
        return {
            "seed": self.seed,
            "consumed_samples": self.consumed_samples,
            "skipped_ranges": [[start, end] for start, end in self.skipped_ranges],
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], num_samples: int, global_batch_size: int, cache_dir: IndexCache | None = None
    ) -> GlobalBatchSampler:
        return cls(
            num_samples,
            global_batch_size,
            seed=state["seed"],
            consumed_samples=state["consumed_samples"],
            skipped_ranges=[tuple(r) for r in state["skipped_ranges"]],
            cache_dir=cache_dir,
        )


def micro_batches(global_batch: np.ndarray, *, dp_size: int, dp_rank: int, micro_batch_size: int) -> list[np.ndarray]:
    """The micro-batches data-parallel rank `dp_rank` trains on, in order: micro-batch j is
    global_batch[(j * dp_size + dp_rank) * micro_batch_size : ... + micro_batch_size]."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if micro_batch_size < 1 or len(global_batch) % (dp_size * micro_batch_size):
        raise ValueError(
            f"a global batch of {len(global_batch)} samples cannot be split into micro-batches of "
            f"{micro_batch_size} over {dp_size} data-parallel ranks: train.global_batch_size must "
            f"be a multiple of micro_batch_size x dp_size = {micro_batch_size * dp_size}"
        )
    num_micro_batches = len(global_batch) // (dp_size * micro_batch_size)
    return [
        global_batch[(j * dp_size + dp_rank) * micro_batch_size : (j * dp_size + dp_rank + 1) * micro_batch_size]
        for j in range(num_micro_batches)
    ]
