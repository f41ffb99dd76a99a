"""Reading a prepared directory back: `load_prepared`, `load_tokenizer`, `read_meta`.

What a prepared directory holds (`data.prepared_dir`, written by `prepare.py`):
    tokenizer.model                 the SentencePiece model the shards were encoded with
    train-<i>-<k>.bin/.idx          source i's training documents, shard k (each document followed
                                    by the separator); a shard holds a run of the source's pieces
    valid-<i>-<k>.bin/.idx          the same for the validation documents
    meta.json                       inputs, tokenizer, every shard's counts, the cleaning report
    index-cache/                    blend and sample permutations, built once, memory-mapped

meta.json is read through the typed loader of configs (`Meta`, `schema.from_dict`): a field
missing or of the wrong type is a damaged file, named, never a KeyError. Format 2 (pangu before
the builtin corpus kept its held-out reviews to itself) differs only in what it said about those
reviews, and is read as well.

Start-up costs O(1) in the corpus size per rank (apart from one stat per shard file): meta.json
says how many tokens each shard holds, so the `.bin` files are checked by their size and mapped
on first use, no `.idx` is read, and the blend index and the epoch permutation come from
`index-cache/` (built there once, by `prepare` or the first process that needs them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pangu.config import DataConfig
from pangu.data import DataError
from pangu.data.cache import IndexCache
from pangu.data.cleaning import CleaningReport
from pangu.data.dataset import BlendedDataset, PackedDataset, SampleDataset
from pangu.data.indexed import IndexedShard, ShardTokens
from pangu.data.tokenizer import PanguTokenizer
from pangu.schema import ConfigError, from_dict

FORMAT_VERSION = 3
META_FILE = "meta.json"
INDEX_CACHE = "index-cache"
SPLITS = ("train", "valid")
# what `pangu prepare` writes into a prepared directory (and the trainer's index cache; format 1
# named its shards train-0.bin, format 2 held heldout_reviews.jsonl): it replaces the directory
# only when nothing else is in it
_PREPARED_ENTRY = re.compile(
    rf"(?:{re.escape(META_FILE)}|heldout_reviews\.jsonl|{INDEX_CACHE}|tokenizer\.model|(?:train|valid)-\d+(?:-\d+)?\.(?:bin|idx))"
)


@dataclass
class Counts:
    documents: int
    tokens: int


@dataclass
class ShardEntry:
    shard: str  # the shard's file name without .bin / .idx
    documents: int
    tokens: int


@dataclass
class SplitMeta:
    documents: int
    tokens: int
    shards: list[ShardEntry]


@dataclass
class SourceMeta:
    name: str
    kind: str
    path: str
    weight: float
    cleaning: CleaningReport
    train: SplitMeta
    valid: SplitMeta

    def splits(self) -> dict[str, SplitMeta]:
        return {"train": self.train, "valid": self.valid}


@dataclass
class TokenizerMeta:
    file: str
    kind: str
    fingerprint: str  # sha256 of the model file


@dataclass
class Inputs:
    """Everything the output depends on: the data config (the fields that change the output),
    and the path, size and modification time of every file read."""

    format_version: int
    data: DataConfig
    files: list[tuple[str, int, int]]
    snownlp_version: str = ""


@dataclass
class Totals:
    train: Counts
    valid: Counts


@dataclass
class Meta:
    """meta.json: what was made, not how or how long."""

    format_version: int
    input_fingerprint: str
    inputs: Inputs
    tokenizer: TokenizerMeta
    vocab_size: int
    eod_id: int
    pad_id: int
    sources: list[SourceMeta]
    pieces: int
    totals: Totals


def corpus_fingerprint(meta: Meta) -> str:
    """What identifies the corpus a prepared directory holds, for a run that resumes on it: the
    tokenizer, and each source's blend weight and every shard with its documents and tokens (the
    samples a run draws are a function of these). Not the input files' paths or times: the same
    corpus prepared again, elsewhere or from copied files, is the same corpus."""
    content = {
        "tokenizer": meta.tokenizer.fingerprint,
        "sources": [
            {
                "weight": s.weight,
                **{split: [dataclasses.astuple(e) for e in s.splits()[split].shards] for split in SPLITS},
            }
            for s in meta.sources
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def foreign_entries(prepared_dir: Path) -> list[str]:
    """The names in a prepared directory that `pangu prepare` did not write."""
    return sorted(p.name for p in prepared_dir.iterdir() if not _PREPARED_ENTRY.fullmatch(p.name))


_RERUN = "re-run `pangu prepare --config <your config>`"


def index_cache_dir(prepared_dir: str | Path, wait_minutes: float = IndexCache.wait_minutes) -> IndexCache:
    """Where the blend and sampler indices of a prepared directory are cached; a process waits up
    to `wait_minutes` for another one building an index it needs."""
    return IndexCache(Path(prepared_dir) / INDEX_CACHE, wait_minutes)


def load_prepared(
    prepared_dir: str | Path, split: Literal["train", "valid"], seq_length: int
) -> tuple[SampleDataset, dict[str, Any]]:
    """The packed samples of one split, blended across sources by their weights (a single source
    is its PackedDataset itself), and the meta.json report (checked field by field, as a dict).
    Everything is checked first."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    load_tokenizer(prepared_dir)  # the shards are only meaningful with the tokenizer that wrote them
    reason = why_untrainable(meta, seq_length, splits=(split,))
    if reason is not None:
        raise DataError(f"{prepared_dir}: {reason}")
    datasets = [
        PackedDataset(
            [
                ShardTokens(prepared_dir / entry.shard, entry.tokens, meta.vocab_size)
                for entry in source.splits()[split].shards
            ],
            seq_length,
        )
        for source in meta.sources
    ]
    report = dataclasses.asdict(meta)
    if len(datasets) == 1:
        return datasets[0], report
    weights = [source.weight for source in meta.sources]
    return BlendedDataset(datasets, weights, cache_dir=index_cache_dir(prepared_dir)), report


