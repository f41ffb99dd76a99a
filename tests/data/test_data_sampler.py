"""The global batch sampler: deterministic, exactly resumable, skips ranges, and splits a global
batch the same way for every data-parallel layout."""

import json

import numpy as np
import pytest

from pangu.data.sampler import GlobalBatchSampler, micro_batches

NUM_SAMPLES, BATCH, SEED = 50, 8, 1234


def _batches(sampler: GlobalBatchSampler, count: int) -> list[list[int]]:
    return [sampler.next_global_batch().tolist() for _ in range(count)]


def _stream(seed: int, epochs: int) -> list[int]:
    """The sample stream the sampler promises: epoch after epoch of a seeded permutation."""
    return [int(s) for e in range(epochs) for s in np.random.default_rng([seed, e]).permutation(NUM_SAMPLES)]


def test_batches_are_consecutive_slices_of_the_seeded_stream_across_epochs():
    batches = _batches(GlobalBatchSampler(NUM_SAMPLES, BATCH, SEED), 20)  # 160 samples: 3.2 epochs
    assert sum(batches, []) == _stream(SEED, 4)[:160]
    assert sorted(sum(batches, [])[:NUM_SAMPLES]) == list(range(NUM_SAMPLES))  # an epoch sees each sample once
    assert _batches(GlobalBatchSampler(NUM_SAMPLES, BATCH, SEED), 20) == batches
    assert _batches(GlobalBatchSampler(NUM_SAMPLES, BATCH, SEED + 1), 20) != batches


def test_resuming_from_the_state_gives_the_uninterrupted_batches():
    uninterrupted = _batches(GlobalBatchSampler(NUM_SAMPLES, BATCH, SEED), 15)
    first = GlobalBatchSampler(NUM_SAMPLES, BATCH, SEED)
    before = _batches(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state == {"seed": SEED, "consumed_samples": 7 * BATCH, "skipped_ranges": []}
    resumed = GlobalBatchSampler.from_state_dict(state, NUM_SAMPLES, BATCH)
    assert before + _batches(resumed, 8) == uninterrupted


def test_skipped_ranges_are_passed_over_and_survive_a_resume():
    stream = _stream(SEED, 3)
    sampler = GlobalBatchSampler(NUM_SAMPLES, BATCH, SEED)
    first = _batches(sampler, 2)
    # a loss-spike guard throws away positions [20, 30) (batch 2 and part of 3) and [30, 34)
    sampler.skip(20, 30)
    sampler.skip(30, 34)
    assert sampler.skipped_ranges == [(20, 34)]  # merged
    second = sampler.next_global_batch().tolist()
    assert second == stream[16:20] + stream[34:38]
    assert sampler.consumed_samples == 38  # past everything it used, skipped positions included
    resumed = GlobalBatchSampler.from_state_dict(json.loads(json.dumps(sampler.state_dict())), NUM_SAMPLES, BATCH)
    assert _batches(resumed, 2) == [stream[38:46], stream[46:54]]
    assert first == [stream[0:8], stream[8:16]]


def test_micro_batch_pattern():
    global_batch = np.arange(100, 116)  # 16 samples, dp 2, micro-batch 4: 2 micro-batches per rank
    rank_0 = micro_batches(global_batch, dp_size=2, dp_rank=0, micro_batch_size=4)
    rank_1 = micro_batches(global_batch, dp_size=2, dp_rank=1, micro_batch_size=4)
    assert [m.tolist() for m in rank_0] == [[100, 101, 102, 103], [108, 109, 110, 111]]
    assert [m.tolist() for m in rank_1] == [[104, 105, 106, 107], [112, 113, 114, 115]]


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_every_layout_trains_on_the_same_global_batch(micro_batch_size):
    global_batch = GlobalBatchSampler(NUM_SAMPLES, 16, SEED).next_global_batch()
    for dp_size in (1, 2, 4):
        per_rank = [
            micro_batches(global_batch, dp_size=dp_size, dp_rank=d, micro_batch_size=micro_batch_size)
            for d in range(dp_size)
        ]
        assert all(len(m) == 16 // (dp_size * micro_batch_size) for m in per_rank)
        # interleaving micro-batch j of every rank, in rank order, restores the global batch exactly
        restored = np.concatenate([per_rank[d][j] for j in range(len(per_rank[0])) for d in range(dp_size)])
        assert restored.tolist() == global_batch.tolist()


def test_indivisible_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp_size = 6"):
        micro_batches(np.arange(16), dp_size=3, dp_rank=0, micro_batch_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        micro_batches(np.arange(16), dp_size=2, dp_rank=2, micro_batch_size=2)
