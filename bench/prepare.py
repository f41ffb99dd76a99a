"""`pangu prepare` against the minimal preparation a user would write, in the same run.

For each corpus size (a synthetic corpus from bench/corpus.py: real People's Daily sentences in
new documents, 10% exact and 5% near duplicates planted) and each process count, runs

- the baseline: a `multiprocessing.Pool` applying the same jieba + SentencePiece tokenization
  (the PanGu scheme, written here from scratch: no pangu code) to every JSON line, the parent
  writing the token arrays to one .bin and the document lengths to a .npy;
- `pangu prepare` with data.num_proc = N (cleaning, exact deduplication, train/valid split,
  shards, index cache), from a fresh directory;

alternately, each in its own process, and prints input MB/s, tokens/s, peak RSS (the largest
process, and the whole process tree, sampled every 0.1 s) and the ratios pangu / baseline. Then,
on the largest prepared set, the start-up of training's data loading per rank (load_prepared for
both splits, the sampler, the first global batch), R ranks at once, and what building the epoch
permutation costs without the cache; and a projection for 1.1 TB on 64 nodes x 64 cores.

    python bench/prepare.py --sizes 0.25GB,1GB --procs 1,2 [--work /tmp/pangu-bench] [--ranks 2]

Run it with `nice -n 10` on a shared machine; absolute rates depend on the machine, the ratios
are the result.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / "shared" / "pangu-alpha-release" / "vocab.model"

# ---------------------------------------------------------------------------------------------
# The baseline: what a user writes with multiprocessing, jieba and sentencepiece.

_sp = None
_eod = 0


def _init_baseline(model_file: str) -> None:
    global _sp, _eod
    import jieba
    import sentencepiece as spm

    jieba.setLogLevel(60)
    jieba.initialize()
    _sp = spm.SentencePieceProcessor(model_file=model_file)
    _eod = _sp.piece_to_id("<eot>")


def _encode_line(line: str):
    import jieba
    import numpy as np

    text = json.loads(line)["text"]
    words = (w.replace(" ", "\u2582").replace("\n", "\u2583") for w in jieba.cut(text))
    ids = _sp.encode(" ".join(words))
    ids.append(_eod)
    return np.asarray(ids, dtype=np.uint16)


def baseline(input_dir: Path, out_dir: Path, procs: int) -> dict:
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = []
    tokens = 0
    with (
        multiprocessing.Pool(procs, initializer=_init_baseline, initargs=(str(VOCAB),)) as pool,
        open(out_dir / "tokens.bin", "wb") as out,
    ):
        for path in sorted(input_dir.glob("*.jsonl")):
            with open(path, encoding="utf-8") as lines:
                for ids in pool.imap(_encode_line, lines, chunksize=64):
                    out.write(ids.tobytes())
                    lengths.append(len(ids))
                    tokens += len(ids)
    np.save(out_dir / "lengths.npy", np.asarray(lengths, dtype=np.int64))
    return {"documents": len(lengths), "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# Measuring a command: wall time and peak memory of its process tree


_WRAPPER = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"cpu_seconds": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(code)
"""


def measure(command: list[str], env: dict[str, str]) -> dict:
    """Wall time, CPU time of the whole process tree (every process waited for: getrusage of the
    children), peak RSS of the largest process and of the tree (sampled every 0.1 s)."""
    import tempfile

    import psutil

    usage_file = tempfile.mktemp(suffix=".json")
    command = [sys.executable, "-c", _WRAPPER, usage_file, *command]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak_tree = peak_one = 0
    while process.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
            sizes = []
            for member in members:
                try:
                    sizes.append(member.memory_info().rss)
                except psutil.Error:
                    pass
            peak_tree, peak_one = max(peak_tree, sum(sizes)), max([peak_one, *sizes])
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[4:])} failed:\n{stderr[-3000:]}")
    usage = json.loads(Path(usage_file).read_text())
    os.unlink(usage_file)
    return {
        "seconds": seconds,
        "cpu_seconds": usage["cpu_seconds"],
        "peak_rss_tree": peak_tree,
        "peak_rss_process": max(peak_one, usage["maxrss_kib"] * 1024),
        "stdout": stdout,
    }


def run_baseline(corpus: Path, out: Path, procs: int, env: dict[str, str]) -> dict:
    result = measure([sys.executable, __file__, "--baseline-run", str(corpus), str(out), str(procs)], env)
    result.update(json.loads(result.pop("stdout").strip().splitlines()[-1]))
    return result


