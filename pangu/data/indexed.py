"""Token shards on disk: `NAME.bin` holds the token ids of all documents back to back, `NAME.idx`
says where each document starts. The reader memory-maps `.bin`, so a shard costs no RAM.

`.idx` layout (little-endian):
    header   magic b"PANGUIDX", u32 version, u32 dtype code (1 = uint16, 2 = int32),
             u64 number of documents, u64 number of tokens
    offsets  u64[number of documents + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
    footer   u32 CRC-32 of header and offsets
On open, the CRC catches a corrupt `.idx` and the size of `.bin` (number of tokens x item size)
catches a truncated one; both fail with a DataError before any training step.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from types import TracebackType

import numpy as np

from pangu.data import DataError

MAGIC = b"PANGUIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_FOOTER = struct.Struct("<I")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_RERUN = "re-run `pangu prepare --config <your config>` to rebuild it"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return _DTYPES[1] if vocab_size <= 65535 else _DTYPES[2]


def shard_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class ShardWriter:
    """Streams documents into `PREFIX.bin.tmp`; `finalize()` writes the index and renames both
    files into place, so a reader never sees a half-written shard. Used as a context manager, it
    finalizes on success and deletes its temporary files on error."""

    def __init__(self, prefix: str | Path, vocab_size: int) -> None:
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._bin = self._bin_tmp.open("wb")
        self._offsets = [0]

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(
                f"a document must be a 1-D sequence of integer token ids, got {tokens.dtype} with shape {tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        self._bin.write(tokens.astype(self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + tokens.size)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        offsets = np.asarray(self._offsets, dtype="<u8")
        dtype_code = next(code for code, dtype in _DTYPES.items() if dtype == self.dtype)
        body = _HEADER.pack(MAGIC, VERSION, dtype_code, len(offsets) - 1, int(offsets[-1])) + offsets.tobytes()
        with self._idx_tmp.open("wb") as idx:
            idx.write(body + _FOOTER.pack(zlib.crc32(body)))
            idx.flush()
            os.fsync(idx.fileno())
        # .bin first: a crash between the renames leaves a new .bin with an old .idx, which the
        # size check reports as damaged instead of silently reading the wrong documents
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def discard(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.discard()


class IndexedShard:
    """A finished shard, checked on open. `tokens` is the whole stream as a read-only memmap."""

    def __init__(self, prefix: str | Path) -> None:
        self.bin_path, self.idx_path = shard_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"token shard file {str(path)!r} is missing; {_RERUN}")
        self.dtype, self.offsets = self._read_index()
        self.num_tokens = int(self.offsets[-1])
        expected_bytes = self.num_tokens * self.dtype.itemsize
        actual_bytes = self.bin_path.stat().st_size
        if actual_bytes != expected_bytes:
            raise DataError(
                f"token shard {str(self.bin_path)!r} has {actual_bytes} bytes but its index "
                f"promises {expected_bytes} ({self.num_tokens} tokens): it is truncated or "
                f"does not belong to this index; {_RERUN}"
            )
        if self.num_tokens:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        else:  # numpy cannot map an empty file
            self.tokens = np.empty(0, dtype=self.dtype)

    def _read_index(self) -> tuple[np.dtype, np.ndarray]:
        raw = self.idx_path.read_bytes()
        damaged = f"token index {str(self.idx_path)!r} is damaged"
        if len(raw) < _HEADER.size + _FOOTER.size or raw[: len(MAGIC)] != MAGIC:
            raise DataError(f"{damaged} (not a pangu token index); {_RERUN}")
        _, version, dtype_code, num_documents, num_tokens = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise DataError(
                f"token index {str(self.idx_path)!r} has format version {version}, this code "
                f"reads version {VERSION}; {_RERUN}"
            )
        expected_size = _HEADER.size + 8 * (num_documents + 1) + _FOOTER.size
        if len(raw) != expected_size:
            raise DataError(f"{damaged} ({len(raw)} bytes, expected {expected_size}); {_RERUN}")
        body, (checksum,) = raw[: -_FOOTER.size], _FOOTER.unpack_from(raw, len(raw) - _FOOTER.size)
        if zlib.crc32(body) != checksum or dtype_code not in _DTYPES:
            raise DataError(f"{damaged} (checksum mismatch); {_RERUN}")
        offsets = np.frombuffer(body, dtype="<u8", offset=_HEADER.size).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
            raise DataError(f"{damaged} (inconsistent document offsets); {_RERUN}")
        return _DTYPES[dtype_code], offsets

    def __len__(self) -> int:
        """The number of documents."""
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for a shard of {len(self)} documents")
        i %= len(self)
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]
