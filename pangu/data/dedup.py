"""Deduplication over the whole corpus without holding it: "the first occurrence wins", by hash
partition.

Every candidate document (one that passed the other filters) has keys: the 16-byte hash of its
text (exact deduplication) and, with data.near_dedup, one 16-byte MinHash LSH key per band.
The worker that cleans a piece writes the piece's keys sorted by bucket (`bucket = key % P`,
`KEY_DTYPE`, `write_keys`). Bucket b is then reduced on its own (`reduce_bucket`): its keys from
every piece, sorted by (key, piece, document); every key after the first of its group marks its
document as a duplicate (exact) or a near duplicate (LSH key). The outcome depends on the corpus
order only, not on how pieces or buckets were spread over processes and nodes, and a bucket
holds about `KEYS_PER_BUCKET` keys whatever the corpus size.

A bucket's result is one sorted int64 array of codes `piece << 40 | document << 1 | near`, so a
piece finds its removed documents by binary search in each bucket (`removed_documents`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

KEY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("doc", "<i8"), ("near", "u1")])
KEYS_PER_BUCKET = 4_000_000  # about 200 MB to sort
_BYTES_PER_DOCUMENT = 512  # a low estimate of a document's input bytes, to size the partition
_PIECE_SHIFT = 40


def bucket_count(input_bytes: int, keys_per_document: int) -> int:
    """P, from the input's size: enough buckets that each holds about KEYS_PER_BUCKET keys."""
    keys = input_bytes / _BYTES_PER_DOCUMENT * keys_per_document
    return max(1, math.ceil(keys / KEYS_PER_BUCKET))


def keys_array(keys: list[bytes], docs: list[int], near: list[bool]) -> np.ndarray:
    out = np.empty(len(keys), dtype=KEY_DTYPE)
    if keys:
        raw = np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2)
        out["hi"], out["lo"] = raw[:, 0], raw[:, 1]
        out["doc"] = docs
        out["near"] = near
    return out


def write_keys(path: Path, keys: np.ndarray, buckets: int) -> None:
    """The piece's keys sorted by bucket, then the bucket offsets (int64[P + 1]) after them."""
    bucket = keys["hi"] % np.uint64(buckets)
    order = np.argsort(bucket, kind="stable")
    offsets = np.searchsorted(bucket[order], np.arange(buckets + 1, dtype=np.uint64)).astype("<i8")
    with open(path, "wb") as f:
        f.write(keys[order].tobytes())
        f.write(offsets.tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_bucket(path: Path, bucket: int, buckets: int) -> np.ndarray:
    """The keys of one bucket from a piece's key file, without reading the rest."""
    size = path.stat().st_size
    offsets_at = size - 8 * (buckets + 1)
    with open(path, "rb") as f:
        f.seek(offsets_at + 8 * bucket)
        start, end = np.frombuffer(f.read(16), dtype="<i8")
        f.seek(int(start) * KEY_DTYPE.itemsize)
        return np.frombuffer(f.read(int(end - start) * KEY_DTYPE.itemsize), dtype=KEY_DTYPE)


def reduce_bucket(key_files: list[tuple[int, Path]], bucket: int, buckets: int, out_path: Path) -> int:
    """Bucket `bucket` of every (piece, key file): writes the sorted codes of the documents that
    are not the first holder of one of their keys; returns how many codes."""
    parts, pieces = [], []
    for piece, path in key_files:
        keys = read_bucket(path, bucket, buckets)
        if len(keys):
            parts.append(keys)
            pieces.append(np.full(len(keys), piece, dtype=np.int64))
    codes = np.empty(0, dtype=np.int64)
    if parts:
        keys, piece = np.concatenate(parts), np.concatenate(pieces)
        order = np.lexsort((keys["doc"], piece, keys["lo"], keys["hi"]))
        keys, piece = keys[order], piece[order]
        later = np.zeros(len(keys), dtype=bool)
        later[1:] = (keys["hi"][1:] == keys["hi"][:-1]) & (keys["lo"][1:] == keys["lo"][:-1])
        # a document holding the same key twice (a text repeated within a piece) is caught too:
        # only its first holder (lowest piece, then document) is not `later`
        codes = (piece[later] << _PIECE_SHIFT) | (keys["doc"][later] << 1) | keys["near"][later].astype(np.int64)
        codes = np.unique(codes)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, codes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return len(codes)


def removed_documents(bucket_files: list[Path], piece: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents removed as exact duplicates, documents removed as near duplicates only) of a
    piece, each sorted, from every bucket's result."""
    found = []
    for path in bucket_files:
        codes = np.load(path, mmap_mode="r")
        lo, hi = np.searchsorted(codes, [piece << _PIECE_SHIFT, (piece + 1) << _PIECE_SHIFT])
        if hi > lo:
            found.append(np.asarray(codes[lo:hi]))
    if not found:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    codes = np.concatenate(found)
    docs = (codes & ((1 << _PIECE_SHIFT) - 1)) >> 1
    exact = np.unique(docs[(codes & 1) == 0])
    near = np.setdiff1d(np.unique(docs[(codes & 1) == 1]), exact)
    return exact, near
