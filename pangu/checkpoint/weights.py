"""Weights-only checkpoints (imported or converted models) and loading any checkpoint's network
into one process, with plain torch layers: no torch.distributed, no DeepSpeed. Only weight pieces
are read (never optimizer state), each checked against its checksum."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import INDEX_FILE, CheckpointError, TensorReader, TensorWriter, write_index
from pangu.config import ModelConfig
from pangu.data.tokenizer import TOKENIZER_FILE, PanguTokenizer
from pangu.model.pangu_alpha import PanguAlpha

INDEX = f"tensors/{INDEX_FILE}"


def write_weights(out_dir: str | Path, model: ModelConfig, named_tensors, tokenizer_path: Path | None = None) -> Path:
    """Writes a weights-only checkpoint from (canonical name, full tensor) pairs, one at a time."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists: choose a new output directory")
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tensors").mkdir(parents=True)
    writer = TensorWriter(tmp / "tensors", "rank00000", hash_file=False)
    try:
        for name, tensor in named_tensors:
            writer.add(name, "weight", tensor, tuple(tensor.shape))
        size, records = writer.finish()
        write_index(tmp / "tensors", records)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {"tensors/rank00000.bin": {"bytes": size}, INDEX: fmt.file_entry(tmp / INDEX)}
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        files[TOKENIZER_FILE] = fmt.file_entry(tmp / TOKENIZER_FILE)
    fmt.write_manifest(
        tmp,
        {
            "kind": "weights",
            "step": 0,
            "model": fmt.model_fields(model),
            "layout": {"dp": 1, "tp": 1, "pp": 1},
            "files": files,
        },
    )
    fmt.publish(tmp, out_dir)
    return out_dir


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PanguAlpha, PanguTokenizer | None]:
    """`model, tokenizer = pangu.load(DIR)`: the network of any pangu checkpoint (or run directory)
    as a `PanguAlpha` in eval mode in this process, and its tokenizer (None if it carries none)."""
    path = fmt.resolve(path)
    manifest = fmt.read_manifest(path)  # structure; each weight piece read is checked against its checksum
    model_config = ModelConfig(**manifest["model"])
    model = PanguAlpha(model_config)
    index = fmt.read_checked(path, INDEX, manifest) if INDEX in manifest["files"] else None
    reader = TensorReader(path / "tensors", index=index)
    missing = {n for n, _ in model.named_parameters()} - reader.names()
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(reader.read(name, "weight"))
    reader.close()
    model.to(dtype).eval()
    tokenizer_file = path / TOKENIZER_FILE
    tokenizer = PanguTokenizer.from_file(tokenizer_file) if tokenizer_file.is_file() else None
    if tokenizer is not None and tokenizer.vocab_size != model_config.vocab_size:
        warnings.warn(f"tokenizer has {tokenizer.vocab_size} pieces, the model {model_config.vocab_size}", stacklevel=2)
    return model, tokenizer
