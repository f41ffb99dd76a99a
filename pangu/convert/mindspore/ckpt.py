"""MindSpore checkpoints (`.ckpt`), read and written without MindSpore.

A checkpoint is a protobuf `Checkpoint` message (mindspore/ccsrc/utils/checkpoint.proto)::

    message Checkpoint {
      message Value {
        required string tag = 1;                 // parameter name
        required TensorProto tensor = 2;
        optional MapTensorProto maptensor = 3;   // not used by PanGu-alpha
      }
      repeated Value value = 1;
    }
    message TensorProto {
      repeated int64 dims = 1;
      required string tensor_type = 2;           // "Float32", "Float16", "BFloat16", ...
      required bytes tensor_content = 3;         // raw little-endian C-order data
    }

MindSpore writes one `Value` per tensor, except that a tensor larger than 512 MiB is cut into
consecutive `Value`s with the same tag and the same full `dims`; their contents concatenate to
the tensor. A scalar is written with `dims = [0]` and one element.

One record scanner, `scan_records`, locates every Value by reading only the record headers: small
`os.pread` reads with the kernel's read-ahead turned off, the tensor bytes skipped. Everything
else starts from it: `index_mindspore_ckpt` (name -> `StoredTensor`, what the release merger
indexes its 512 slice files with, reading a few kilobytes of each), `read_mindspore_ckpt` (every
tensor, in file order), `read_mindspore_ckpt_shapes`, `read_one_tensor`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from pangu.convert.mindspore import wire

PathLike = str | Path

# MindSpore's tensor_type strings (str(mindspore dtype)) and the numpy dtype of their stored
# bytes. numpy has no bfloat16: it is stored as its raw 16 bits and widened to float32 on
# reading (exact: bfloat16 is a truncated float32).
NUMPY_DTYPE_OF_TENSOR_TYPE: dict[str, np.dtype] = {
    "Bool": np.dtype(np.bool_),
    "Int8": np.dtype(np.int8),
    "UInt8": np.dtype(np.uint8),
    "Int16": np.dtype(np.int16),
    "UInt16": np.dtype(np.uint16),
    "Int32": np.dtype(np.int32),
    "UInt32": np.dtype(np.uint32),
    "Int64": np.dtype(np.int64),
    "UInt64": np.dtype(np.uint64),
    "Float16": np.dtype(np.float16),
    "Float32": np.dtype(np.float32),
    "Float64": np.dtype(np.float64),
    "Complex64": np.dtype(np.complex64),
    "Complex128": np.dtype(np.complex128),
}
BFLOAT16 = "BFloat16"
_TENSOR_TYPE_OF_NUMPY_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPE_OF_TENSOR_TYPE.items()}

# MindSpore cuts tensors larger than this into several Values (SLICE_SIZE in
# mindspore/train/serialization.py is 512 * 1024 KiB).
MINDSPORE_CHUNK_BYTES = 512 * 1024 * 1024


class TensorChunk(NamedTuple):
    """Where one `Checkpoint.Value` lies in the file; its content is not read."""

    tag: str
    dims: tuple[int, ...]
    tensor_type: str
    content_start: int
    content_end: int
    offset: int  # where the Value record starts, for error messages


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint: its name, shape, type and the Value records holding it."""

    name: str
    shape: tuple[int, ...]
    tensor_type: str
    chunks: tuple[TensorChunk, ...]

    @property
    def nbytes(self) -> int:
        return sum(chunk.content_end - chunk.content_start for chunk in self.chunks)


# ---------------------------------------------------------------------------------------------
# The record scanner


class _FileBytes:
    """A file indexed like bytes (`data[i]`, `data[a:b]`, `len(data)`), read on demand with
    `os.pread` in small windows, so that walking its records reads their headers and nothing of
    the payloads they skip."""

    WINDOW = 1024  # bytes read at a miss: a whole Value header unless a name or dims are very long

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._start, self._stop, self._window = 0, 0, b""

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: int | slice) -> int | bytes:
        if type(key) is int:
            if not self._start <= key < self._stop:
                self._read_window(key)
            return self._window[key - self._start]
        start, stop, _ = key.indices(self._size)
        if self._start <= start and stop <= self._stop:
            return self._window[start - self._start : stop - self._start]
        return os.pread(self._fd, max(0, stop - start), start)

    def _read_window(self, start: int) -> None:
        self._window = os.pread(self._fd, self.WINDOW, start) if 0 <= start < self._size else b""
        if not self._window:
            raise IndexError(start)
        self._start, self._stop = start, start + len(self._window)


