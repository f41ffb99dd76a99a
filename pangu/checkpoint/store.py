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

An index is untrusted input: it is read through the typed records below, and every piece is
checked before anything is allocated for it (its box inside its full shape, its flat range inside
its box, its bytes inside its file, its full shape the one the model declares, its file a name in
the directory, and in format 2 its checksum present). Pieces are read into host memory only:
into the destination itself where that is plain CPU memory, else into the reader's one staging
buffer (pinned for a GPU) and copied to the destination's device.
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
from typing import Literal

import torch
import xxhash

from pangu.checkpoint import boxes
from pangu.checkpoint.boxes import Box
from pangu.files import UnsafePathError, confined, relative_parts, write_synced
from pangu.schema import PanguError, from_dict

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


# ---------------------------------------------------------------------------------------------
# The index as it is stored


@dataclass(frozen=True)
class PieceRecord:
    """One piece as an index records it."""

    name: str
    key: str  # "weight" or an optimizer state name ("m", "s", "exp_avg", ...)
    dtype: Literal["float32", "float16", "bfloat16", "int64", "int32"]
    offset: int  # of its first byte in its file
    full_shape: list[int]
    index: list[tuple[int, int]]  # its box: [start, stop) in every dimension of the full tensor
    flat: tuple[int, int] | None = None  # [start, stop) of the box's row-major elements (format 1: all)
    file: str = ""  # format 2: its file in the directory (format 1: the store's `bin`)
    xxh3: int | None = None  # format 2: a checksum of its bytes (format 1 has one per file)
    crc32: int | None = None
    copy: int = 0


@dataclass(frozen=True)
class IndexFile:
    """tensors/index.json (format 2)."""

    pieces: list[PieceRecord]


@dataclass(frozen=True)
class StoreFile:
    """tensors/NAME.json beside NAME.bin (format 1)."""

    bin: str
    entries: list[PieceRecord]


def parse_json(cls: type, data: bytes, path: Path):
    """A JSON document of a checkpoint as the typed `cls`; a damaged one is CorruptCheckpointError."""
    try:
        return from_dict(cls, json.loads(data), "", document=path.name)
    except (ValueError, RecursionError) as err:  # JSON, UTF-8 and ConfigError are ValueErrors
        raise CorruptCheckpointError(f"{path} is corrupt: {err}") from None


@dataclass(frozen=True)
class Piece:
    name: str
    key: str
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


def tensor_bytes(tensor: torch.Tensor):
    """A contiguous CPU tensor's bytes as a buffer (no copy; any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _is_host_memory(tensor: torch.Tensor) -> bool:
    """Whether a file can be read straight into `tensor`: plain, contiguous CPU memory (not a GPU
    tensor, the meta device, a tensor subclass or one that records gradients)."""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and not tensor.requires_grad
    )


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
        write_synced(self.index_path, index_bytes)
        return {
            self.bin_path.name: {"bytes": size, "sha256": self._sha.hexdigest() if self._sha else None},
            self.index_path.name: {"bytes": len(index_bytes), "sha256": hashlib.sha256(index_bytes).hexdigest()},
        }


def write_index(directory: Path, records: list[dict]) -> bytes:
    """Writes the format-2 index of a directory's pieces; returns its bytes."""
    data = json.dumps({"pieces": records}, separators=(",", ":")).encode()
    write_synced(Path(directory) / INDEX_FILE, data)
    return data


