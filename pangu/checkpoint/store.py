"""The tensor store under every pangu checkpoint: pieces of tensors in flat binary files, each
recorded with its place in the full tensor and a checksum of its bytes (xxHash3, 64 bits).

A piece is a run of elements of one stored tensor (a parameter's "weight" or one of its optimizer
states): the box of the full tensor it lies in ([start, stop) in every dimension: a
tensor-parallel slice), the flat range [start, stop) of that box's row-major elements it holds (a
ZeRO-1 fragment; the whole box for a tensor written whole), and `copy`: 0 for the copy readers use
under any layout, > 0 for a replica that only its own writer reads back (a parameter replicated
across the tensor-parallel group, the head's copy of the tied word embedding). A reader assembles
any region of the full tensor, or any fragment of any box, from the pieces that overlap it, so a
checkpoint written under one (dp, tp, pp) loads under another; the rank that reads a piece checks
its checksum.

Two index layouts, both read by `TensorReader`:
- format 2: `index.json` ({"pieces": [...]}) for every piece of every `rank{R}.bin` in the directory;
- format 1 (read, and still written by `TensorWriter.close`): per store `NAME.json`
  ({"bin": "NAME.bin", "entries": [...]}) beside `NAME.bin`, whole boxes, checksums per file.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from pangu.schema import PanguError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
INDEX_FILE = "index.json"
# The checksum format 2 writes: xxHash3 (64 bits), about twice as fast as zlib's CRC-32 here and
# with the GIL released; python-xxhash is the package `datasets` already requires.
CHECKSUM = "xxh3"


def checksum(data) -> int:
    """The checksum of a buffer's bytes."""
    return xxhash.xxh3_64_intdigest(data)


class _Crc32:
    """zlib's CRC-32 with hashlib's interface (pieces written before format 2 settled on xxh3)."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


_HASHERS = {"xxh3": xxhash.xxh3_64, "crc32": _Crc32}


class CheckpointError(PanguError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """Bytes of a checkpoint do not match what its manifest or index records (torn or corrupt):
    a run falls back to the previous checkpoint."""


Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Piece:
    name: str
    key: str  # "weight" or an optimizer state name ("m", "s", "exp_avg", ...)
    dtype: str
    file: Path
    offset: int
    full_shape: tuple[int, ...]
    box: Box  # [start, stop) in every dimension of the full tensor
    flat: tuple[int, int]  # [start, stop) of the box's row-major elements
    checksum: tuple[str, int] | None = None  # (algorithm, value); None in format 1 (checked per file)
    copy: int = 0

    @property
    def numel(self) -> int:
        return self.flat[1] - self.flat[0]

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype].itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        """The box's shape (a format-1 piece holds its whole box)."""
        return tuple(stop - start for start, stop in self.box)


def _record(name, key, dtype, offset, full_shape, box, flat, digest, copy) -> dict:
    return {
        "name": name,
        "key": key,
        "dtype": dtype,
        "offset": offset,
        "full_shape": list(full_shape),
        "index": [list(r) for r in box],
        "flat": list(flat),
        CHECKSUM: digest,
        "copy": copy,
    }


def _piece(record: dict, file: Path) -> Piece:
    box = tuple(tuple(r) for r in record["index"])
    flat = tuple(record.get("flat") or (0, math.prod(b - a for a, b in box)))
    return Piece(
        record["name"],
        record["key"],
        record["dtype"],
        file,
        record["offset"],
        tuple(record["full_shape"]),
        box,
        flat,
        next(((algorithm, record[algorithm]) for algorithm in _HASHERS if record.get(algorithm) is not None), None),
        record.get("copy", 0),
    )