def scan_records(path: PathLike) -> list[TensorChunk]:
    """Every Value of a MindSpore checkpoint, in file order, located by reading only the headers.

    The structure is checked in full: a truncated or foreign file raises `ValueError` naming the
    file and the byte offset."""
    path = Path(path)
    with open(path, "rb", buffering=0) as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError(f"{path}: file is empty")
        if hasattr(os, "posix_fadvise"):  # no read-ahead: the reads are small and scattered
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        data = _FileBytes(fd, size)
        chunks: list[TensorChunk] = []
        try:
            for value in wire.iter_fields(data):
                if value.number != 1 or value.wire_type != wire.WireType.LEN:
                    raise wire.WireFormatError(
                        f"top-level field {value.number} (wire type {value.wire_type}) is not a Checkpoint.Value",
                        value.offset,
                    )
                chunks.append(_decode_value(data, value))
        except wire.WireFormatError as error:
            raise ValueError(f"{path}: not a readable MindSpore checkpoint: {error}") from error
    return chunks


def _decode_value(data: wire.Buffer, value: wire.Field) -> TensorChunk:
    tag: str | None = None
    tensor: wire.Field | None = None
    for item in wire.iter_fields(data, value.start, value.end):
        if item.number == 1 and item.wire_type == wire.WireType.LEN:
            tag = wire.decode_string(data, item)
        elif item.number == 2 and item.wire_type == wire.WireType.LEN:
            tensor = item
        elif item.number == 3:
            raise wire.WireFormatError(f"parameter {tag!r} is a MapTensor, which pangu cannot import", item.offset)
    if tag is None or tensor is None:
        raise wire.WireFormatError("Checkpoint.Value without a tag or a tensor", value.offset)

    dims_fields: list[wire.Field] = []
    tensor_type: str | None = None
    content: wire.Field | None = None
    for item in wire.iter_fields(data, tensor.start, tensor.end):
        if item.number == 1:
            dims_fields.append(item)
        elif item.number == 2 and item.wire_type == wire.WireType.LEN:
            tensor_type = wire.decode_string(data, item)
        elif item.number == 3 and item.wire_type == wire.WireType.LEN:
            content = item
    if tensor_type is None or content is None:
        raise wire.WireFormatError(f"tensor {tag!r} has no tensor_type or no tensor_content", tensor.offset)
    dims = tuple(wire.read_repeated_ints(data, dims_fields))
    return TensorChunk(tag, dims, tensor_type, content.start, content.end, value.offset)


def _group_by_tag(chunks: list[TensorChunk]) -> list[list[TensorChunk]]:
    """Gather the consecutive Values that MindSpore wrote for one large tensor."""
    groups: list[list[TensorChunk]] = []
    for chunk in chunks:
        if groups and groups[-1][0].tag == chunk.tag:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


def _shape_of(chunks: list[TensorChunk]) -> tuple[int, ...]:
    """The tensor's shape: MindSpore writes a scalar as dims [0] with one element."""
    has_content = any(chunk.content_end > chunk.content_start for chunk in chunks)
    return () if chunks[0].dims == (0,) and has_content else chunks[0].dims


def _stored(chunks: list[TensorChunk], path: Path) -> StoredTensor:
    """The tensor a group of consecutive Values holds, its records checked against each other and,
    for a known tensor_type, its content size against its dims."""
    first = chunks[0]
    where = f"{path}: tensor {first.tag!r} at byte offset {first.offset}"
    if any(chunk.dims != first.dims or chunk.tensor_type != first.tensor_type for chunk in chunks):
        raise ValueError(f"{where}: its consecutive chunks disagree on dims or tensor_type")
    stored = StoredTensor(sys.intern(first.tag), _shape_of(chunks), first.tensor_type, tuple(chunks))
    dtype = _stored_dtype(stored.tensor_type)
    if dtype is not None and stored.nbytes != math.prod(stored.shape) * dtype.itemsize:
        raise ValueError(
            f"{where}: dims {list(first.dims)} of {first.tensor_type} need "
            f"{math.prod(stored.shape) * dtype.itemsize} bytes but the content has {stored.nbytes}"
        )
    return stored


