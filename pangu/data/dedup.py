"""Deduplication over the whole corpus without holding it: "the first occurrence wins", by hash
partition, with a number of file opens that grows with pieces + buckets.

Every candidate document (one that passed the other filters) has keys: the 16-byte hash of its
text (exact deduplication) and, with data.near_dedup, one 16-byte MinHash LSH key per band. The
worker that cleans a piece writes the piece's keys sorted by bucket (`bucket = key % B`,
`KEY_DTYPE`, `write_keys`). Each bucket is then reduced on its own: its keys from every piece,
sorted by (key, piece, document); every key after the first of its group marks its document as a
duplicate (exact) or a near duplicate (LSH key). The outcome depends on the corpus order only,
not on how pieces or buckets were spread over processes and nodes, and a bucket holds about
`KEYS_PER_BUCKET` keys whatever the corpus size.

A bucket needs its keys from every piece, and a piece the verdicts of every bucket: read
directly, that is P x B file opens, twice (9 million a pass for 1.1 TB, 138 million with near
deduplication, where a shared file system's metadata server is the limit). Keys and verdicts go
through groups instead (`DedupPlan`: G groups of about sqrt(P) consecutive pieces, H groups of
buckets, with G x H <= P + B + G):

  gather  piece group g: the keys of its pieces, one piece read at a time, each bucket's
          section written in place, so that every bucket's keys are contiguous in one file
  reduce  bucket group h: bucket by bucket, the bucket's keys from the G gathered files (open
          together), reduced as above; the group's verdicts in one file
  split   piece group g: its pieces' verdicts from the H verdict files, in one file
  lookup  a piece's removed documents (`removed_documents`): one file

which opens 3P + 2 G x H + 2G + H files in all: linear in P + B.

A verdict is an int64 code `piece << 40 | document << 1 | near`, carried with every gathered
key, so that sorting by (key, code) is sorting by (key, piece, document); every file is finished
by an atomic rename, and a stage's task is done when its file exists.
"""

from __future__ import annotations

import contextlib
import math
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pangu.data import DataError
from pangu.files import atomic_writer

KEY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("doc", "<i8"), ("near", "u1")])
GATHERED_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("code", "<i8")])
KEYS_PER_BUCKET = 4_000_000  # about 200 MB to sort
_BYTES_PER_DOCUMENT = 512  # a low estimate of a document's input bytes, to size the partition
_PIECE_SHIFT = 40


def bucket_count(input_bytes: int, keys_per_document: int) -> int:
    """B, from the input's size: enough buckets that each holds about KEYS_PER_BUCKET keys."""
    keys = input_bytes / _BYTES_PER_DOCUMENT * keys_per_document
    return max(1, math.ceil(keys / KEYS_PER_BUCKET))