def tensor_bytes(tensor: torch.Tensor):
    """A contiguous CPU tensor's bytes as a buffer (no copy; any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class TensorWriter:
    """Appends tensors (or fragments of them) to NAME.bin, recording each with its checksum.
    `finish()` fsyncs and returns the records for a format-2 index; `close()` also writes a
    format-1 NAME.json beside it (with the file's sha256 when `hash_file`)."""

    def __init__(self, directory: Path, name: str, hash_file: bool = True):
        self.bin_path = Path(directory) / f"{name}.bin"
        self.index_path = Path(directory) / f"{name}.json"
        self._file = open(self.bin_path, "wb")
        self._sha = hashlib.sha256() if hash_file else None
        self._entries: list[dict] = []
        self._offset = 0

    def add(
        self,
        name: str,
        key: str,
        tensor: torch.Tensor,
        full_shape: tuple[int, ...],
        index: tuple[slice, ...] | None = None,
        flat: tuple[int, int] | None = None,
        copy: int = 0,
    ) -> None:
        """Stores `tensor`: the region `index` of the full tensor (default: all of it), or with
        `flat` the elements [start, stop) of that box in row-major order (`tensor` then holds
        exactly those, in any shape)."""
        tensor = tensor.detach().cpu().contiguous()
        if index is None:
            index = tuple(slice(0, n) for n in tensor.shape)
        box = tuple((s.start, s.stop) for s in index)
        flat = tuple(flat) if flat is not None else (0, math.prod(b - a for a, b in box))
        if flat[1] - flat[0] != tensor.numel():
            raise ValueError(f"{name} ({key}): {tensor.numel()} elements for the flat range {flat}")
        data = tensor_bytes(tensor)
        self._file.write(data)
        if self._sha is not None:
            self._sha.update(data)
        dtype = str(tensor.dtype).removeprefix("torch.")
        self._entries.append(_record(name, key, dtype, self._offset, full_shape, box, flat, checksum(data), copy))
        self._offset += data.nbytes

    def abort(self) -> None:
        """Stops writing after an error (the caller removes the partial files)."""
        self._file.close()

    def finish(self) -> tuple[int, list[dict]]:
        """Flush to disk; returns (bytes written, the pieces' records with their file name)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._offset, [dict(e, file=self.bin_path.name) for e in self._entries]

    def close(self) -> dict[str, dict]:
        """Flush to disk and write the format-1 NAME.json; returns {file name: {"bytes", "sha256"}}."""
        size, _ = self.finish()
        index_bytes = json.dumps({"bin": self.bin_path.name, "entries": self._entries}).encode()
        write_file_synced(self.index_path, index_bytes)
        return {
            self.bin_path.name: {"bytes": size, "sha256": self._sha.hexdigest() if self._sha else None},
            self.index_path.name: {"bytes": len(index_bytes), "sha256": hashlib.sha256(index_bytes).hexdigest()},
        }


def write_index(directory: Path, records: list[dict]) -> bytes:
    """Writes the format-2 index of a directory's pieces; returns its bytes."""
    data = json.dumps({"pieces": records}, separators=(",", ":")).encode()
    write_file_synced(Path(directory) / INDEX_FILE, data)
    return data


def flat_runs(shape: tuple[int, ...], start: int, stop: int):
    """The elements [start, stop) of an array of `shape` in row-major order, as rectangles:
    (first index, sizes, offset of the rectangle's first element from `start`). A flat range of
    an n-dimensional box is at most 2n - 1 rectangles (a partial first row, whole rows, a partial
    last row, recursively)."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield (start,), (stop - start,), 0
        return
    inner = math.prod(shape[1:])
    row, offset = start // inner, 0
    if start % inner:  # a partial first row
        end = min(stop, (row + 1) * inner)
        for first, sizes, at in flat_runs(shape[1:], start - row * inner, end - row * inner):
            yield (row, *first), (1, *sizes), at
        offset, row = end - start, row + 1
        if end == stop:
            return
    last = stop // inner
    if last > row:  # whole rows
        yield (row,) + (0,) * (len(shape) - 1), (last - row, *shape[1:]), offset
        offset += (last - row) * inner
    if stop % inner:  # a partial last row
        for first, sizes, at in flat_runs(shape[1:], 0, stop - last * inner):
            yield (last, *first), (1, *sizes), offset + at


def _rectangles(box: Box, flat: tuple[int, int]):
    """(rectangle in full-tensor coordinates, offset in the run's data) of a flat range of a box."""
    shape = tuple(b - a for a, b in box)
    for first, sizes, at in flat_runs(shape, *flat):
        yield tuple((a + f, a + f + n) for (a, _), f, n in zip(box, first, sizes)), at


def _overlaps(a: Box, b: Box) -> bool:
    return all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b))


