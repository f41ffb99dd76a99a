"""A minimal reader and writer for the protobuf wire format.

MindSpore stores checkpoints and parallel-strategy files as protobuf
messages. Only a handful of small messages are involved, so instead of
depending on generated protobuf classes (and on MindSpore's .proto files)
pangu decodes the wire format directly. The encoding, in brief:

    message := field*
    field   := key payload
    key     := varint(field_number << 3 | wire_type)

    wire type 0 (VARINT):  payload is a base-128 varint (int32/int64/uint/bool)
    wire type 1 (FIXED64): payload is 8 little-endian bytes
    wire type 2 (LEN):     payload is varint(length) followed by `length` bytes
                           (strings, bytes, nested messages, packed repeated)
    wire type 5 (FIXED32): payload is 4 little-endian bytes

Negative int32/int64 values are varints of their 64-bit two's complement
(always 10 bytes). Fields may appear in any order and repeated fields are
simply repeated keys; concatenating two serialized messages merges them.

The reader works on anything indexed like bytes (bytes, an mmap, or
ckpt.py's file read on demand: `data[i]` an int, `data[a:b]` bytes, `len(data)`)
and never reads a LEN payload: it reports where the payload lies, so a
multi-gigabyte tensor is skipped, not read. Malformed input raises
`WireFormatError`, which carries the byte offset of the problem.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from enum import IntEnum
from typing import NamedTuple

# Indexable byte buffers: data[i] is an int, data[a:b] a bytes-like copy (ckpt.py adds a file
# read on demand, indexed the same way).
Buffer = bytes | bytearray | mmap.mmap


class WireType(IntEnum):
    VARINT = 0
    FIXED64 = 1
    LEN = 2
    FIXED32 = 5


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at byte offset {offset}")
        self.offset = offset


class Field(NamedTuple):
    """One decoded field of a message.

    For VARINT, FIXED32 and FIXED64 fields `value` is the (unsigned) integer.
    For LEN fields `value` is unused (0) and the payload is
    `data[start:end]`. For all fields `offset` is where the field's key
    starts and `end` where the next field begins.
    """

    number: int
    wire_type: WireType
    value: int
    offset: int
    start: int
    end: int


_MAX_VARINT_BYTES = 10


def decode_varint(data: Buffer, offset: int, end: int | None = None) -> tuple[int, int]:
    """Decode the varint at `offset`; return (value, offset just after it)."""
    limit = len(data) if end is None else end
    if offset < limit and (byte := data[offset]) < 0x80:  # one byte: most keys and lengths
        return byte, offset + 1
    value = 0
    shift = 0
    position = offset
    while True:
        if position >= limit:
            raise WireFormatError("truncated varint", offset)
        if position - offset >= _MAX_VARINT_BYTES:
            raise WireFormatError("varint longer than 10 bytes", offset)
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            # A 10-byte varint may carry bits above 2**64; protobuf drops them.
            return value & 0xFFFF_FFFF_FFFF_FFFF, position


def to_signed64(value: int) -> int:
    """Reinterpret an unsigned varint as the int64/int32 it encodes."""
    return value - (1 << 64) if value >= (1 << 63) else value


def iter_fields(data: Buffer, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """Yield the fields of the message stored in `data[start:end]`, in order."""
    limit = len(data) if end is None else end
    if limit > len(data):
        raise WireFormatError(f"message claims to end at {limit} but the data has {len(data)} bytes", start)
    position = start
    while position < limit:
        field_offset = position
        key, position = decode_varint(data, position, limit)
        number, wire_type = key >> 3, key & 0x7
        if number == 0:
            raise WireFormatError("field number 0 is invalid", field_offset)
        if wire_type == WireType.VARINT:
            value, position = decode_varint(data, position, limit)
            yield Field(number, WireType.VARINT, value, field_offset, position, position)
        elif wire_type == WireType.LEN:
            length, payload_start = decode_varint(data, position, limit)
            payload_end = payload_start + length
            if payload_end > limit:
                raise WireFormatError(
                    f"field {number} needs {length} bytes but only {limit - payload_start} remain",
                    field_offset,
                )
            position = payload_end
            yield Field(number, WireType.LEN, 0, field_offset, payload_start, payload_end)
        elif wire_type in (WireType.FIXED32, WireType.FIXED64):
            size = 4 if wire_type == WireType.FIXED32 else 8
            if position + size > limit:
                raise WireFormatError(f"truncated fixed{size * 8} field {number}", field_offset)
            value = int.from_bytes(data[position : position + size], "little")
            position += size
            yield Field(number, WireType(wire_type), value, field_offset, position, position)
        else:
            # Wire types 3 and 4 (groups) are deprecated and unused by MindSpore.
            raise WireFormatError(f"unsupported wire type {wire_type} for field {number}", field_offset)


def read_repeated_ints(data: Buffer, fields: list[Field], *, signed: bool = True) -> list[int]:
    """Collect a repeated integer field written either unpacked or packed.

    proto2 writes repeated scalars unpacked (one VARINT field per element);
    readers must also accept the packed form (one LEN field of varints).
    """
    values: list[int] = []
    for field in fields:
        if field.wire_type == WireType.VARINT:
            values.append(field.value)
        elif field.wire_type == WireType.LEN:
            position = field.start
            while position < field.end:
                value, position = decode_varint(data, position, field.end)
                values.append(value)
        else:
            raise WireFormatError(f"field {field.number} is not an integer field", field.offset)
    return [to_signed64(value) for value in values] if signed else values


def decode_string(data: Buffer, field: Field) -> str:
    """The UTF-8 text of a LEN field (a proto `string`)."""
    try:
        return bytes(data[field.start : field.end]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise WireFormatError(f"string field {field.number} is not UTF-8", field.offset) from error


# ---------------------------------------------------------------------------
# Writing


def encode_varint(value: int) -> bytes:
    """Encode an int64/uint64 as a varint (negative numbers take 10 bytes)."""
    if value < 0:
        value += 1 << 64
    if not 0 <= value < (1 << 64):
        raise ValueError(f"{value} does not fit in 64 bits")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_key(number: int, wire_type: WireType) -> bytes:
    return encode_varint(number << 3 | wire_type)


def encode_varint_field(number: int, value: int) -> bytes:
    return encode_key(number, WireType.VARINT) + encode_varint(value)


def encode_len_header(number: int, length: int) -> bytes:
    """The key and length prefix of a LEN field, for writing a large payload separately."""
    return encode_key(number, WireType.LEN) + encode_varint(length)


def encode_len_field(number: int, payload: bytes) -> bytes:
    return encode_len_header(number, len(payload)) + payload


def encode_string_field(number: int, text: str) -> bytes:
    return encode_len_field(number, text.encode("utf-8"))


def encode_fixed32_field(number: int, value: int) -> bytes:
    return encode_key(number, WireType.FIXED32) + (value & 0xFFFF_FFFF).to_bytes(4, "little")


def encode_fixed64_field(number: int, value: int) -> bytes:
    return encode_key(number, WireType.FIXED64) + (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


def encode_repeated_varints(number: int, values: list[int] | tuple[int, ...]) -> bytes:
    """A repeated integer field in proto2's default unpacked form, as MindSpore writes it."""
    return b"".join(encode_varint_field(number, value) for value in values)