@dataclass(frozen=True)
class DedupPlan:
    """How the P pieces and B buckets are grouped (a function of P and B only, so that a resumed
    preparation finds the files of an earlier one under any number of processes)."""

    work_dir: Path
    pieces: int
    buckets: int

    @property
    def pieces_per_group(self) -> int:
        return max(1, math.isqrt(max(self.pieces - 1, 0)) + 1)  # ceil(sqrt(P))

    @property
    def piece_groups(self) -> int:
        return -(-self.pieces // self.pieces_per_group)

    @property
    def buckets_per_group(self) -> int:
        most_groups = min(self.buckets, -(-(self.pieces + self.buckets) // max(self.piece_groups, 1)))
        return -(-self.buckets // max(most_groups, 1))

    @property
    def bucket_groups(self) -> int:
        return -(-self.buckets // self.buckets_per_group) if self.buckets else 0

    def pieces_of(self, group: int) -> range:
        k = self.pieces_per_group
        return range(group * k, min(self.pieces, (group + 1) * k))

    def buckets_of(self, group: int) -> range:
        k = self.buckets_per_group
        return range(group * k, min(self.buckets, (group + 1) * k))

    def keys_path(self, piece: int) -> Path:
        """A piece's keys, written by the worker that cleans it."""
        return self.work_dir / "pieces" / f"{piece:06d}.keys"

    def gathered_path(self, piece_group: int) -> Path:
        return self.work_dir / "dedup" / f"keys-{piece_group:06d}.bin"

    def verdicts_path(self, bucket_group: int) -> Path:
        return self.work_dir / "dedup" / f"verdicts-{bucket_group:06d}.npy"

    def removed_path(self, piece_group: int) -> Path:
        return self.work_dir / "dedup" / f"removed-{piece_group:06d}.npy"


def keys_array(keys: list[bytes], docs: list[int], near: list[bool]) -> np.ndarray:
    out = np.empty(len(keys), dtype=KEY_DTYPE)
    if keys:
        raw = np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2)
        out["hi"], out["lo"] = raw[:, 0], raw[:, 1]
        out["doc"] = docs
        out["near"] = near
    return out


def write_keys(path: Path, keys: np.ndarray, buckets: int) -> None:
    """The piece's keys sorted by bucket, then the bucket offsets (int64[B + 1]) after them."""
    bucket = keys["hi"] % np.uint64(buckets)
    order = np.argsort(bucket, kind="stable")
    offsets = np.searchsorted(bucket[order], np.arange(buckets + 1, dtype=np.uint64)).astype("<i8")
    with atomic_writer(path) as f:
        f.write(keys[order].tobytes())
        f.write(offsets.tobytes())


def _bucket_offsets(
    f: BinaryIO, path: Path, dtype: np.dtype, buckets: int, first: int = 0, count: int | None = None
) -> np.ndarray:
    """Offsets [first, first + count] (all B + 1 by default) of a file of records sorted by bucket
    with its int64[B + 1] bucket offsets at the end, checked against the file's size before
    anything is read by them."""
    count = buckets if count is None else count
    size = f.seek(0, 2)
    records = (size - 8 * (buckets + 1)) / dtype.itemsize
    f.seek(size - 8 * (buckets + 1) + 8 * first)
    offsets = np.frombuffer(f.read(8 * (count + 1)), dtype="<i8")
    if (
        records != int(records)
        or len(offsets) != count + 1
        or np.any(np.diff(offsets) < 0)
        or offsets[0] < 0
        or offsets[-1] > records
    ):
        raise DataError(f"{path} is damaged (its bucket offsets do not fit its size): delete it and run prepare again")
    return offsets


def gather(plan: DedupPlan, group: int) -> None:
    """Piece group `group`'s keys, as GATHERED_DTYPE records sorted by bucket (then piece, then
    the piece's own order), with the bucket offsets at the end."""
    pieces = plan.pieces_of(group)
    per_piece = []
    for piece in pieces:
        with open(plan.keys_path(piece), "rb") as f:
            per_piece.append(_bucket_offsets(f, plan.keys_path(piece), KEY_DTYPE, plan.buckets).copy())
    starts = np.zeros(plan.buckets + 1, dtype="<i8")
    np.cumsum(sum(np.diff(offsets) for offsets in per_piece), out=starts[1:])
    filled = starts[:-1].copy()  # where the next key of each bucket goes
    size = GATHERED_DTYPE.itemsize
    with atomic_writer(plan.gathered_path(group)) as out:
        for piece, offsets in zip(pieces, per_piece):
            keys = np.fromfile(plan.keys_path(piece), dtype=KEY_DTYPE, count=int(offsets[-1]))
            records = np.empty(len(keys), dtype=GATHERED_DTYPE)
            records["hi"], records["lo"] = keys["hi"], keys["lo"]
            records["code"] = (piece << _PIECE_SHIFT) | (keys["doc"] << 1) | keys["near"].astype(np.int64)
            for bucket in np.flatnonzero(np.diff(offsets)):
                out.seek(int(filled[bucket]) * size)
                out.write(records[offsets[bucket] : offsets[bucket + 1]].tobytes())
                filled[bucket] += offsets[bucket + 1] - offsets[bucket]
        out.seek(int(starts[-1]) * size)
        out.write(starts.tobytes())


def reduce(plan: DedupPlan, group: int) -> int:
    """Bucket group `group`: writes the sorted codes of the documents that are not the first
    holder of one of their keys; returns how many codes."""
    buckets = plan.buckets_of(group)
    found = []
    _allow_open_files(plan.piece_groups + 64)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(plan.gathered_path(g), "rb", buffering=0)) for g in range(plan.piece_groups)]
        offsets = [
            _bucket_offsets(f, plan.gathered_path(g), GATHERED_DTYPE, plan.buckets, buckets.start, len(buckets))
            for g, f in enumerate(files)
        ]
        for j in range(len(buckets)):
            parts = []
            for f, bounds in zip(files, offsets):
                f.seek(int(bounds[j]) * GATHERED_DTYPE.itemsize)
                parts.append(np.fromfile(f, dtype=GATHERED_DTYPE, count=int(bounds[j + 1] - bounds[j])))
            found.append(_later_holders(np.concatenate(parts)))
    codes = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    with atomic_writer(plan.verdicts_path(group)) as f:
        np.save(f, codes)
    return len(codes)


def _later_holders(keys: np.ndarray) -> np.ndarray:
    """The codes of one bucket's keys that are not the first holder of their key. A document
    holding the same key twice (a text repeated within a piece) is caught too: only its first
    holder (lowest piece, then document) is not later."""
    keys = keys[np.lexsort((keys["code"], keys["lo"], keys["hi"]))]
    later = np.zeros(len(keys), dtype=bool)
    later[1:] = (keys["hi"][1:] == keys["hi"][:-1]) & (keys["lo"][1:] == keys["lo"][:-1])
    return keys["code"][later]


def split(plan: DedupPlan, group: int) -> None:
    """Piece group `group`'s verdicts, from every bucket group's, in one sorted file."""
    pieces = plan.pieces_of(group)
    bounds = [pieces.start << _PIECE_SHIFT, pieces.stop << _PIECE_SHIFT]
    found = []
    for h in range(plan.bucket_groups):
        codes = _codes(plan.verdicts_path(h))
        lo, hi = np.searchsorted(codes, bounds)
        found.append(np.asarray(codes[lo:hi]))
    codes = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    with atomic_writer(plan.removed_path(group)) as f:
        np.save(f, codes)


def removed_documents(plan: DedupPlan, piece: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents removed as exact duplicates, documents removed as near duplicates only) of a
    piece, each sorted."""
    if not plan.buckets:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    codes = _codes(plan.removed_path(piece // plan.pieces_per_group))
    lo, hi = np.searchsorted(codes, [piece << _PIECE_SHIFT, (piece + 1) << _PIECE_SHIFT])
    codes = np.asarray(codes[lo:hi])
    docs = (codes & ((1 << _PIECE_SHIFT) - 1)) >> 1
    exact = np.unique(docs[(codes & 1) == 0])
    near = np.setdiff1d(np.unique(docs[(codes & 1) == 1]), exact)
    return exact, near


def _codes(path: Path) -> np.ndarray:
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path} is damaged ({err}): delete it and run prepare again") from None
    if codes.ndim != 1 or codes.dtype != np.int64:
        raise DataError(f"{path} is damaged (not a list of codes): delete it and run prepare again")
    return codes


def _allow_open_files(count: int) -> None:
    """Raise this process's limit of open files to `count` if the hard limit allows (a reduce
    holds one file per piece group: about sqrt(P), 130 for 17,000 pieces)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