class TensorReader:
    """Reads any region of any stored tensor, or any fragment of any box, from the pieces in a
    directory (format 2 or 1), checking the checksum of every piece it reads.

    `prefer`: a file whose pieces are read where one matches a request exactly (a rank's own file
    on the layout that wrote it). `index`: the format-2 index's bytes, when the caller has read
    (and checked) them. `sizes`: {file name: bytes} of the directory's files as the checkpoint's
    manifest lists them (a piece in a file it does not list is damage; without `sizes` each file
    is looked at once). `shapes`: {parameter: full shape} as the model declares them (every reader
    of a checkpoint gives them; a piece of another shape, or of a parameter the model does not
    declare, is damage). `bytes_read` counts the tensor bytes read."""

    def __init__(
        self,
        directory: Path,
        prefer: str | None = None,
        index: bytes | None = None,
        sizes: dict[str, int] | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ):
        self.directory = Path(directory)
        self.prefer = prefer
        self.bytes_read = 0
        self.index_bytes = 0
        self._listed = sizes is not None  # the manifest lists the files: no other file is the checkpoint's
        self._sizes = dict(sizes or {})
        self._shapes = shapes
        self._by_key: dict[tuple[str, str], list[Piece]] = {}
        self._keys: dict[str, set[str]] = {}
        self._paths: dict[str, Path] = {}  # one Path per file, not per piece
        self._files: dict[Path, object] = {}  # open files
        self._preloaded: dict[Path, torch.Tensor] = {}  # whole files read ahead (preload)
        self._bad: dict[Piece, str] = {}  # pieces preload found torn or corrupt
        self._staging: torch.Tensor | None = None  # host memory pieces pass through on their way elsewhere
        index_path = self.directory / INDEX_FILE
        if index is None and index_path.is_file():
            index = index_path.read_bytes()
        if index is not None:
            self.index_bytes += len(index)
            collecting = gc.isenabled()
            gc.disable()  # many small objects at once: no full collections of a training process's heap
            try:
                for i, record in enumerate(parse_json(IndexFile, index, index_path).pieces):
                    self._add(self._checked(record, record.file, index_path, i, needs_checksum=True))
            finally:
                if collecting:
                    gc.enable()
        for store in sorted(self.directory.glob("*.json")):
            if store.name != INDEX_FILE:
                meta = parse_json(StoreFile, store.read_bytes(), store)
                for i, record in enumerate(meta.entries):
                    self._add(self._checked(record, meta.bin, store, i, needs_checksum=False))

    def _checked(self, record: PieceRecord, file: str, where: Path, i: int, needs_checksum: bool) -> Piece:
        """The piece a record describes, after checking everything reading it relies on."""

        def damaged(problem: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"{where} is corrupt: piece {i} ({record.name!r}, {record.key}) {problem}")

        full_shape, box = tuple(record.full_shape), tuple(tuple(r) for r in record.index)
        if len(box) != len(full_shape) or not all(0 <= a < b <= n for (a, b), n in zip(box, full_shape)):
            raise damaged(f"has the box {record.index}, which does not lie in its full shape {record.full_shape}")
        if self._shapes is not None and self._shapes.get(record.name) != full_shape:
            declared = self._shapes.get(record.name)
            raise damaged(
                "is of a parameter the model does not declare"
                if declared is None
                else f"has the full shape {record.full_shape}, the model declares {list(declared)}"
            )
        box_numel = math.prod(b - a for a, b in box)
        flat = tuple(record.flat) if record.flat is not None else (0, box_numel)
        if not 0 <= flat[0] <= flat[1] <= box_numel:
            raise damaged(f"has the flat range {list(flat)}, outside its box of {box_numel} elements")
        digest = next(((name, getattr(record, name)) for name in _HASHERS if getattr(record, name) is not None), None)
        if needs_checksum and digest is None:
            raise damaged("has no checksum")
        if record.offset < 0 or record.copy < 0:
            raise damaged(f"has a negative offset ({record.offset}) or copy ({record.copy})")
        end = record.offset + (flat[1] - flat[0]) * _DTYPES[record.dtype].itemsize
        size = self._size_of(file, damaged)
        if end > size:
            raise damaged(f"ends at byte {end}, past the end of {file} ({size} bytes)")
        path = self._paths[file]
        return Piece(
            record.name, record.key, record.dtype, path, record.offset, full_shape, box, flat, digest, record.copy
        )

    def _size_of(self, file: str, damaged) -> int:
        """The size of a file of the directory a piece names: a plain file name (nothing leading
        out), as the manifest lists it (or on the disk, without a manifest)."""
        if file not in self._paths:
            try:
                parts = relative_parts(self.directory, file)
            except UnsafePathError as err:
                raise damaged(f"names a file that is not the checkpoint's: {err}") from None
            if len(parts) != 1 or not file.endswith(".bin"):
                raise damaged(f"names {file!r}, which is not a tensor file of {self.directory}")
            self._paths[file] = self.directory / file
        if file not in self._sizes:
            if self._listed:
                raise damaged(f"is in {file}, a file the checkpoint's manifest does not list")
            try:
                self._sizes[file] = self._path(self._paths[file]).stat().st_size
            except FileNotFoundError:
                raise damaged(f"is in {file}, which is missing") from None
        return self._sizes[file]

    def _path(self, path: Path) -> Path:
        """A file of the directory, refused (as damage) if a symbolic link leads it out."""
        try:
            return confined(self.directory, path.name)
        except UnsafePathError as err:
            raise CorruptCheckpointError(f"{path} is not a file of the checkpoint: {err}") from None

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
        a 1-D tensor: `out` when given (1-D, of that many elements, of any dtype and on any device:
        the elements are cast to its dtype and copied to its device)."""
        pieces = self._pieces(name, key, primary=False)
        box, flat = tuple(tuple(r) for r in box), tuple(flat)
        count = flat[1] - flat[0]
        if out is None:
            out = torch.empty(count, dtype=_DTYPES[pieces[0].dtype])
        elif out.dim() != 1 or out.numel() != count:
            raise ValueError(f"{name!r} ({key}): {count} elements are read into a tensor of shape {tuple(out.shape)}")
        exact = [p for p in pieces if p.box == box and p.flat == flat]
        if exact:
            own = [p for p in exact if p.file.name == self.prefer]
            self._read_exact((own or [p for p in exact if p.copy == 0] or exact)[0], out)
            return out
        wanted = list(boxes.rectangles(box, flat))
        covered = 0
        for piece in (p for p in pieces if p.copy == 0 and boxes.overlaps(p.box, box)):
            pairs = [
                (r, at, q, pat)
                for r, at in wanted
                for q, pat in boxes.rectangles(piece.box, piece.flat)
                if boxes.overlaps(r, q)
            ]
            if not pairs:
                continue
            data = self._host_bytes(piece, pinned=out.is_cuda).view(_DTYPES[piece.dtype])
            for r, at, q, pat in pairs:
                both = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(r, q))
                target = out[at : at + boxes.numel(r)].view(boxes.sizes(r))
                source = data[pat : pat + boxes.numel(q)].view(boxes.sizes(q))
                target[boxes.local(both, r)] = source[boxes.local(both, q)]  # cast to out's dtype, copied to its device
                covered += boxes.numel(both)
        if covered != count:
            raise CheckpointError(
                f"checkpoint pieces of {name!r} ({key}) cover {covered} of the {count} "
                f"elements asked for: a shard file is missing"
            )
        return out

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
        size = max((p.offset + p.nbytes for p in pieces), default=0)  # within the file: checked when indexed
        data = torch.empty(size, dtype=torch.uint8)
        with open(self._path(file), "rb") as f:
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

    def _read_exact(self, piece: Piece, out: torch.Tensor) -> None:
        """A piece into `out`: straight from its file where `out` is host memory of the piece's
        dtype, else through host memory (cast to out's dtype, copied to out's device)."""
        dtype = _DTYPES[piece.dtype]
        if piece.file not in self._preloaded and out.dtype == dtype and _is_host_memory(out):
            self._read_into(piece, tensor_bytes(out))
        else:
            out.copy_(self._host_bytes(piece, pinned=out.is_cuda).view(dtype))

    def _host_bytes(self, piece: Piece, pinned: bool = False) -> torch.Tensor:
        """A piece's bytes (uint8) in host memory, checked: a view of its preloaded file, or of the
        reader's staging buffer (valid until the next read; pinned where the piece goes to a GPU,
        grown to the largest piece read)."""
        if piece in self._bad:
            raise CorruptCheckpointError(self._bad[piece])
        preloaded = self._preloaded.get(piece.file)
        if preloaded is not None:  # checked when it was read
            self.bytes_read += piece.nbytes
            return preloaded[piece.offset : piece.offset + piece.nbytes]
        staging = self._staging
        if staging is None or staging.numel() < piece.nbytes or (pinned and not staging.is_pinned()):
            size = max(piece.nbytes, 0 if staging is None else staging.numel())
            staging = self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        buffer = staging[: piece.nbytes]
        self._read_into(piece, buffer.numpy())
        return buffer

    def _read_into(self, piece: Piece, buffer) -> None:
        """Reads a piece's bytes into a host buffer (a numpy view) and checks its checksum."""
        if piece in self._bad:
            raise CorruptCheckpointError(self._bad[piece])
        handle = self._files.get(piece.file)
        if handle is None:
            path = self._path(piece.file)
            if not path.is_file():
                raise CorruptCheckpointError(f"{piece.file} is missing")
            handle = self._files[piece.file] = open(path, "rb")
        handle.seek(piece.offset)
        if handle.readinto(buffer) != piece.nbytes:
            raise CorruptCheckpointError(f"{piece.file} is truncated: {piece.name!r} ({piece.key}) ends past its end")
        if piece.checksum is not None and _digest(piece.checksum[0], buffer) != piece.checksum[1]:
            raise CorruptCheckpointError(self._corrupt(piece))
        self.bytes_read += piece.nbytes

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._preloaded.clear()
        self._staging = None


def sha256_file(path: Path, progress=None) -> str:
    """A file's sha256 (format 1); `progress(n)` is told of every block."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            if progress is not None:
                progress(len(block))
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
