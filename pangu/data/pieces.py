"""What a worker process of `prepare` does, one piece (or one shard) at a time, streaming.

`clean_piece` (every piece): read the piece's documents, normalise and filter them
(`Cleaner.reject`); for each candidate that passes, record its split, size and keys, and write its
tokens (a released tokenizer) or its text (a tokenizer still to be trained). `tokenize_piece`
(a trained tokenizer only): the candidates' text -> tokens. `write_shard`: the kept candidates
(dedup's verdicts applied) of a run of pieces -> one shard file per split.

A piece's results live in the work directory under its number and are finished by an atomic
rename of `NNNNNN.json` (`NNNNNN.tok.json` for `tokenize_piece`): a file set without it is an
interrupted attempt, redone by the next run. Memory per worker: one batch of documents, the
piece's per-candidate arrays (a few tens of bytes per document) and its keys.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pangu.config import CleaningConfig, NearDedupConfig, SourceConfig
from pangu.data.cleaning import Cleaner, hash_fraction, text_key
from pangu.data.dedup import DedupPlan, keys_array, removed_documents, write_keys
from pangu.data.indexed import ShardWriter, dtype_for_vocab
from pangu.data.minhash import MinHasher
from pangu.data.prepared import Counts
from pangu.data.sources import Piece, iter_piece
from pangu.data.tokenizer import PanguTokenizer, load_jieba
from pangu.files import atomic_writer, write_json_atomic
from pangu.schema import ConfigError, from_dict

DOC_DTYPE = np.dtype([("chars", "<i8"), ("text_end", "<i8"), ("valid", "u1"), ("sample", "<u8")])
_VALID_SALT = "valid"
_BATCH_DOCUMENTS = 256
_BATCH_BYTES = 4 << 20
_COPY_TOKENS = 4 << 20  # tokens copied at a time when writing a shard
_PROGRESS_SECONDS = 10  # a piece that takes longer says how far it got, this often
R = TypeVar("R")


def is_validation_document(text: str, valid_fraction: float) -> bool:
    """The validation split: a fixed fraction of the cleaned documents, picked by a hash of the
    text (so a document and its exact repeats always land in the same split)."""
    return hash_fraction(text, _VALID_SALT) < valid_fraction


def sample_hash(text: str, salt: str) -> int:
    """uint64 fixed by the text: the tokenizer trains on the documents with the smallest."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, sent once to each worker process."""

    work_dir: str
    sources: tuple[SourceConfig, ...]
    cleaning: CleaningConfig
    near_dedup: NearDedupConfig
    valid_fraction: float
    max_document_bytes: int
    dedup: DedupPlan  # no buckets: no deduplication
    sample_salt: str  # "" unless a tokenizer is trained
    tokenizer: PanguTokenizer | None  # the released one, known before any piece is read
    progress: bool  # say how far a long piece got (rank 0 only)


# What a finished step wrote for a piece or a shard (`NNNNNN.json`, `NNNNNN.tok.json`,
# `shards/S-KKKKK.json`): read back through the typed loader; a record that is missing or not
# one of these means the step is done again.


@dataclass
class PieceRecord:
    documents: int
    too_long: int
    invalid_unicode: int
    too_short: int
    low_chinese_ratio: int
    long_cut: int
    candidates: int
    tokenized: bool
    input_bytes: int
    seconds: float


@dataclass
class TokenizedRecord:
    seconds: float


@dataclass
class ShardRecord:
    train: Counts
    valid: Counts
    duplicate: int
    near_duplicate: int
    kept: int
    kept_characters: int
    seconds: float


def read_record(path: Path, kind: type[R]) -> R | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return from_dict(kind, raw, "", str(path))
    except (OSError, ValueError, ConfigError):
        return None


def write_record(path: Path, record: Any) -> None:
    write_json_atomic(path, asdict(record))


_job: Job | None = None
_cleaner: Cleaner | None = None
_hasher: MinHasher | None = None


def init_worker(job: Job) -> None:
    """Pool initializer (and the single-process path): the job, jieba's dictionary, the cleaner."""
    global _job, _cleaner, _hasher
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _job = job
    _cleaner = Cleaner(job.cleaning)
    _hasher = MinHasher(job.near_dedup) if job.near_dedup.enabled else None
    load_jieba()


def piece_path(work_dir: str | Path, piece: int, suffix: str) -> Path:
    return Path(work_dir) / "pieces" / f"{piece:06d}{suffix}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as f:
        np.save(f, array)


