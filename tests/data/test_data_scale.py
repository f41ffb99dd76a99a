"""Data at scale: the prepared directory does not depend on the number of processes or ranks,
memory does not grow with the corpus, a killed prepare resumes, near duplicates go, inputs are
read as streams in pieces, and the training indices are built once and cached."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bench.corpus import write_corpus
from pangu.config import Config, SourceConfig, load_config
from pangu.data.cache import IndexCache
from pangu.data.cleaning import Cleaner
from pangu.data.dataset import BlendedDataset, PackedDataset, _greedy_steps, blend_indices
from pangu.data.indexed import IndexedShard, ShardWriter
from pangu.data.prepare import prepare
from pangu.data.sampler import GlobalBatchSampler
from pangu.data.sources import iter_documents, iter_piece, plan_pieces
from tests.helpers import RELEASE, subprocess_env, torchrun_pangu

RELEASED_MODEL = RELEASE / "vocab.model"


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _settings(corpus: Path, prepared: Path, **data) -> dict:
    """A config (as YAML data) preparing `corpus` (a directory of jsonl files) into `prepared`."""
    settings = {
        "sources": [{"kind": "jsonl", "path": str(corpus)}],
        "tokenizer": {"kind": "pangu", "path": str(RELEASED_MODEL)},
        "prepared_dir": str(prepared),
        "num_proc": 1,
        "valid_fraction": 0.05,
        "piece_size": "16KB",
        "shard_size": "64KB",
        **data,
    }
    return {"data": settings, "model": {"seq_length": 64}}


def _config_file(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def _texts(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.open(encoding="utf-8")]


# ---------------------------------------------------------------------------------------------
# One output for any number of ranks and workers


@pytest.mark.slow
@pytest.mark.distributed
def test_prepare_is_bitwise_identical_for_1_2_and_3_ranks(tmp_path):
    corpus = tmp_path / "corpus"
    planted = write_corpus(corpus, 240_000, file_size=50_000, seed=1)
    assert planted.files >= 4 and planted.exact_duplicates > 10 and planted.near_duplicates > 5
    near = {"near_dedup": {"enabled": True}}
    reference = tmp_path / "one-process"
    report = prepare(
        load_config(_config_file(tmp_path / "ref.yaml", _settings(corpus, reference, **near))), progress=False
    )
    assert report["pieces"] > 10 and len(report["sources"][0]["train"]["shards"]) > 1
    # exact duplicates across files (hence across ranks) are removed once, as a sequential cleaner would
    _, sequential = Cleaner(Config().data.cleaning).clean(_texts(corpus))
    cleaning = report["sources"][0]["cleaning"]
    assert cleaning["duplicate"] == sequential.duplicate >= planted.exact_duplicates
    assert cleaning["near_duplicate"] >= 0.8 * planted.near_duplicates
    assert cleaning["kept"] == sequential.kept - cleaning["near_duplicate"]
    expected = _files(reference)
    for ranks, workers in ((1, 2), (2, 1), (3, 1)):
        out = tmp_path / f"ranks{ranks}-workers{workers}"
        config = _config_file(tmp_path / f"{out.name}.yaml", _settings(corpus, out, num_proc=workers, **near))
        result = torchrun_pangu(["prepare", "--config", str(config)], nproc=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        assert _files(out) == expected, (ranks, workers)
        printed = json.loads(result.stdout[result.stdout.index("{") :])  # rank 0 prints the report
        assert printed["sources"][0]["cleaning"] == cleaning
    assert not list(tmp_path.glob(".*"))  # every work directory removed


@pytest.mark.slow
@pytest.mark.distributed
def test_a_trained_tokenizer_and_its_shards_are_the_same_for_any_number_of_ranks(tmp_path):
    """The tokenizer's sample (the documents with the smallest hash, chosen across ranks) and its
    training do not depend on the layout; fewer sample documents than the corpus holds."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 150_000, file_size=50_000, seed=5)
    trained = {"tokenizer": {"kind": "train", "vocab_size": 600, "train_sentences": 60, "num_threads": 2}}
    reference = tmp_path / "one-process"
    report = prepare(
        load_config(_config_file(tmp_path / "ref.yaml", _settings(corpus, reference, **trained))), progress=False
    )
    assert report["totals"]["train"]["documents"] > 60 and report["vocab_size"] == 600
    out = tmp_path / "two-ranks"
    config = _config_file(tmp_path / "two.yaml", _settings(corpus, out, **trained))
    result = torchrun_pangu(["prepare", "--config", str(config)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(out) == _files(reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_input_found_by_one_rank_stops_every_rank_naming_the_file(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [json.dumps({"text": f"第{i}篇文档，讲的是北京的天气。"}, ensure_ascii=False) for i in range(50)]
    (corpus / "a.jsonl").write_text("\n".join(good) + "\n", encoding="utf-8")
    (corpus / "b.jsonl").write_text("\n".join(good[:3]) + '\n{"text": 12}\n', encoding="utf-8")  # piece 1: rank 1
    config = _config_file(tmp_path / "c.yaml", _settings(corpus, tmp_path / "prepared", piece_size="1MB"))
    result = torchrun_pangu(["prepare", "--config", str(config)], nproc=2)
    assert result.returncode != 0
    assert "pangu prepare: error: rank 1: data.sources[0]" in result.stderr and "b.jsonl: record 3" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "corpus"]  # nothing published, no work left


# ---------------------------------------------------------------------------------------------
# Memory


_MEASURED = """
import resource, subprocess, sys
code = "import sys; from pangu.config import load_config; from pangu.data.prepare import prepare; prepare(load_config(sys.argv[1]), progress=False)"
subprocess.run([sys.executable, "-c", code, sys.argv[1]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """The largest process of a prepare (the parent or a worker: getrusage of the children) of a
    corpus 4x larger stays within 10% of the 1x one. Holding the corpus (documents, token lists)
    would add tens of MB for 6 MB of text, well over 10% of a ~150 MB process."""
    peaks = {}
    for scale in (1, 4):
        corpus = tmp_path / f"corpus{scale}"
        write_corpus(corpus, scale * 1_500_000, file_size=400_000, seed=scale)
        settings = _settings(corpus, tmp_path / f"prepared{scale}", num_proc=2, piece_size="256KB", shard_size="1MB")
        config = _config_file(tmp_path / f"{scale}.yaml", settings)
        result = subprocess.run(
            [sys.executable, "-c", _MEASURED, str(config)], capture_output=True, text=True, env=subprocess_env()
        )
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[scale] = int(result.stdout.split()[-1])
    print("peak RSS (KiB) of the largest process, 1x and 4x:", peaks)
    assert peaks[4] <= 1.10 * peaks[1], peaks


# a prepare in one process that says how far a piece got every half second; prints its cleaning
# report and its peak RSS in KiB (measured from a small parent: a process forked from a large one,
# such as pytest's, reports that one's RSS as its own peak)
_MEASURED_LONG = """
import resource, subprocess, sys
code = (
    "import json, sys; import pangu.data.pieces; from pangu.config import load_config; "
    "from pangu.data.prepare import prepare; pangu.data.pieces._PROGRESS_SECONDS = 0.5; "
    "print(json.dumps(prepare(load_config(sys.argv[1]))['sources'][0]['cleaning']))"
)
done = subprocess.run([sys.executable, "-c", code, sys.argv[1]], check=True, stdout=subprocess.PIPE, text=True)
print(done.stdout.strip())
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_a_50_mb_line_keeps_memory_bounded_is_cut_and_shows_progress(tmp_path):
    """A text file holding one 50 MB line (here English, so that it is cut, cleaned and filtered
    but not tokenized) beside ordinary lines: the peak RSS of the process stays within 100 MB of a
    prepare of the ordinary lines alone (it was 30 times the line: 1.6 GB), the line is cut into
    documents of at most data.cleaning.max_document_size, and progress is shown while it is read."""
    from pangu.data.builtin import people_daily_file

    lines = [
        "".join(token.rsplit("/", 1)[0] for token in line.split())
        for line in people_daily_file().read_text(encoding="utf-8").splitlines()[:300]
        if line.strip()
    ]
    sentence = "The quick brown fox jumps over the lazy dog. "
    peaks, reports = {}, {}
    for name, long_line in (("ordinary", ""), ("long", sentence * (50_000_000 // len(sentence)))):
        corpus = tmp_path / name / "corpus.txt"
        corpus.parent.mkdir()
        with corpus.open("w", encoding="utf-8") as f:
            f.write(
                "\n".join(lines[:150]) + "\n" + (long_line + "\n" if long_line else "") + "\n".join(lines[150:]) + "\n"
            )
        settings = _settings(corpus, tmp_path / name / "prepared", valid_fraction=0.1, piece_size="64MB")
        settings["data"]["sources"] = [{"kind": "text", "path": str(corpus)}]
        config = _config_file(tmp_path / name / "config.yaml", settings)
        result = subprocess.run(
            [sys.executable, "-c", _MEASURED_LONG, str(config)], capture_output=True, text=True, env=subprocess_env()
        )
        assert result.returncode == 0, result.stderr[-3000:]
        *_, report, peak = result.stdout.splitlines()
        peaks[name], reports[name] = int(peak), json.loads(report)
        if long_line:
            assert "[prepare] piece 0 (" in result.stderr and "M characters read so far" in result.stderr
    print("peak RSS (KiB) without and with the 50 MB line:", peaks)
    assert peaks["long"] <= peaks["ordinary"] + 100 * 1024
    long, ordinary = reports["long"], reports["ordinary"]
    assert long["long_cut"] == 1 and 50 <= long["documents"] - ordinary["documents"] <= 60
    assert long["low_chinese_ratio"] - ordinary["low_chinese_ratio"] == long["documents"] - ordinary["documents"]
    assert long["kept"] == ordinary["kept"]


# ---------------------------------------------------------------------------------------------
# Resume


_SLOW_PREPARE = """
import sys, time
import pangu.data.prepare as prepare_module
from pangu.cli import entry
clean = prepare_module.clean_piece
def slow_clean(piece):
    time.sleep(0.3)
    return clean(piece)
prepare_module.clean_piece = slow_clean
entry(["prepare", "--config", sys.argv[1]])
"""


@pytest.mark.slow
def test_a_killed_prepare_resumes_and_gives_the_uninterrupted_result(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 60_000, file_size=30_000, seed=2)
    prepared = tmp_path / "prepared"
    # (a validation split that holds a sample: the 60 KB preparation must be trainable to be published)
    config = _config_file(tmp_path / "config.yaml", _settings(corpus, prepared, piece_size="8KB", valid_fraction=0.2))
    old = prepare(load_config(config), progress=False)
    before = _files(prepared)
    write_corpus(tmp_path / "more", 300_000, file_size=100_000, seed=3)
    for path in sorted((tmp_path / "more").iterdir()):
        path.rename(corpus / f"more-{path.name}")

    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PREPARE, str(config)], env=subprocess_env(), stderr=subprocess.PIPE
    )
    work = tmp_path / ".prepared.work"
    deadline = time.time() + 120
    while len(list(work.glob("*/pieces/*[0-9].json"))) < 4 and time.time() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    assert process.poll() is None, "prepare finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _files(prepared) == before  # the previous preparation is untouched, nothing half-published

    resumed = prepare(load_config(config), progress=False)
    assert resumed["reused"] is False and resumed["resumed_pieces"] >= 4 and "files" in resumed["reason"]
    assert resumed["input_fingerprint"] != old["input_fingerprint"]
    fresh = tmp_path / "fresh"
    prepare(
        load_config(
            _config_file(tmp_path / "fresh.yaml", _settings(corpus, fresh, piece_size="8KB", valid_fraction=0.2))
        ),
        progress=False,
    )
    assert _files(prepared) == _files(fresh)
    assert not work.exists()


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_ends_prepare_in_one_line_and_keeps_everything(tmp_path, signal_name):
    """The signal reaches the whole process group (a terminal's Ctrl-C, Slurm's preemption):
    the worker processes print nothing, pangu prints one line, the previous preparation is
    unchanged, and the pieces already done are kept."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 200_000, file_size=100_000, seed=2)
    prepared = tmp_path / "prepared"
    config = _config_file(tmp_path / "config.yaml", _settings(corpus, prepared, piece_size="64KB", num_proc=2))
    prepare(load_config(config), progress=False)
    before = _files(prepared)
    write_corpus(tmp_path / "more", 12_000_000, file_size=400_000, seed=3)
    for path in sorted((tmp_path / "more").iterdir()):
        path.rename(corpus / f"more-{path.name}")

    process = subprocess.Popen(
        [sys.executable, "-m", "pangu", "prepare", "--config", str(config)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a shell's background job starts with SIGINT ignored, and Python then keeps it ignored:
        # give prepare the disposition a terminal gives it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    work = tmp_path / ".prepared.work"
    deadline = time.time() + 120
    while len(list(work.glob("*/pieces/*[0-9].json"))) < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "prepare finished before it could be interrupted"
    os.killpg(process.pid, getattr(signal, signal_name))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and out == "" and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"pangu prepare: interrupted ({'Ctrl-C' if signal_name == 'SIGINT' else 'SIGTERM'}: ")
    assert f"{prepared} is as it was" in last and "the same command goes on from them" in last
    assert _files(prepared) == before
    assert len(list(work.glob("*/pieces/*[0-9].json"))) >= 4  # kept for the rerun (resuming: tested above)


# ---------------------------------------------------------------------------------------------
# Near duplicates


def test_near_duplicates_are_removed_and_reported_as_such(tmp_path):
    corpus = tmp_path / "corpus"
    planted = write_corpus(corpus, 120_000, file_size=40_000, seed=4)
    settings = _settings(corpus, tmp_path / "without", piece_size="32KB")
    without = prepare(load_config(_config_file(tmp_path / "a.yaml", settings)), progress=False)
    settings = _settings(corpus, tmp_path / "with", piece_size="32KB", near_dedup={"enabled": True})
    near = prepare(load_config(_config_file(tmp_path / "b.yaml", settings)), progress=False)
    plain, deduped = without["sources"][0]["cleaning"], near["sources"][0]["cleaning"]
    assert plain["near_duplicate"] == 0 and plain["duplicate"] == deduped["duplicate"] >= planted.exact_duplicates
    # the planted near duplicates (1 character in 100 changed) go; the new documents stay
    assert 0.8 * planted.near_duplicates <= deduped["near_duplicate"] <= 1.2 * planted.near_duplicates
    assert deduped["kept"] == plain["kept"] - deduped["near_duplicate"]


# ---------------------------------------------------------------------------------------------
# Deduplication's file opens


_opened: list[str] | None = None  # paths opened while a test counts them (Python's audit events)


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_open)


def _prepare_counting_dedup_opens(corpus: Path, prepared: Path, **settings) -> tuple[dict, int]:
    """A prepare in this process (data.num_proc 1) and how many times it opened a file of
    deduplication: a piece's keys, or anything under the work directory's dedup/."""
    global _opened
    config = load_config(_config_file(prepared.with_suffix(".yaml"), _settings(corpus, prepared, **settings)))
    _opened = []
    try:
        report = prepare(config, progress=False)
    finally:
        opened, _opened = _opened, None
    return report, sum(path.endswith(".keys") or f"{os.sep}dedup{os.sep}" in path for path in opened)


@pytest.mark.slow
def test_deduplication_opens_grow_with_pieces_plus_buckets_and_change_nothing(tmp_path, monkeypatch):
    """P pieces and B buckets, both 4 times as many: the opens of deduplication's files grow 4
    times (they were 2 P B: 16 times), and the result is the one of a single bucket."""
    import pangu.data.dedup as dedup

    settings = {"piece_size": "1KiB", "shard_size": "16KiB", "valid_fraction": 0.3}
    opens, pieces, buckets = [], [], []
    for size in (24_000, 96_000):
        corpus = tmp_path / f"corpus-{size}"
        write_corpus(corpus, size, file_size=size, seed=5)
        with monkeypatch.context() as patch:
            patch.setattr(dedup, "KEYS_PER_BUCKET", 4)  # a bucket per 2 KB of input
            report, count = _prepare_counting_dedup_opens(corpus, tmp_path / f"many-{size}", **settings)
            buckets.append(dedup.bucket_count(sum(f.stat().st_size for f in corpus.iterdir()), 1))
        opens.append(count)
        pieces.append(report["pieces"])
        one_bucket, _ = _prepare_counting_dedup_opens(corpus, tmp_path / f"one-{size}", **settings)
        assert one_bucket["sources"][0]["cleaning"]["duplicate"] > 0
        assert _files(tmp_path / f"many-{size}") == _files(tmp_path / f"one-{size}")
    print(f"pieces {pieces}, buckets {buckets}, opens of deduplication's files {opens}")
    assert pieces[1] >= 3.5 * pieces[0] and buckets[1] >= 3.5 * buckets[0] and buckets[0] >= 10
    assert opens[1] <= 5 * opens[0]
    assert all(count <= 8 * (p + b) for count, p, b in zip(opens, pieces, buckets))


# ---------------------------------------------------------------------------------------------
# Streaming readers and pieces


def test_pieces_of_any_size_read_every_document_once_in_order(tmp_path):
    texts = [f"第{i}篇文档" + "很长的内容" * (i % 7) for i in range(300)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    text_file = tmp_path / "docs.txt"
    text_file.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    for path, kind in ((jsonl, "jsonl"), (text_file, "text")):
        source = SourceConfig(kind=kind, path=str(path))
        for piece_size in (1, 7, 100, 1000, 1 << 30):
            pieces = plan_pieces([source], piece_size, 1 << 30)
            assert [d for p in pieces for d in iter_piece(p, source)] == texts, piece_size
    # compressed files are read as streams, one piece each
    for suffix, compression in ((".gz", "gzip"), (".zst", "zstd"), (".bz2", "bz2")):
        packed = tmp_path / f"packed.jsonl{suffix}"
        with pa.output_stream(str(packed), compression=compression) as out:
            out.write(jsonl.read_bytes())
        source = SourceConfig(kind="jsonl", path=str(packed))
        assert len(plan_pieces([source], 100, 1 << 30)) == 1
        assert list(iter_documents(source, 0)) == texts
    # parquet: runs of row groups
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts]), table, row_group_size=40)
    source = SourceConfig(kind="parquet", path=str(table))
    pieces = plan_pieces([source], 2000, 1 << 30)
    assert len(pieces) > 2
    assert [d for p in pieces for d in iter_piece(p, source)] == texts


def test_a_directory_source_reads_compressed_files_too(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "第一篇"}\n', encoding="utf-8")
    with pa.output_stream(str(tmp_path / "b.jsonl.zst"), compression="zstd") as out:
        out.write('{"text": "第二篇"}\n'.encode())
    source = SourceConfig(kind="jsonl", path=str(tmp_path))
    assert list(iter_documents(source, 0)) == ["第一篇", "第二篇"]


# ---------------------------------------------------------------------------------------------
# Training's view: several shards, the blend, the sampler's permutation


def test_packing_across_shards_is_packing_of_their_stream(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 1000, size=int(rng.integers(1, 40))) for _ in range(60)]
    shards = []
    for k, part in enumerate((documents[:5], documents[5:6], [], documents[6:])):
        with ShardWriter(tmp_path / f"s{k}", 1000) as writer:
            for document in part:
                writer.add_document(document)
        shards.append(IndexedShard(tmp_path / f"s{k}"))
    stream = np.concatenate(documents)
    packed = PackedDataset(shards, seq_length=9)
    assert len(packed) == len(stream) // 10
    for i in range(len(packed)):
        assert packed[i].tolist() == stream[i * 10 : (i + 1) * 10].tolist()


@pytest.mark.parametrize("weights", [(3.0, 1.0), (0.5, 0.3, 0.2), (0.37, 0.21, 0.29, 0.13), (1.0, 1.0)])
def test_vectorised_blend_is_the_greedy_rule_exactly(weights):
    sizes = [700, 90, 1500, 40][: len(weights)]
    dataset_index, sample_index = blend_indices(weights, sizes)
    expected = np.empty(sum(sizes), dtype=np.int32)
    _greedy_steps([w / sum(weights) for w in weights], [0] * len(weights), 0, sum(sizes), expected)
    assert np.array_equal(dataset_index, expected)
    drawn = [0] * len(weights)
    for k, d in enumerate(expected):
        assert sample_index[k] == drawn[d] % sizes[d]
        drawn[d] += 1


class _Constant:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array([i])


def test_blend_index_is_cached_rebuilt_when_the_blend_changes_and_reused_otherwise(tmp_path, monkeypatch):
    import pangu.data.dataset as dataset_module

    calls = []
    build = dataset_module.blend_indices
    monkeypatch.setattr(dataset_module, "blend_indices", lambda *a: calls.append(a) or build(*a))
    first = BlendedDataset([_Constant(50), _Constant(30)], [3.0, 1.0], cache_dir=IndexCache(tmp_path))
    assert isinstance(first.dataset_index, np.memmap) and len(calls) == 2  # built (both arrays)
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = BlendedDataset([_Constant(50), _Constant(30)], [3.0, 1.0], cache_dir=IndexCache(tmp_path))
    assert len(calls) == 2 and {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written
    assert np.array_equal(again.dataset_index, first.dataset_index)
    BlendedDataset([_Constant(50), _Constant(30)], [1.0, 1.0], cache_dir=IndexCache(tmp_path))  # another blend
    BlendedDataset([_Constant(50), _Constant(31)], [3.0, 1.0], cache_dir=IndexCache(tmp_path))  # other shards
    assert len(calls) == 6 and len(list(tmp_path.iterdir())) == 6
    uncached = BlendedDataset([_Constant(50), _Constant(30)], [3.0, 1.0])
    assert np.array_equal(uncached.dataset_index, first.dataset_index)


@pytest.mark.parametrize("size", [1, 2, 1000, 123457])
def test_the_sampler_permutation_is_numpy_permutation_of_n(size):
    """What exact resume relies on: the order the sampler used before it stored 4-byte indices."""
    for epoch in (0, 3):
        expected = np.random.default_rng([7, epoch]).permutation(size)
        assert np.array_equal(GlobalBatchSampler(size, 1, seed=7)._epoch_permutation(epoch), expected)


def test_sampler_permutation_is_cached_and_the_same_as_without_cache(tmp_path, monkeypatch):
    plain = GlobalBatchSampler(1000, 64, seed=7)
    cached = GlobalBatchSampler(1000, 64, seed=7, cache_dir=IndexCache(tmp_path))
    for _ in range(40):  # across epochs
        assert np.array_equal(plain.next_global_batch(), cached.next_global_batch())
    assert len(list(tmp_path.glob("permutation-*.npy"))) == 3  # epochs 0, 1, 2
    expected = plain.next_global_batch()
    monkeypatch.setattr(GlobalBatchSampler, "_build_permutation", lambda self, epoch: pytest.fail("rebuilt"))
    resumed = GlobalBatchSampler.from_state_dict(cached.state_dict(), 1000, 64, cache_dir=IndexCache(tmp_path))
    assert np.array_equal(resumed.next_global_batch(), expected)  # mapped from the cache, not rebuilt
    monkeypatch.undo()
    GlobalBatchSampler(
        1000, 64, seed=8, cache_dir=IndexCache(tmp_path)
    ).next_global_batch()  # another seed: another file
    assert len(list(tmp_path.glob("permutation-*.npy"))) == 4
    for damaged in tmp_path.glob("permutation-*.npy"):
        damaged.write_bytes(damaged.read_bytes()[:100])
    for seed in (7, 8):  # a damaged file is rebuilt, not trusted
        assert np.array_equal(
            GlobalBatchSampler(1000, 64, seed=seed, cache_dir=IndexCache(tmp_path)).next_global_batch(),
            GlobalBatchSampler(1000, 64, seed=seed).next_global_batch(),
        )


# a process that needs the index array `test` of DIRECTORY: it says when it is about to ask, records
# in BUILDS each time it builds the array itself, and prints what it got
_NEEDS_INDEX = """
import os, sys, time
from pathlib import Path
import numpy as np
from pangu.data.cache import IndexCache, cached_array

directory, builds, build_seconds, wait_minutes = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

def build():
    with open(builds, "a") as f:
        f.write(f"{os.getpid()}\\n")
    print("building", flush=True)
    time.sleep(build_seconds)
    return np.arange(100_000, dtype=np.int64)

print("asking", flush=True)
array = cached_array(IndexCache(directory, wait_minutes), "test", {"rule": "arange"}, 100_000, build)
print(type(array).__name__, int(array.sum()), flush=True)
"""


def _needs_index(directory: Path, builds: Path, build_seconds: float = 1.0, wait_minutes: float = 1.0):
    return subprocess.Popen(
        [sys.executable, "-c", _NEEDS_INDEX, str(directory), str(builds), str(build_seconds), str(wait_minutes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def test_one_process_builds_an_index_and_the_others_map_it(tmp_path):
    """Six plain processes (ranks of one job, or independent jobs on one prepared directory) ask
    for the same missing index at once: one builds it, the others wait for it and map it."""
    builds = tmp_path / "builds"
    processes = [_needs_index(tmp_path / "cache", builds) for _ in range(6)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, [err for _, err in outputs]
    assert all(out.splitlines()[-1] == f"memmap {sum(range(100_000))}" for out, _ in outputs)
    assert len(builds.read_text().splitlines()) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [next((tmp_path / "cache").glob("test-*.npy")).name]


def test_a_builder_that_dies_is_replaced_and_a_stuck_one_is_named(tmp_path):
    builds = tmp_path / "builds"
    builder = _needs_index(tmp_path / "cache", builds, build_seconds=600)
    try:
        assert builder.stdout.readline() == "asking\n" and builder.stdout.readline() == "building\n"
        stuck = _needs_index(tmp_path / "cache", builds, wait_minutes=0.02)
        _, err = stuck.communicate(timeout=120)
        assert stuck.returncode == 1 and f"pid {builder.pid} is building" in err and "DataError" in err
        waiter = _needs_index(tmp_path / "cache", builds)
        assert waiter.stdout.readline() == "asking\n"
        time.sleep(1.0)  # it finds the lock held and waits
    finally:
        builder.kill()
        builder.wait()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert f"pid {builder.pid} stopped before it finished building" in err
    assert out.splitlines()[-1] == f"memmap {sum(range(100_000))}"
    assert builds.read_text().splitlines() == [str(builder.pid), str(waiter.pid)]
