"""Reading a prepared directory back: `load_prepared`, `load_tokenizer`, `read_meta`.

What a prepared directory holds (`data.prepared_dir`, written by `prepare.py`):
    tokenizer.model                 the SentencePiece model the shards were encoded with
    train-<i>-<k>.bin/.idx          source i's training documents, shard k (each document followed
                                    by the separator); a shard holds a run of the source's pieces
    valid-<i>-<k>.bin/.idx          the same for the validation documents
    heldout_reviews.jsonl           the builtin reviews never trained on: {"text": ..., "label": ...}
    meta.json                       inputs, tokenizer, every shard's counts, the cleaning report
    index-cache/                    blend and sample permutations, built once, memory-mapped

Start-up costs O(1) in the corpus size per rank (apart from one stat per shard file): meta.json
says how many tokens each shard holds, so the `.bin` files are checked by their size and mapped
on first use, no `.idx` is read, and the blend index and the epoch permutation come from
`index-cache/` (built there once, by `prepare` or the first rank that needs them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pangu.data import DataError
from pangu.data.cache import IndexCache
from pangu.data.dataset import BlendedDataset, PackedDataset, SampleDataset
from pangu.data.indexed import IndexedShard, ShardTokens
from pangu.data.tokenizer import PanguTokenizer

FORMAT_VERSION = 2
META_FILE = "meta.json"
HELDOUT_FILE = "heldout_reviews.jsonl"
INDEX_CACHE = "index-cache"
SPLITS = ("train", "valid")
# what `pangu prepare` writes into a prepared directory (and the trainer's index cache; format 1
# named its shards train-0.bin): it replaces the directory only when nothing else is in it
_PREPARED_ENTRY = re.compile(
    rf"(?:{re.escape(META_FILE)}|{re.escape(HELDOUT_FILE)}|{INDEX_CACHE}|tokenizer\.model|(?:train|valid)-\d+(?:-\d+)?\.(?:bin|idx))"
)


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
    is its PackedDataset itself), and the meta.json report. Everything is checked first."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    load_tokenizer(prepared_dir)  # the shards are only meaningful with the tokenizer that wrote them
    datasets = []
    for source in meta["sources"]:
        shards = [
            ShardTokens(prepared_dir / entry["shard"], entry["tokens"], meta["vocab_size"])
            for entry in source[split]["shards"]
        ]
        packed = PackedDataset(shards, seq_length)
        if len(packed) == 0:
            raise DataError(
                f"{prepared_dir}: the {split} split of {source['name']} holds {source[split]['tokens']} "
                f"tokens, fewer than one sample of seq_length + 1 = {seq_length + 1}; add data, raise "
                f"data.valid_fraction or lower model.seq_length"
            )
        datasets.append(packed)
    if len(datasets) == 1:
        return datasets[0], meta
    weights = [source["weight"] for source in meta["sources"]]
    return BlendedDataset(datasets, weights, cache_dir=index_cache_dir(prepared_dir)), meta


def load_tokenizer(prepared_dir: str | Path) -> PanguTokenizer:
    """The tokenizer a prepared directory was encoded with, checked against its meta.json."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    tokenizer = PanguTokenizer.from_file(prepared_dir / meta["tokenizer"]["file"])
    if tokenizer.fingerprint != meta["tokenizer"]["fingerprint"]:
        raise DataError(
            f"{prepared_dir / meta['tokenizer']['file']} is not the tokenizer the shards were written "
            f"with (its sha256 differs from meta.json); {_RERUN}"
        )
    return tokenizer


def read_meta(prepared_dir: str | Path) -> dict[str, Any]:
    meta_path = Path(prepared_dir) / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{str(prepared_dir)!r} holds no prepared data ({META_FILE} is missing); run "
            f"`pangu prepare --config <your config>` first (data.prepared_dir names this directory)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_path} is damaged ({err}); {_RERUN}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is damaged (a JSON {type(meta).__name__}, not an object); {_RERUN}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} was written by another version of pangu (format "
            f"{meta.get('format_version')}, expected {FORMAT_VERSION}); {_RERUN}"
        )
    if not _has_meta_shape(meta):
        raise DataError(f"{meta_path} is damaged (fields missing or of the wrong type); {_RERUN}")
    return meta


def _has_meta_shape(meta: dict[str, Any]) -> bool:
    """Whether meta.json holds every field training reads, with its type."""
    tokenizer, sources = meta.get("tokenizer"), meta.get("sources")

    def is_split(split: Any) -> bool:
        shards = split.get("shards") if isinstance(split, dict) else None
        return isinstance(shards, list) and all(
            isinstance(e, dict) and isinstance(e.get("shard"), str) and isinstance(e.get("tokens"), int) for e in shards
        )

    return (
        isinstance(tokenizer, dict)
        and isinstance(tokenizer.get("file"), str)
        and isinstance(tokenizer.get("fingerprint"), str)
        and all(isinstance(meta.get(key), int) for key in ("vocab_size", "eod_id", "pad_id"))
        and isinstance(sources, list)
        and len(sources) > 0
        and all(
            isinstance(source, dict)
            and isinstance(source.get("weight"), (int, float))
            and isinstance(source.get("name"), str)
            and all(is_split(source.get(split)) for split in SPLITS)
            for source in sources
        )
    )


def verify_prepared(prepared_dir: str | Path) -> None:
    """Everything a reuse needs to trust, read in full: the tokenizer and every shard (CRC,
    offsets, sizes, and the counts of meta.json). O(corpus): for `prepare`, not for start-up."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    load_tokenizer(prepared_dir)
    for source in meta["sources"]:
        for split in SPLITS:
            for entry in source[split]["shards"]:
                shard = IndexedShard(prepared_dir / entry["shard"], verify=True)
                if (len(shard), shard.num_tokens) != (entry["documents"], entry["tokens"]):
                    raise DataError(
                        f"{prepared_dir / entry['shard']} holds {len(shard)} documents / {shard.num_tokens} "
                        f"tokens but meta.json records {entry['documents']} / {entry['tokens']}; {_RERUN}"
                    )