def run_pangu(corpus: Path, out: Path, procs: int, env: dict[str, str]) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    config = out.with_suffix(".yaml")
    config.write_text(
        json.dumps(
            {
                "data": {
                    "sources": [{"kind": "jsonl", "path": str(corpus)}],
                    "tokenizer": {"kind": "pangu", "path": str(VOCAB)},
                    "prepared_dir": str(out),
                    "num_proc": procs,
                    # pieces of 8MB: enough of them for every worker on the small sizes too (the
                    # corpus's files are 32MB; a file larger than a piece is cut into pieces)
                    "piece_size": "8MB",
                },
                "model": {"vocab_size": 40000, "seq_length": 1024},
            }
        )
    )
    result = measure([sys.executable, "-m", "pangu", "prepare", "--config", str(config)], env)
    report = json.loads(result.pop("stdout"))
    totals = report["totals"]
    result.update(
        documents=totals["train"]["documents"] + totals["valid"]["documents"],
        tokens=totals["train"]["tokens"] + totals["valid"]["tokens"],
        duplicates=report["sources"][0]["cleaning"]["duplicate"],
    )
    return result


# ---------------------------------------------------------------------------------------------
# Start-up of training's data loading


_STARTUP = """
import json, sys, time
started = time.perf_counter()
from pangu.data.prepare import index_cache_dir, load_prepared
from pangu.data.sampler import GlobalBatchSampler
imported = time.perf_counter()
prepared, seq_length, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
train, meta = load_prepared(prepared, "train", seq_length)
valid, _ = load_prepared(prepared, "valid", seq_length)
sampler = GlobalBatchSampler(len(train), batch, seed=1234, cache_dir=index_cache_dir(prepared))
ids = sampler.next_global_batch()
samples = [train[int(i)] for i in ids]
done = time.perf_counter()
print(json.dumps({"seconds": done - imported, "import_seconds": imported - started, "samples": len(train)}))
"""

