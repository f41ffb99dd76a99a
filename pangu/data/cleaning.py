"""Document cleaning, after the PanGu-alpha paper: normalise, filter, deduplicate.

Every document is first normalised (whitespace, control characters, optionally traditional ->
simplified). Then the filters run in this order, and a document is counted against the FIRST
filter that removes it:

- `too_long`           a JSON record too long to read (sources.py; data.cleaning.max_document_size)
- `invalid_unicode`    a lone surrogate: bytes that are not UTF-8, or an unpaired `\\ud800` escape
                       in JSON; such text cannot be encoded, so it is dropped, not allowed to stop
                       the preparation
- `too_short`          fewer than `min_length` characters, whitespace not counted
- `low_chinese_ratio`  Chinese characters / non-whitespace characters below `min_chinese_ratio`
- `duplicate`          exactly the same normalised text as a document kept earlier, in any source
- `near_duplicate`     (data.near_dedup) nearly the same text as an earlier document (MinHash LSH)

`Cleaner` applies the middle ones to one document at a time (`check`), which is what the workers
of `prepare` do; deduplication there runs over the whole corpus afterwards (`dedup.py`).
`Cleaner.clean` runs all but `too_long`, exact deduplication included, over a sequence in memory:
the reference the tests compare `prepare` with.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import opencc

from pangu.config import CleaningConfig

FILTERS = ("too_long", "invalid_unicode", "too_short", "low_chinese_ratio", "duplicate", "near_duplicate")

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # the only code points UTF-8 cannot encode
_ZERO_WIDTH_AND_CONTROL = re.compile("[\u200b\u200c\u200d\u2060\ufeff\x00-\x08\x0e-\x1f\x7f]")
_HORIZONTAL_WHITESPACE = re.compile(r"[^\S\n]+")  # tabs, full-width and no-break spaces, ...
_BLANK_LINES = re.compile(r"\n{3,}")
_WHITESPACE = re.compile(r"\s+")
# CJK Unified Ideographs, extension A, compatibility ideographs, extensions B and later
_CHINESE_CHARACTER = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def normalize_whitespace(text: str) -> str:
    """Every line break style becomes `\\n`, any other run of whitespace (tabs, U+3000 full-width
    spaces, no-break spaces) one ASCII space; lines are stripped, runs of blank lines become one
    blank line, and zero-width and control characters are dropped. Newlines inside the document
    are kept: they are part of the text the model learns."""
    text = _ZERO_WIDTH_AND_CONTROL.sub("", text)
    lines = (_HORIZONTAL_WHITESPACE.sub(" ", line).strip() for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def visible_length(text: str) -> int:
    return len(text) - sum(len(run) for run in _WHITESPACE.findall(text))


def chinese_ratio(text: str) -> float:
    visible = visible_length(text)
    # subn counts without a list of one-character strings (50 bytes each)
    return _CHINESE_CHARACTER.subn("", text)[1] / visible if visible else 0.0


def text_key(text: str) -> bytes:
    """The identity of a document for deduplication: a hash of its normalised text."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def hash_fraction(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text alone: `hash_fraction(t, s) < f` picks a deterministic
    fraction f of documents, independent of their order. Different salts give independent picks."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class CleaningReport:
    """What happened to one source's documents."""

    documents: int = 0  # read from the source (a long document cut in n counts n times)
    too_long: int = 0
    invalid_unicode: int = 0
    too_short: int = 0
    low_chinese_ratio: int = 0
    duplicate: int = 0
    near_duplicate: int = 0
    kept: int = 0
    kept_characters: int = 0
    long_cut: int = 0  # documents longer than data.cleaning.max_document_size, cut into several

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def explain_empty(self, config: CleaningConfig) -> str:
        """Why nothing was kept, for an error message."""
        if self.documents == 0:
            return "the source yielded no documents at all"
        thresholds = {
            "too_long": f"records over 16 x data.cleaning.max_document_size = {config.max_document_size}",
            "invalid_unicode": "text that is not valid Unicode",
            "too_short": f"data.cleaning.min_length = {config.min_length}",
            "low_chinese_ratio": f"data.cleaning.min_chinese_ratio = {config.min_chinese_ratio}",
            "duplicate": "data.cleaning.deduplicate = true",
            "near_duplicate": "data.near_dedup.enabled = true",
        }
        removed = [
            f"{name} removed {getattr(self, name)} ({thresholds[name]})" for name in FILTERS if getattr(self, name)
        ]
        return f"of {self.documents} documents read, " + ", ".join(removed)


@functools.cache
def _opencc_t2s() -> opencc.OpenCC:
    return opencc.OpenCC("t2s")


def _to_simplified(text: str) -> str:
    """Traditional -> simplified Chinese by OpenCC's phrase tables, which keep characters that are
    simplified only in some words (乾隆 stays, not 干隆; 著名 stays, not 着名)."""
    return _opencc_t2s().convert(text)


class Cleaner:
    """Applies the cleaning config. One Cleaner is used for all sources of a corpus, so that a
    document repeated in a second source counts as a duplicate there."""

    def __init__(self, config: CleaningConfig) -> None:
        self.config = config
        self._seen: set[bytes] = set()

    def normalize(self, text: str) -> str:
        text = normalize_whitespace(text)
        return _to_simplified(text) if self.config.to_simplified else text

    def check(self, raw: str) -> tuple[str, str | None]:
        """The normalised text of a raw document, and the filter that removes it (deduplication
        aside) or None."""
        if _LONE_SURROGATE.search(raw):
            return raw, "invalid_unicode"
        text = self.normalize(raw)
        if not text or visible_length(text) < self.config.min_length:
            return text, "too_short"
        if chinese_ratio(text) < self.config.min_chinese_ratio:
            return text, "low_chinese_ratio"
        return text, None

    def clean(self, documents: Iterable[str]) -> tuple[list[str], CleaningReport]:
        """The kept documents (normalised), in order, and what each filter removed."""
        report = CleaningReport()
        kept: list[str] = []
        for raw in documents:
            report.documents += 1
            text, reason = self.check(raw)
            if reason is not None:
                setattr(report, reason, getattr(report, reason) + 1)
                continue
            key = text_key(text)
            if self.config.deduplicate:
                if key in self._seen:
                    report.duplicate += 1
                    continue
                self._seen.add(key)
            kept.append(text)
            report.kept_characters += len(text)
        report.kept = len(kept)
        return kept, report