def clean_piece(piece: Piece) -> dict[str, Any]:
    """Phase 1 for one piece; returns its record (also written as NNNNNN.json)."""
    job, cleaner = _job, _cleaner
    assert job is not None and cleaner is not None, "init_worker first"
    started = last_said = time.perf_counter()
    base = piece_path(job.work_dir, piece.index, "")
    dedup = job.dedup.buckets > 0
    counts: Counter[str] = Counter()  # documents, and what each filter removed
    docs: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    ntokens: list[np.ndarray] = []
    text_bytes = 0
    read_characters = 0
    batch: list[str] = []
    batch_size = 0
    # exact repeats inside the piece: certain to be removed, so neither tokenized nor MinHashed
    # (their text key still goes to deduplication, which removes and counts them)
    seen: set[bytes] = set()

    def flush(stream) -> None:
        nonlocal text_bytes, batch_size
        first = sum(len(d) for d in docs)
        meta = np.zeros(len(batch), dtype=DOC_DTYPE)
        batch_keys: list[bytes] = []
        key_docs: list[int] = []
        key_near: list[bool] = []
        work: list[str] = []  # the texts to tokenize or write: repeats become ""
        for i, text in enumerate(batch):
            meta["chars"][i] = len(text)
            meta["valid"][i] = is_validation_document(text, job.valid_fraction)
            if job.sample_salt:
                meta["sample"][i] = sample_hash(text, job.sample_salt)
            repeat = False
            if job.cleaning.deduplicate:
                key = text_key(text)
                repeat = key in seen
                seen.add(key)
                batch_keys.append(key)
                key_docs.append(first + i)
                key_near.append(False)
            if _hasher is not None and not repeat:
                bands = _hasher.keys(text)
                batch_keys += bands
                key_docs += [first + i] * len(bands)
                key_near += [True] * len(bands)
            work.append("" if repeat else text)
        docs.append(meta)
        if dedup:
            keys.append(keys_array(batch_keys, key_docs, key_near))
        if job.tokenizer is not None:
            tokens, lengths = encode(job.tokenizer, work, skip_empty=True)
            stream.write(tokens.tobytes())
            ntokens.append(lengths)
        else:
            encoded = [text.encode("utf-8") for text in work]
            meta["text_end"] = text_bytes + np.cumsum([len(raw) for raw in encoded])
            text_bytes = int(meta["text_end"][-1])
            stream.write(b"".join(encoded))
        batch.clear()
        batch_size = 0

    tally: Counter[str] = Counter()  # what the reader cut or skipped
    with atomic_writer(base.with_suffix(".tok" if job.tokenizer else ".txt")) as stream:
        source = job.sources[piece.source]
        for raw in iter_piece(piece, source, max_document_bytes=job.max_document_bytes, tally=tally):
            counts["documents"] += 1
            read_characters += len(raw)
            text, reason = cleaner.check(raw)
            if reason is not None:
                counts[reason] += 1
            else:
                batch.append(text)
                batch_size += len(text)
                if len(batch) >= _BATCH_DOCUMENTS or 3 * batch_size >= _BATCH_BYTES:
                    flush(stream)
            if job.progress and time.perf_counter() - last_said >= _PROGRESS_SECONDS:
                last_said = time.perf_counter()
                print(
                    f"[prepare] piece {piece.index} ({piece.path}): {counts['documents']} documents, "
                    f"{read_characters / 1e6:.1f}M characters read so far",
                    file=sys.stderr,
                    flush=True,
                )
        if batch:
            flush(stream)
    meta = np.concatenate(docs) if docs else np.zeros(0, dtype=DOC_DTYPE)
    _save_npy(base.with_suffix(".docs.npy"), meta)
    if dedup:
        write_keys(
            base.with_suffix(".keys"), np.concatenate(keys) if keys else keys_array([], [], []), job.dedup.buckets
        )
    if job.tokenizer is not None:
        _save_npy(base.with_suffix(".ntok.npy"), np.concatenate(ntokens) if ntokens else np.zeros(0, np.int64))
    record = PieceRecord(
        documents=counts["documents"] + tally["too_long"],  # records skipped unread were documents too
        too_long=tally["too_long"],
        invalid_unicode=counts["invalid_unicode"],
        too_short=counts["too_short"],
        low_chinese_ratio=counts["low_chinese_ratio"],
        long_cut=tally["long_cut"],
        candidates=len(meta),
        tokenized=job.tokenizer is not None,
        input_bytes=piece.size,
        seconds=round(time.perf_counter() - started, 3),
    )
    write_record(base.with_suffix(".json"), record)
    return {"piece": piece.index, **asdict(record)}