_UNCACHED = """
import json, sys, time
from pangu.data.prepare import load_prepared
from pangu.data.sampler import GlobalBatchSampler
train, _ = load_prepared(sys.argv[1], "train", int(sys.argv[2]))
started = time.perf_counter()
GlobalBatchSampler(len(train), 8, seed=1234)._epoch_permutation(0)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def startup(prepared: Path, ranks: int, env: dict[str, str], seq_length: int = 1024, batch: int = 512) -> dict:
    command = [sys.executable, "-c", _STARTUP, str(prepared), str(seq_length), str(batch)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
    results = [json.loads(p.communicate()[0]) for p in processes]
    uncached = subprocess.run(
        [sys.executable, "-c", _UNCACHED, str(prepared), str(seq_length)], env=env, capture_output=True, text=True
    )
    return {
        "ranks": ranks,
        "per_rank_seconds": [round(r["seconds"], 3) for r in results],
        "import_seconds": round(max(r["import_seconds"] for r in results), 3),
        "samples": results[0]["samples"],
        "permutation_without_cache_seconds": round(json.loads(uncached.stdout)["seconds"], 3),
    }


def scaled_copy(prepared: Path, out: Path, tokens: int, shard_tokens: int = 2 * 10**9) -> Path:
    """A prepared directory as large as `tokens` training tokens without the disk: the real one's
    meta.json and tokenizer, its train split replaced by sparse shard files of `shard_tokens`
    tokens (start-up only stats them and maps what the first batch touches)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    meta = json.loads((prepared / "meta.json").read_text())
    shutil.copy(prepared / meta["tokenizer"]["file"], out / meta["tokenizer"]["file"])
    source = meta["sources"][0]
    meta["sources"] = [source]
    shards = []
    for k in range(-(-tokens // shard_tokens)):
        count = min(shard_tokens, tokens - k * shard_tokens)
        name = f"train-0-{k:05d}"
        with open(out / f"{name}.bin", "wb") as f:
            f.truncate(2 * count)  # uint16 tokens, all zero, no disk blocks
        shards.append({"shard": name, "documents": 1, "tokens": count})
    source["train"] = {"documents": len(shards), "tokens": tokens, "shards": shards}
    for entry in source["valid"]["shards"]:
        for suffix in (".bin", ".idx"):
            shutil.copy(prepared / f"{entry['shard']}{suffix}", out / f"{entry['shard']}{suffix}")
    (out / "meta.json").write_text(json.dumps(meta))
    return out


# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    text = text.strip().upper()
    return int(float(text[:-2]) * units[text[-2:]]) if text[-2:] in units else int(float(text))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-run":
        corpus, out, procs = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(baseline(corpus, out, procs)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.25GB,1GB")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--work", default="/tmp/pangu-bench-prepare")
    parser.add_argument("--ranks", type=int, default=2, help="processes loading the data at once for start-up")
    parser.add_argument("--skip", default="", help="size:procs pairs to leave out, e.g. 1GB:1")
    parser.add_argument(
        "--startup-tokens",
        type=float,
        default=0,
        help="also time start-up on a sparse copy of the largest set with this many training tokens "
        "(e.g. 2.5e11, PanGu-alpha's 1.1 TB): the first start (which builds the permutation) and the next",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from bench.corpus import write_corpus

    work = Path(args.work)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    skip = {tuple(item.split(":")) for item in args.skip.split(",") if item}
    rows = []
    largest = None
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        corpus = work / f"corpus-{size_text}"
        stats_file = work / f"corpus-{size_text}.json"
        if not stats_file.exists():
            stats = write_corpus(corpus, size)
            stats_file.write_text(json.dumps(stats.__dict__))
        stats = json.loads(stats_file.read_text())
        for procs in [int(p) for p in args.procs.split(",")]:
            if (size_text, str(procs)) in skip:
                continue
            base = run_baseline(corpus, work / "baseline-out", procs, env)
            ours = run_pangu(corpus, work / f"prepared-{size_text}", procs, env)
            row = {"size": size_text, "input_bytes": stats["bytes"], "procs": procs}
            for name, result in (("baseline", base), ("pangu", ours)):
                row[name] = {
                    "seconds": round(result["seconds"], 1),
                    "cpu_seconds": round(result["cpu_seconds"], 1),
                    "MB_per_s": round(stats["bytes"] / result["seconds"] / 1e6, 3),
                    "MB_per_cpu_s": round(stats["bytes"] / result["cpu_seconds"] / 1e6, 3),
                    "tokens_per_s": round(result["tokens"] / result["seconds"]),
                    "tokens": result["tokens"],
                    "peak_rss_process_MB": round(result["peak_rss_process"] / 2**20),
                    "peak_rss_tree_MB": round(result["peak_rss_tree"] / 2**20),
                }
            row["pangu"]["duplicates_removed"] = ours["duplicates"]
            row["planted_exact_duplicates"] = stats["exact_duplicates"]
            row["throughput_ratio"] = round(base["seconds"] / ours["seconds"], 3)
            row["cpu_efficiency_ratio"] = round(base["cpu_seconds"] / ours["cpu_seconds"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            largest = work / f"prepared-{size_text}"
    if largest is None and args.startup_tokens:  # the start-up figures only, on an earlier run's set
        largest = max(work.glob("prepared-*/"), key=lambda p: p.stat().st_mtime, default=None)
    if largest is not None:
        result = startup(largest, args.ranks, env)
        print(json.dumps({"startup": result}), flush=True)
        if args.startup_tokens:
            scaled = scaled_copy(largest, work / "scaled", int(args.startup_tokens))
            first, again = startup(scaled, args.ranks, env), startup(scaled, args.ranks, env)
            print(json.dumps({"startup_scaled": {"tokens": int(args.startup_tokens), "first": first, "again": again}}))
    summary(rows)


def summary(rows: list[dict]) -> None:
    print(
        f"\n{'size':>7} {'procs':>5} {'baseline MB/s':>13} {'pangu MB/s':>10} {'ratio':>6} {'MB/cpu-s ratio':>14} "
        f"{'pangu tok/s':>11} {'pangu RSS MB (largest / tree)':>30} {'baseline RSS MB':>16}"
    )
    for row in rows:
        ours, base = row["pangu"], row["baseline"]
        print(
            f"{row['size']:>7} {row['procs']:>5} {base['MB_per_s']:>13.3f} {ours['MB_per_s']:>10.3f} "
            f"{row['throughput_ratio']:>6.2f} {row['cpu_efficiency_ratio']:>14.2f} {ours['tokens_per_s']:>11} "
            f"{ours['peak_rss_process_MB']:>17} / {ours['peak_rss_tree_MB']:<10} "
            f"{base['peak_rss_process_MB']:>7} / {base['peak_rss_tree_MB']:<6}"
        )
    if rows:
        # per core: input MB per CPU-second of the whole prepare (every process, every step), which
        # a loaded shared machine does not distort; on 64 x 64 dedicated cores each worker has one
        per_core = max(r["pangu"]["MB_per_cpu_s"] for r in rows)
        cores = 64 * 64
        seconds = 1.1e12 / (per_core * 1e6 * cores)
        print(
            f"\nprojection for 1.1 TB on 64 nodes x 64 cores: {per_core:.3f} MB per CPU-second (measured here, "
            f"all steps) x {cores} cores = {per_core * cores / 1e3:.2f} GB/s -> {seconds / 60:.0f} min, "
            f"if those cores are as fast as these and the shared file system keeps up"
        )


if __name__ == "__main__":
    main()
