"""Token shards on disk: `NAME.bin` holds the token ids of all documents back to back, `NAME.idx`
says where each document starts. The reader memory-maps `.bin`, so a shard costs no RAM.

`.idx` layout (little-endian):
    header   magic b"PANGUIDX", u32 version, u32 dtype code (1 = uint16, 2 = int32),
             u64 number of documents, u64 number of tokens
    offsets  u64[number of documents + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
    footer   u32 CRC-32 of header and offsets
Opening a shard costs O(1) whatever its size: the header, the file sizes (a truncated `.bin` or
`.idx` is caught) and the first and last offsets are checked, and the offsets are memory-mapped.
`verify()` reads the whole index (CRC, offsets in order): `pangu prepare` runs it before it
reuses a preparation, and `IndexedShard(prefix, verify=True)` opens and verifies.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from types import TracebackType

import numpy as np

from pangu.data import DataError
from pangu.files import atomic_writer, write_atomic

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
    """Streams documents into `PREFIX.bin` (under a temporary name until `finalize()`, which then
    writes the index, each file atomically), so a reader never sees a half-written shard. Used as
    a context manager, it finalizes on success and deletes its temporary file on error."""

    def __init__(self, prefix: str | Path, vocab_size: int) -> None:
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self._bin_writer = atomic_writer(self.bin_path)
        self._bin = self._bin_writer.__enter__()
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(
                f"a document must be a 1-D sequence of integer token ids, got {tokens.dtype} with shape {tokens.shape}"
            )
        self.add_documents(tokens, np.array([tokens.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Several documents at once: `tokens` back to back, `lengths[i]` tokens each."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens) or (lengths < 0).any():
            raise ValueError(f"document lengths sum to {int(lengths.sum())}, but {len(tokens)} tokens were given")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(lengths)
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def finalize(self) -> None:
        # .bin first: a crash before the index is renamed leaves a new .bin with an old .idx, which
        # the size check reports as damaged instead of silently reading the wrong documents
        self._bin_writer.__exit__(None, None, None)
        offsets = np.zeros(self.num_documents + 1, dtype="<u8")
        if self._lengths:
            np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        dtype_code = next(code for code, dtype in _DTYPES.items() if dtype == self.dtype)
        body = _HEADER.pack(MAGIC, VERSION, dtype_code, self.num_documents, self.num_tokens) + offsets.tobytes()
        write_atomic(self.idx_path, body + _FOOTER.pack(zlib.crc32(body)))

    def discard(self) -> None:
        # the writer sees an error: it removes its temporary file, and swallows the error it was given
        discarded = RuntimeError("shard discarded")
        self._bin_writer.__exit__(RuntimeError, discarded, None)

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
    """A finished shard, checked on open in O(1). `tokens` is the whole stream and `offsets` the
    document boundaries, both read-only memmaps."""

    def __init__(self, prefix: str | Path, verify: bool = False) -> None:
        self.bin_path, self.idx_path = shard_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"token shard file {str(path)!r} is missing; {_RERUN}")
        self.dtype, self.offsets = self._map_index()
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
        if verify:
            self.verify()

    def _map_index(self) -> tuple[np.dtype, np.ndarray]:
        damaged = f"token index {str(self.idx_path)!r} is damaged"
        size = self.idx_path.stat().st_size
        with self.idx_path.open("rb") as f:
            header = f.read(_HEADER.size)
        if size < _HEADER.size + 8 + _FOOTER.size or header[: len(MAGIC)] != MAGIC:
            raise DataError(f"{damaged} (not a pangu token index); {_RERUN}")
        _, version, dtype_code, num_documents, num_tokens = _HEADER.unpack(header)
        if version != VERSION:
            raise DataError(
                f"token index {str(self.idx_path)!r} has format version {version}, this code "
                f"reads version {VERSION}; {_RERUN}"
            )
        expected_size = _HEADER.size + 8 * (num_documents + 1) + _FOOTER.size
        if size != expected_size or dtype_code not in _DTYPES:
            raise DataError(f"{damaged} ({size} bytes, expected {expected_size}); {_RERUN}")
        offsets = np.memmap(self.idx_path, dtype="<u8", mode="r", offset=_HEADER.size, shape=(num_documents + 1,))
        if offsets[0] != 0 or offsets[-1] != num_tokens:
            raise DataError(f"{damaged} (inconsistent document offsets); {_RERUN}")
        return _DTYPES[dtype_code], offsets

    def verify(self) -> None:
        """Reads the whole index: its CRC and the order of the offsets (O(documents))."""
        raw = self.idx_path.read_bytes()
        body, (checksum,) = raw[: -_FOOTER.size], _FOOTER.unpack_from(raw, len(raw) - _FOOTER.size)
        damaged = f"token index {str(self.idx_path)!r} is damaged"
        if zlib.crc32(body) != checksum:
            raise DataError(f"{damaged} (checksum mismatch); {_RERUN}")
        if np.any(np.diff(np.frombuffer(body, dtype="<u8", offset=_HEADER.size).astype(np.int64)) < 0):
            raise DataError(f"{damaged} (inconsistent document offsets); {_RERUN}")

    def __len__(self) -> int:
        """The number of documents."""
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for a shard of {len(self)} documents")
        i %= len(self)
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]


class ShardTokens:
    """The token stream of a shard whose size meta.json records, for training: opening checks the
    `.bin` size only (a stat; no file is read) and maps it on first use."""

    def __init__(self, prefix: str | Path, num_tokens: int, vocab_size: int) -> None:
        self.bin_path, _ = shard_paths(prefix)
        self.num_tokens = num_tokens
        self.dtype = dtype_for_vocab(vocab_size)
        try:
            actual_bytes = self.bin_path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"token shard file {str(self.bin_path)!r} is missing; {_RERUN}") from None
        if actual_bytes != num_tokens * self.dtype.itemsize:
            raise DataError(
                f"token shard {str(self.bin_path)!r} has {actual_bytes} bytes but meta.json records "
                f"{num_tokens} tokens ({num_tokens * self.dtype.itemsize} bytes): it is truncated or "
                f"was replaced; {_RERUN}"
            )
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            if self.num_tokens:
                self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
            else:
                self._tokens = np.empty(0, dtype=self.dtype)
        return self._tokens