def why_untrainable(
    meta: Meta, seq_length: int, global_batch_size: int = 0, splits: tuple[str, ...] = SPLITS
) -> str | None:
    """Why a preparation cannot train a model of `seq_length` with global batches of
    `global_batch_size` samples (0: any), or None: every split of every source must hold a sample
    of seq_length + 1 tokens, and the training samples must fill a global batch."""
    sample = seq_length + 1
    for source in meta.sources:
        for split in splits:
            tokens = source.splits()[split].tokens
            if tokens < sample:
                return (
                    f"the {split} split of {source.name} holds {tokens} tokens, fewer than one sample of "
                    f"model.seq_length + 1 = {sample}; add data, raise data.valid_fraction or lower model.seq_length"
                )
    samples = sum(source.train.tokens // sample for source in meta.sources)
    if global_batch_size > samples:
        return (
            f"its {samples} training samples (of model.seq_length + 1 = {sample} tokens) do not fill one global "
            f"batch of train.global_batch_size = {global_batch_size}; lower it, or add data"
        )
    return None


def load_tokenizer(prepared_dir: str | Path) -> PanguTokenizer:
    """The tokenizer a prepared directory was encoded with, checked against its meta.json."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    tokenizer = PanguTokenizer.from_file(prepared_dir / meta.tokenizer.file)
    if tokenizer.fingerprint != meta.tokenizer.fingerprint:
        raise DataError(
            f"{prepared_dir / meta.tokenizer.file} is not the tokenizer the shards were written "
            f"with (its sha256 differs from meta.json); {_RERUN}"
        )
    return tokenizer


def read_meta(prepared_dir: str | Path) -> Meta:
    meta_path = Path(prepared_dir) / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{str(prepared_dir)!r} holds no prepared data ({META_FILE} is missing); run "
            f"`pangu prepare --config <your config>` first (data.prepared_dir names this directory)"
        )
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_path} is damaged ({err}); {_RERUN}") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version == 2:
        raw = _from_format_2(raw)
    elif isinstance(raw, dict) and version != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} was written by another version of pangu (format {version}, expected "
            f"{FORMAT_VERSION}); {_RERUN}"
        )
    try:
        meta = from_dict(Meta, raw, "", META_FILE)
    except ConfigError as err:
        raise DataError(f"{meta_path} is damaged ({err}); {_RERUN}") from None
    if not meta.sources:
        raise DataError(f"{meta_path} is damaged (it lists no source); {_RERUN}")
    for source in meta.sources:
        for split in SPLITS:
            for entry in source.splits()[split].shards:
                if not _SHARD_NAME.fullmatch(entry.shard):
                    raise DataError(f"{meta_path} is damaged (shard {entry.shard!r} is not a shard name); {_RERUN}")
    if not _FILE_NAME.fullmatch(meta.tokenizer.file):
        raise DataError(f"{meta_path} is damaged (tokenizer file {meta.tokenizer.file!r}); {_RERUN}")
    return meta


_SHARD_NAME = re.compile(r"(?:train|valid)-\d+(?:-\d+)?")  # names inside the directory, nothing else
_FILE_NAME = re.compile(r"[\w.-]+")


def _from_format_2(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-2 meta.json as format 3: without what it said about the builtin corpus's held-out
    reviews (their file, their counter, data.heldout_review_fraction), which nothing reads now."""
    raw = {**raw, "format_version": FORMAT_VERSION}
    raw.pop("heldout_reviews", None)
    inputs = raw.get("inputs")
    if isinstance(inputs, dict) and isinstance(inputs.get("data"), dict):
        raw["inputs"] = {**inputs, "data": {k: v for k, v in inputs["data"].items() if k != "heldout_review_fraction"}}
    if isinstance(raw.get("sources"), list):
        raw["sources"] = [
            {**source, "cleaning": {k: v for k, v in source["cleaning"].items() if k != "heldout_review"}}
            if isinstance(source, dict) and isinstance(source.get("cleaning"), dict)
            else source
            for source in raw["sources"]
        ]
    return raw


def verify_prepared(prepared_dir: str | Path) -> None:
    """Everything a reuse needs to trust, read in full: the tokenizer and every shard (CRC,
    offsets, sizes, and the counts of meta.json). O(corpus): for `prepare`, not for start-up."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    load_tokenizer(prepared_dir)
    for source in meta.sources:
        for split in SPLITS:
            for entry in source.splits()[split].shards:
                shard = IndexedShard(prepared_dir / entry.shard, verify=True)
                if (len(shard), shard.num_tokens) != (entry.documents, entry.tokens):
                    raise DataError(
                        f"{prepared_dir / entry.shard} holds {len(shard)} documents / {shard.num_tokens} "
                        f"tokens but meta.json records {entry.documents} / {entry.tokens}; {_RERUN}"
                    )
