"""Token shards on disk, packing into samples, blending sources, and batch construction."""

import shutil

import numpy as np
import pytest
import torch

from pangu.data import DataError
from pangu.data.dataset import BlendedDataset, PackedDataset, make_batch, read_samples
from pangu.data.indexed import IndexedShard, ShardTokens, ShardWriter
from tests.helpers import run_pretrain, tiny_overrides

PAD, EOD = 6, 9


def _write_shard(prefix, documents, vocab_size=40000):
    with ShardWriter(prefix, vocab_size) as writer:
        for document in documents:
            writer.add_document(document)
    return IndexedShard(prefix)


# ---------------------------------------------------------------------------------------------
# Shards


@pytest.mark.parametrize("vocab_size, dtype", [(40000, np.uint16), (70000, np.int32)])
def test_shard_round_trip(tmp_path, vocab_size, dtype):
    documents = [[1, 2, 3], [], [vocab_size - 1, 0], list(range(100, 1100))]
    shard = _write_shard(tmp_path / "s", documents, vocab_size)
    assert len(shard) == 4
    assert shard.num_tokens == 1005
    assert shard.tokens.dtype == dtype and isinstance(shard.tokens, np.memmap)
    assert [shard.doc(i).tolist() for i in range(4)] == documents
    assert shard.doc(-1).tolist() == documents[-1]
    assert shard.tokens.tolist() == [t for d in documents for t in d]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]  # no temporary files left
    with pytest.raises(IndexError):
        shard.doc(4)


def test_a_token_outside_the_model_s_vocabulary_names_its_shard_and_sample(tmp_path):
    """A shard of another tokenizer (or a damaged one) is caught on the host, per batch, before
    the embedding sees the id (an IndexError on the CPU, a device-side assert on a GPU)."""
    first = _write_shard(tmp_path / "a", [[100] * 5 + [700] + [100] * 24], vocab_size=65535)
    second = _write_shard(tmp_path / "b", [[5] * 3 + [600] + [5] * 26], vocab_size=65535)
    packed = PackedDataset([first, ShardTokens(tmp_path / "b", second.num_tokens, 65535)], seq_length=11)
    assert read_samples(packed, [1, 3], vocab_size=600).shape == (2, 12)  # samples 0 and 2 are not read
    with pytest.raises(DataError, match=rf"token 5 of sample 0 \({tmp_path}/a.bin, its token 5\) is token id 700, "):
        read_samples(packed, [1, 0], vocab_size=600)
    # sample 2 spans both shards
    with pytest.raises(DataError, match=rf"token 9 of sample 2 \({tmp_path}/b.bin, its token 3\) .*vocabulary of 600"):
        read_samples(packed, [2], vocab_size=600)
    assert read_samples(packed, [2], vocab_size=601)[0, 9] == 600
    blend = BlendedDataset([packed, PackedDataset(second, seq_length=11)], [1.0, 1.0])
    k = next(k for k in range(len(blend)) if blend.dataset_index[k] == 0 and blend.dataset_sample_index[k] == 2)
    with pytest.raises(DataError, match=rf"token 9 of sample {k} \({tmp_path}/b.bin, its token 3\)"):
        read_samples(blend, [k], vocab_size=600)


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        with ShardWriter(tmp_path / "s", vocab_size=100) as writer:
            writer.add_document([1, 100])


def test_a_failed_write_leaves_the_previous_shard_intact(tmp_path):
    _write_shard(tmp_path / "s", [[1, 2, 3]])
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s", 40000) as writer:
            writer.add_document([7, 7, 7, 7])
            raise RuntimeError("interrupted")
    assert IndexedShard(tmp_path / "s").tokens.tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


def test_truncated_bin_is_detected_on_open(tmp_path):
    _write_shard(tmp_path / "s", [list(range(1, 50))])
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"s\.bin.*truncated.*pangu prepare"):
        IndexedShard(tmp_path / "s")