def _stored_dtype(tensor_type: str) -> np.dtype | None:
    """The numpy dtype of the stored bytes (BFloat16 as its raw uint16 bits); None if unknown."""
    return np.dtype(np.uint16) if tensor_type == BFLOAT16 else NUMPY_DTYPE_OF_TENSOR_TYPE.get(tensor_type)


# ---------------------------------------------------------------------------------------------
# Reading


def index_mindspore_ckpt(path: PathLike) -> dict[str, StoredTensor]:
    """Name -> `StoredTensor` of every tensor of a MindSpore checkpoint, reading only the headers.

    A name stored twice (not as the consecutive chunks of one large tensor) is an error."""
    path = Path(path)
    index: dict[str, StoredTensor] = {}
    for chunks in _group_by_tag(scan_records(path)):
        stored = _stored(chunks, path)
        if stored.name in index:
            raise ValueError(
                f"{path}: holds {stored.name!r} twice (at byte offsets {index[stored.name].chunks[0].offset} "
                f"and {chunks[0].offset})"
            )
        index[stored.name] = stored
    return index


def read_mindspore_ckpt(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of a MindSpore checkpoint, in file order.

    The file's structure is checked in full before the first tensor is yielded, so a truncated
    or foreign file fails up front with a `ValueError` naming the file and byte offset. Each array
    is a fresh copy (writable, independent of the file), read only when it is yielded, so peak
    memory is one tensor. BFloat16 tensors are returned as float32 (exactly: every bfloat16 value
    is a float32 value).
    """
    path = Path(path)
    tensors = [_stored(chunks, path) for chunks in _group_by_tag(scan_records(path))]
    with open(path, "rb", buffering=0) as file:
        for stored in tensors:
            yield stored.name, _read_tensor(file, stored, path)


def read_mindspore_ckpt_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a checkpoint's tensors, reading only the headers."""
    return {chunks[0].tag: _shape_of(chunks) for chunks in _group_by_tag(scan_records(path))}


def read_one_tensor(path: PathLike, name: str) -> np.ndarray:
    """One tensor of a MindSpore checkpoint by name, without reading the others."""
    index = index_mindspore_ckpt(path)
    if name not in index:
        raise ValueError(f"{path}: has no tensor {name!r}")
    return read_stored_tensor(path, index[name])


def read_stored_tensor(path: PathLike, stored: StoredTensor) -> np.ndarray:
    """The array of one indexed tensor (a fresh copy; BFloat16 widened to float32)."""
    path = Path(path)
    with open(path, "rb", buffering=0) as file:
        return _read_tensor(file, stored, path)


def read_stored_into(path: PathLike, stored: StoredTensor, out: np.ndarray) -> None:
    """Read an indexed tensor's bytes straight into `out`, a C-contiguous array of its shape and
    (non-bfloat16) dtype: one read per chunk, no intermediate copy."""
    path = Path(path)
    expected = NUMPY_DTYPE_OF_TENSOR_TYPE.get(stored.tensor_type)
    if expected != out.dtype or tuple(out.shape) != stored.shape or not out.flags.c_contiguous:
        raise ValueError(
            f"{path}: cannot read {stored.tensor_type} {stored.shape} {stored.name!r} into a "
            f"{out.dtype} {out.shape} array"
        )
    if stored.nbytes != out.nbytes:
        raise ValueError(
            f"{path}: tensor {stored.name!r} at byte offset {stored.chunks[0].offset}: dims "
            f"{list(stored.shape)} of {stored.tensor_type} need {out.nbytes} bytes but the content has {stored.nbytes}"
        )
    with open(path, "rb", buffering=0) as file:
        _read_content(file, stored, out.reshape(-1).view(np.uint8), path)


def _read_tensor(file: BinaryIO, stored: StoredTensor, path: Path) -> np.ndarray:
    dtype = _stored_dtype(stored.tensor_type)
    if dtype is None:
        supported = ", ".join([*NUMPY_DTYPE_OF_TENSOR_TYPE, BFLOAT16])
        raise ValueError(
            f"{path}: tensor {stored.name!r} at byte offset {stored.chunks[0].offset}: unsupported "
            f"tensor_type {stored.tensor_type!r} (supported: {supported})"
        )
    array = np.empty(stored.nbytes // dtype.itemsize, dtype)  # the size was checked by _stored
    _read_content(file, stored, array.view(np.uint8), path)
    if stored.tensor_type == BFLOAT16:
        array = _bfloat16_bits_to_float32(array)
    return array.reshape(stored.shape)


def _read_content(file: BinaryIO, stored: StoredTensor, out: np.ndarray, path: Path) -> None:
    """The content of the tensor's Values, concatenated into the uint8 array `out`."""
    view = memoryview(out)
    position = 0
    for chunk in stored.chunks:
        file.seek(chunk.content_start)
        end = position + chunk.content_end - chunk.content_start
        while position < end:
            count = file.readinto(view[position:end])
            if not count:
                raise ValueError(f"{path}: ends inside tensor {stored.name!r}")
            position += count


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# Writing


def write_mindspore_ckpt(
    path: PathLike,
    named_arrays: Iterable[tuple[str, np.ndarray]],
    *,
    tensor_types: Mapping[str, str] | None = None,
    chunk_bytes: int = MINDSPORE_CHUNK_BYTES,
) -> None:
    """Write arrays as a MindSpore checkpoint, byte-compatible with MindSpore's own writer.

    The tensor type follows the array's dtype; `tensor_types` may override it per name, which is
    how a float32 array is stored as "BFloat16" (rounded to nearest even). Tensors larger than
    `chunk_bytes` are split into several Values as MindSpore does; tests pass a small
    `chunk_bytes` to exercise the reassembly.
    """
    tensor_types = tensor_types or {}
    with open(path, "wb") as file:
        for name, array in named_arrays:
            array = np.asarray(array)
            tensor_type = tensor_types.get(name) or _tensor_type_of(array.dtype, name)
            if tensor_type == BFLOAT16:
                stored = _to_bfloat16_bits(array, name)
            elif NUMPY_DTYPE_OF_TENSOR_TYPE.get(tensor_type) == array.dtype:
                stored = np.ascontiguousarray(array)
            else:
                raise ValueError(f"{name}: cannot store a {array.dtype} array as {tensor_type!r}")
            dims = list(array.shape) if array.ndim else [0]  # MindSpore's convention for scalars
            flat_bytes = stored.reshape(-1).view(np.uint8)
            for chunk in _split_bytes(flat_bytes, stored.itemsize, chunk_bytes):
                tensor_header = (
                    wire.encode_repeated_varints(1, dims)
                    + wire.encode_string_field(2, tensor_type)
                    + wire.encode_len_header(3, chunk.nbytes)
                )
                tensor_length = len(tensor_header) + chunk.nbytes
                value_header = wire.encode_string_field(1, name) + wire.encode_len_header(2, tensor_length)
                value_length = len(value_header) + tensor_length
                file.write(wire.encode_len_header(1, value_length) + value_header + tensor_header)
                file.write(memoryview(chunk))


def _to_bfloat16_bits(array: np.ndarray, name: str) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), as raw uint16 bits."""
    if array.dtype != np.float32:
        raise ValueError(f"{name}: only float32 arrays can be stored as BFloat16, got {array.dtype}")
    bits = np.ascontiguousarray(array).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # Rounding could turn a NaN with low payload bits into infinity; keep it a NaN.
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(np.isnan(array), quiet_nan, rounded).astype(np.uint16)


def _tensor_type_of(dtype: np.dtype, name: str) -> str:
    try:
        return _TENSOR_TYPE_OF_NUMPY_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"{name}: MindSpore checkpoints cannot hold dtype {dtype}") from None


def _split_bytes(flat_bytes: np.ndarray, itemsize: int, chunk_bytes: int) -> list[np.ndarray]:
    """Cut a tensor's bytes into near-equal whole-element pieces of at most `chunk_bytes`."""
    if flat_bytes.nbytes <= chunk_bytes:
        return [flat_bytes]
    elements = flat_bytes.reshape(-1, itemsize)
    pieces = math.ceil(flat_bytes.nbytes / chunk_bytes)
    return [piece.reshape(-1) for piece in np.array_split(elements, pieces)]