class TensorReader:
    """Reads any region of any stored tensor, or any fragment of any box, from the pieces in a
    directory (format 2 or 1), checking the checksum of every piece it reads. `prefer`: a file
    whose pieces are read where one matches a request exactly (a rank's own file on the layout
    that wrote it). `index`: the format-2 index's bytes, when the caller has read (and checked)
    them. `bytes_read` counts the tensor bytes read."""

    def __init__(self, directory: Path, prefer: str | None = None, index: bytes | None = None):
        self.directory = Path(directory)
        self.prefer = prefer
        self.bytes_read = 0
        self.index_bytes = 0
        self._by_key: dict[tuple[str, str], list[Piece]] = {}
        self._keys: dict[str, set[str]] = {}
        files: dict[str, Path] = {}  # one Path per file, not per piece
        self._maps: dict[Path, object] = {}  # open files
        self._preloaded: dict[Path, torch.Tensor] = {}  # whole files read ahead (preload)
        self._bad: dict[Piece, str] = {}  # pieces preload found torn or corrupt
        if index is None and (self.directory / INDEX_FILE).is_file():
            index = (self.directory / INDEX_FILE).read_bytes()
        if index is not None:
            self.index_bytes += len(index)
            collecting = gc.isenabled()
            gc.disable()  # many small objects at once: no full collections of a training process's heap
            try:
                for record in json.loads(index)["pieces"]:
                    file = files.get(record["file"]) or files.setdefault(
                        record["file"], self.directory / record["file"]
                    )
                    self._add(_piece(record, file))
            finally:
                if collecting:
                    gc.enable()
        for store in sorted(self.directory.glob("*.json")):
            if store.name == INDEX_FILE:
                continue
            meta = json.loads(store.read_text())
            for record in meta["entries"]:
                self._add(_piece(record, self.directory / meta["bin"]))

    def _add(self, piece: Piece) -> None:
        self._by_key.setdefault((piece.name, piece.key), []).append(piece)
        self._keys.setdefault(piece.name, set()).add(piece.key)

    def names(self) -> set[str]:
        return set(self._keys)

    def keys(self, name: str) -> set[str]:
        return set(self._keys.get(name, ()))

    def pieces(self) -> list[Piece]:
        """Every stored piece, replicas included."""
        return [p for pieces in self._by_key.values() for p in pieces]

    def full_shape(self, name: str, key: str = "weight") -> tuple[int, ...]:
        return self._pieces(name, key)[0].full_shape

    def dtype(self, name: str, key: str = "weight") -> str:
        return self._pieces(name, key)[0].dtype

    def read(self, name: str, key: str = "weight", index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The region `index` (default: everything) of the full tensor, assembled from its pieces."""
        full_shape = self.full_shape(name, key)
        if index is None:
            index = tuple(slice(0, n) for n in full_shape)
        box = tuple((s.start, s.stop) for s in index)
        shape = tuple(b - a for a, b in box)
        return self.read_flat(name, key, box, (0, math.prod(shape))).reshape(shape)

    def read_flat(
        self, name: str, key: str, box: Box, flat: tuple[int, int], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The elements [start, stop) of the region `box` of the full tensor, in row-major order, as
        a 1-D tensor (written into `out`, cast to its dtype, when given)."""
        pieces = self._pieces(name, key, primary=False)
        box, flat = tuple(tuple(r) for r in box), tuple(flat)
        exact = [p for p in pieces if p.box == box and p.flat == flat]
        if exact:
            own = [p for p in exact if p.file.name == self.prefer]
            piece = (own or [p for p in exact if p.copy == 0] or exact)[0]
            if out is not None and out.dtype == _DTYPES[piece.dtype] and out.is_contiguous():
                self._read_piece(piece, into=out)
                return out
            data = self._read_piece(piece)
            return data if out is None else out.copy_(data.view(out.shape))
        dtype = _DTYPES[pieces[0].dtype] if out is None else out.dtype
        result = torch.empty(flat[1] - flat[0], dtype=dtype) if out is None else out
        wanted = list(_rectangles(box, flat))
        covered = 0
        for piece in (p for p in pieces if p.copy == 0 and _overlaps(p.box, box)):
            pairs = [
                (r, at, q, pat) for r, at in wanted for q, pat in _rectangles(piece.box, piece.flat) if _overlaps(r, q)
            ]
            if not pairs:
                continue
            data = self._read_piece(piece)
            for r, at, q, pat in pairs:
                both = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(r, q))
                target = result[at : at + _numel(r)].view(_sizes(r))
                source = data[pat : pat + _numel(q)].view(_sizes(q))
                target[_local(both, r)] = source[_local(both, q)]
                covered += _numel(both)
        if covered != flat[1] - flat[0]:
            raise CheckpointError(
                f"checkpoint pieces of {name!r} ({key}) cover {covered} of the {flat[1] - flat[0]} "
                f"elements asked for: a shard file is missing"
            )
        return result

    def _pieces(self, name: str, key: str = "weight", primary: bool = True) -> list[Piece]:
        if (name, key) not in self._by_key:
            raise CheckpointError(f"the checkpoint has no {key!r} for parameter {name!r}")
        pieces = self._by_key[(name, key)]
        if not primary:
            return pieces
        return [p for p in pieces if p.copy == 0] or pieces

    def preload(self, file_name: str) -> None:
        """Reads one file of the directory whole and checks every piece in it now (say, in a
        background thread while the engine is being built); its pieces are then served from
        memory. A piece that fails its check raises when it is read, as it would have."""
        file = self.directory / file_name
        pieces = [p for p in self.pieces() if p.file == file]
        size = max((p.offset + p.nbytes for p in pieces), default=0)
        data = torch.empty(size, dtype=torch.uint8)
        with open(file, "rb") as f:
            got = f.readinto(data.numpy())
        for piece in pieces:
            if piece.offset + piece.nbytes > got:
                self._bad[piece] = f"{piece.file} is truncated: {piece.name!r} ({piece.key}) ends past its end"
            elif piece.checksum is not None:
                if (
                    _digest(piece.checksum[0], data[piece.offset : piece.offset + piece.nbytes].numpy())
                    != piece.checksum[1]
                ):
                    self._bad[piece] = self._corrupt(piece)
        self._preloaded[file] = data

    def _corrupt(self, piece: Piece) -> str:
        return (
            f"{piece.file} is corrupt: {piece.name!r} ({piece.key}) at byte {piece.offset} does not match its checksum"
        )

    def _read_piece(self, piece: Piece, into: torch.Tensor | None = None) -> torch.Tensor:
        """A piece's elements (1-D), read into `into` when given, after checking its checksum."""
        if piece in self._bad:
            raise CorruptCheckpointError(self._bad[piece])
        if piece.file in self._preloaded:  # checked when it was read
            data = self._preloaded[piece.file][piece.offset : piece.offset + piece.nbytes]
            self.bytes_read += piece.nbytes
            if into is None:
                return data.view(_DTYPES[piece.dtype])
            into.view(-1).view(torch.uint8).copy_(data)
            return into.view(-1)
        handle = self._maps.get(piece.file)
        if handle is None:
            if not piece.file.is_file():
                raise CorruptCheckpointError(f"{piece.file} is missing")
            handle = self._maps[piece.file] = open(piece.file, "rb")
        buffer = into.view(-1).view(torch.uint8) if into is not None else torch.empty(piece.nbytes, dtype=torch.uint8)
        handle.seek(piece.offset)
        got = handle.readinto(buffer.numpy())
        if got != piece.nbytes:
            raise CorruptCheckpointError(f"{piece.file} is truncated: {piece.name!r} ({piece.key}) ends past its end")
        if piece.checksum is not None and _digest(piece.checksum[0], buffer.numpy()) != piece.checksum[1]:
            raise CorruptCheckpointError(self._corrupt(piece))
        self.bytes_read += piece.nbytes
        return into.view(-1) if into is not None else buffer.view(_DTYPES[piece.dtype])

    def close(self) -> None:
        for handle in self._maps.values():
            handle.close()
        self._maps.clear()
        self._preloaded.clear()


def _numel(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def _sizes(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _local(box: Box, within: Box) -> tuple[slice, ...]:
    return tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(box, within))


def write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(algorithm: str, data) -> int:
    hasher = _HASHERS[algorithm]()
    hasher.update(data)
    return hasher.intdigest()


def file_checksum(
    path: Path, algorithm: str = CHECKSUM, start: int = 0, length: int | None = None, progress=None
) -> int:
    """The checksum of a file's bytes [start, start + length); `progress(n)` is told of every block."""
    hasher, left = _HASHERS[algorithm](), length
    with open(path, "rb") as f:
        f.seek(start)
        while left is None or left > 0:
            block = f.read(1 << 22 if left is None else min(1 << 22, left))
            if not block:
                break
            hasher.update(block)
            if left is not None:
                left -= len(block)
            if progress is not None:
                progress(len(block))
    return hasher.intdigest()