def encode(tokenizer: PanguTokenizer, texts: list[str], skip_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The texts' tokens, each document followed by the separator, flat in the shard dtype; and
    each document's token count. With `skip_empty`, "" (a repeat left out) gives no tokens at all."""
    encoded = tokenizer.encode_batch(texts)
    for text, ids in zip(texts, encoded):
        if text or not skip_empty:
            ids.append(tokenizer.eod_id)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    return flat.astype(dtype_for_vocab(tokenizer.vocab_size)), lengths


def tokenize_piece(piece: int, tokenizer: PanguTokenizer) -> dict[str, Any]:
    """Phase 3 of a trained tokenizer: the piece's candidates (text written by clean_piece) -> tokens."""
    assert _job is not None, "init_worker first"
    started = time.perf_counter()
    base = piece_path(_job.work_dir, piece, "")
    ends = np.load(base.with_suffix(".docs.npy"))["text_end"]
    lengths = []
    with open(base.with_suffix(".txt"), "rb") as texts, atomic_writer(base.with_suffix(".tok")) as stream:
        for first in range(0, len(ends), _BATCH_DOCUMENTS):
            stop = min(first + _BATCH_DOCUMENTS, len(ends))
            start_byte = int(ends[first - 1]) if first else 0
            blob = texts.read(int(ends[stop - 1]) - start_byte)
            cuts = ends[first:stop] - start_byte
            batch = [blob[a:b].decode("utf-8") for a, b in zip(np.concatenate([[0], cuts[:-1]]), cuts)]
            tokens, counts = encode(tokenizer, batch, skip_empty=True)
            stream.write(tokens.tobytes())
            lengths.append(counts)
    _save_npy(base.with_suffix(".ntok.npy"), np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
    record = TokenizedRecord(seconds=round(time.perf_counter() - started, 3))
    write_record(base.with_suffix(".tok.json"), record)
    return {"piece": piece, **asdict(record)}


def kept_mask(plan: DedupPlan, piece: int) -> tuple[np.ndarray, dict[str, int]]:
    """Which candidates of a piece survive deduplication, and how many each kind removed."""
    docs = np.load(piece_path(plan.work_dir, piece, ".docs.npy"), mmap_mode="r")
    kept = np.ones(len(docs), dtype=bool)
    exact, near = removed_documents(plan, piece)
    kept[exact] = False
    kept[near] = False
    return kept, {"duplicate": len(exact), "near_duplicate": len(near)}


def read_texts(work_dir: str | Path, piece: int, which: np.ndarray) -> list[str]:
    """The cleaned text of some candidates of a piece (written by clean_piece, trained tokenizer)."""
    ends = np.load(piece_path(work_dir, piece, ".docs.npy"), mmap_mode="r")["text_end"]
    texts = []
    with open(piece_path(work_dir, piece, ".txt"), "rb") as f:
        for i in which:
            start = int(ends[i - 1]) if i else 0
            f.seek(start)
            texts.append(f.read(int(ends[i]) - start).decode("utf-8"))
    return texts


def write_shard(plan: DedupPlan, pieces: list[int], prefixes: dict[str, Path], vocab_size: int) -> ShardRecord:
    """The kept candidates of `pieces` (in order) -> one shard per split (`prefixes[split]`);
    returns the shard's counts and what deduplication removed."""
    started = time.perf_counter()
    work_dir = plan.work_dir
    removed = {"duplicate": 0, "near_duplicate": 0, "kept": 0, "kept_characters": 0}
    writers = {split: ShardWriter(prefix, vocab_size) for split, prefix in prefixes.items()}
    dtype = dtype_for_vocab(vocab_size)
    try:
        for piece in pieces:
            docs = np.load(piece_path(work_dir, piece, ".docs.npy"))
            lengths = np.load(piece_path(work_dir, piece, ".ntok.npy"))
            kept, counts = kept_mask(plan, piece)
            for key, value in counts.items():
                removed[key] += value
            removed["kept"] += int(kept.sum())
            removed["kept_characters"] += int(docs["chars"][kept].sum())
            ends = np.cumsum(lengths)
            with open(piece_path(work_dir, piece, ".tok"), "rb") as tokens_file:
                first = 0
                while first < len(lengths):
                    # documents [first, stop): whole documents, about _COPY_TOKENS tokens
                    start_token = int(ends[first - 1]) if first else 0
                    stop = max(first + 1, int(np.searchsorted(ends, start_token + _COPY_TOKENS, side="right")))
                    stop = min(stop, len(lengths))
                    count = int(ends[stop - 1]) - start_token
                    tokens = np.frombuffer(tokens_file.read(count * dtype.itemsize), dtype=dtype)
                    if len(tokens) != count:
                        raise OSError(f"{piece_path(work_dir, piece, '.tok')} is shorter than its index")
                    for split, valid in (("train", 0), ("valid", 1)):
                        chosen = kept[first:stop] & (docs["valid"][first:stop] == valid)
                        if chosen.any():
                            token_mask = np.repeat(chosen, lengths[first:stop])
                            writers[split].add_documents(tokens[token_mask], lengths[first:stop][chosen])
                    first = stop
        counts = {split: Counts(w.num_documents, w.num_tokens) for split, w in writers.items()}
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return ShardRecord(**counts, **removed, seconds=round(time.perf_counter() - started, 3))
