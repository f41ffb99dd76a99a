"""The trainer's data loader (pangu/pretrain/trainer.py: Batches): a rank reads only what it feeds,
one step ahead, and the loss is normalised by the tokens of the whole global batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch.distributed as dist

from pangu.config import load_config
from pangu.pretrain.trainer import Batches
from tests.helpers import TINY_CONFIG

META = {"pad_id": 6, "eod_id": 9}


class CountingDataset:
    """Sample i is 33 tokens, all i; every read is recorded."""

    def __init__(self):
        self.reads: list[int] = []

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        self.reads.append(i)
        return np.full(33, 10 + i, dtype=np.int64)


def _batches(dataset, *, dp=1, dp_rank=0, first=True, last=True):
    config = load_config(TINY_CONFIG, ["train.micro_batch_size=2", "train.global_batch_size=8", "model.seq_length=32"])
    topology = SimpleNamespace(
        dp=dp, dp_rank=dp_rank, is_first_stage=first, is_last_stage=last, data_parallel_host_group=dist.group.WORLD
    )
    engine = SimpleNamespace(reads_inputs=first, reads_labels=last)
    return Batches(dataset, config, topology, META, engine)


GLOBAL = np.arange(100, 108)


def test_a_rank_reads_only_its_data_parallel_share(single_process):
    dataset = CountingDataset()
    batches = _batches(dataset, dp=2, dp_rank=1, last=False)
    micro, _ = batches.for_step(GLOBAL)
    # micro-batch j of dp rank 1 is global_batch[(2j + 1) * 2 : ...]: samples 102, 103, 106, 107
    assert sorted(dataset.reads) == [102, 103, 106, 107]
    assert [m.input_ids[:, 0].tolist() for m in micro] == [[112, 113], [116, 117]]
    assert batches.order == [1, 3]  # the global micro-batches it runs, for DropoutSeeds


def test_middle_stages_read_nothing(single_process):
    dataset = CountingDataset()
    micro, tokens = _batches(dataset, first=False, last=False).for_step(GLOBAL)
    assert micro == [None] * 4 and tokens == 0 and dataset.reads == []


def test_the_next_step_is_read_ahead_and_used_only_if_it_is_the_one_asked_for(single_process):
    dataset = CountingDataset()
    batches = _batches(dataset)
    batches.prefetch(GLOBAL)
    batches._ahead[1].result()  # the background read is done
    assert sorted(dataset.reads) == GLOBAL.tolist()
    ahead, _ = batches.for_step(GLOBAL)
    assert sorted(dataset.reads) == GLOBAL.tolist()  # served from the read-ahead, not read again
    direct, _ = _batches(CountingDataset()).for_step(GLOBAL)
    for a, b in zip(ahead, direct):
        assert all(
            (x == y).all() for x, y in zip(a.inputs + (a.labels, a.loss_mask), b.inputs + (b.labels, b.loss_mask))
        )
    batches.prefetch(GLOBAL)
    other = GLOBAL + 50  # a rollback changed what comes next: the read-ahead is not used
    assert batches.for_step(other)[0][0].input_ids[0, 0] == 10 + 150


@pytest.mark.parametrize("pads", [0, 5])
def test_the_tokens_of_the_global_batch_are_counted(single_process, pads):
    class Padded(CountingDataset):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            sample[:pads] = META["pad_id"]
            return sample

    _, tokens = _batches(Padded()).for_step(GLOBAL)
    assert tokens == 8 * (32 - pads)  # every sample of the global batch, counted by the last stage