@pytest.mark.parametrize("position", [0, 20, 40, -1])
def test_corrupt_idx_is_detected_on_open(tmp_path, position):
    _write_shard(tmp_path / "s", [[1, 2], [3, 4, 5]])
    data = bytearray((tmp_path / "s.idx").read_bytes())
    data[position] ^= 0xFF
    (tmp_path / "s.idx").write_bytes(bytes(data))
    # the header and the sizes are checked on open (O(1)); the offsets and the CRC by verify()
    with pytest.raises(DataError, match=r"s\.idx.*damaged.*pangu prepare"):
        IndexedShard(tmp_path / "s", verify=position in (40, -1))


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.idx.*missing"):
        IndexedShard(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Packing and blending


def test_packing_cuts_non_overlapping_samples_and_drops_the_tail(tmp_path):
    shard = _write_shard(tmp_path / "s", [list(range(10, 20)), list(range(20, 33))])  # 23 tokens
    packed = PackedDataset(shard, seq_length=4)
    assert len(packed) == 4  # 4 samples of 5 tokens; the last 3 tokens are dropped
    assert packed[0].tolist() == [10, 11, 12, 13, 14]
    assert packed[1].tolist() == [15, 16, 17, 18, 19]
    assert packed[3].tolist() == [25, 26, 27, 28, 29]
    assert packed[0].dtype == np.int64
    with pytest.raises(IndexError):
        packed[4]


class _Constant:
    """A dataset whose sample i is [tag, i]."""

    def __init__(self, tag: int, size: int) -> None:
        self.tag, self.size = tag, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        assert 0 <= i < self.size
        return np.array([self.tag, i])


def test_blending_keeps_every_prefix_in_proportion():
    blend = BlendedDataset([_Constant(0, 500), _Constant(1, 100)], weights=[3.0, 1.0])
    assert len(blend) == 600
    sources = np.array([blend[k][0] for k in range(len(blend))])
    for k in range(1, len(blend) + 1):
        assert abs((sources[:k] == 1).sum() - 0.25 * k) <= 1
    # source 1 is drawn 150 times but has 100 samples: it starts over, in order
    drawn_from_1 = [blend[k][1] for k in range(len(blend)) if sources[k] == 1]
    assert drawn_from_1 == list(range(100)) + list(range(50))


def test_blending_is_deterministic():
    make = lambda: BlendedDataset([_Constant(0, 70), _Constant(1, 50), _Constant(2, 30)], [0.5, 0.3, 0.2])
    assert np.array_equal(make().dataset_index, make().dataset_index)


# ---------------------------------------------------------------------------------------------
# Batches


SAMPLES = np.array(
    [
        [11, 12, EOD, 21, 22, 23, EOD, 31, 32],
        [41, 42, 43, 44, EOD, PAD, PAD, PAD, PAD],
    ]
)


def test_batch_shifts_labels_and_masks_pad_inputs():
    batch = make_batch(SAMPLES, pad_id=PAD, eod_id=EOD, eod_reset=False)
    assert batch["input_ids"].tolist() == SAMPLES[:, :-1].tolist()
    assert batch["labels"].tolist() == SAMPLES[:, 1:].tolist()
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int64
    assert batch["loss_mask"].dtype == np.float32
    assert batch["loss_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert "document_ids" not in batch  # plain causal


def test_eod_reset_restarts_positions_and_blocks_attention_by_document():
    batch = make_batch(SAMPLES, pad_id=PAD, eod_id=EOD, eod_reset=True)
    # the separator belongs to the document it ends; the next token starts again at 0
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    documents = [[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 2, 2, 2]]
    assert batch["document_ids"].tolist() == documents and batch["document_ids"].dtype == np.int32
    # the model's mask from them: query i attends key j when j <= i in the same document
    from pangu.model.pangu_alpha import document_mask

    mask = document_mask(torch.from_numpy(batch["document_ids"]))
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(8):
            for j in range(8):
                assert mask[b, 0, i, j] == (j <= i and documents[b][i] == documents[b][j]), (b, i, j)


@pytest.mark.slow
def test_training_on_a_shard_with_foreign_token_ids_stops_with_one_line(tiny_corpus, tmp_path):
    """The trainer reads every global batch through `read_samples`: a shard whose ids exceed the
    model's vocabulary ends the run before the first step, naming the shard, exit status 2."""
    corpus = tmp_path / "prepared"
    shutil.copytree(tiny_corpus, corpus)
    shard = corpus / "train-0-00000.bin"
    shard.write_bytes(np.full(shard.stat().st_size // 2, 700, dtype=np.uint16).tobytes())  # the model has 600
    result = run_pretrain(tiny_overrides(corpus, tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "train-0-00000.bin, its token" in result.stderr
        and "is token id 700, outside the model's vocabulary of 600" in result.stderr
    )
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    )
