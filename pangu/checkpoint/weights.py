"""Weights-only checkpoints (imported or converted models) and loading any checkpoint's network
into one process, with plain torch layers: no torch.distributed, no DeepSpeed. Only weight pieces
are read (never optimizer state), each checked against its checksum."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import INDEX_FILE, CheckpointError, TensorWriter, write_index
from pangu.config import ModelConfig
from pangu.data.tokenizer import TOKENIZER_FILE, PanguTokenizer
from pangu.files import write_synced
from pangu.model.pangu_alpha import PanguAlpha

INDEX = f"tensors/{INDEX_FILE}"


def write_weights(out_dir: str | Path, model: ModelConfig, named_tensors, tokenizer_path: Path | None = None) -> Path:
    """Writes a weights-only checkpoint from (canonical name, full tensor) pairs, one at a time."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists: choose a new output directory")
    tmp = fmt.temporary_beside(out_dir)
    try:
        (tmp / "tensors").mkdir()
        writer = TensorWriter(tmp / "tensors", "rank00000", hash_file=False)
        try:
            for name, tensor in named_tensors:
                writer.add(name, "weight", tensor, tuple(tensor.shape))
            size, records = writer.finish()
        except BaseException:
            writer.abort()
            raise
        write_index(tmp / "tensors", records)
        files = {"tensors/rank00000.bin": fmt.FileRecord(bytes=size), INDEX: fmt.file_entry(tmp / INDEX)}
        fingerprint = None
        if tokenizer_path is not None:
            tokenizer = PanguTokenizer.from_file(tokenizer_path)  # a SentencePiece model of the PanGu scheme
            write_synced(tmp / TOKENIZER_FILE, tokenizer.model_bytes)
            files[TOKENIZER_FILE] = fmt.file_entry(tmp / TOKENIZER_FILE)
            fingerprint = tokenizer.fingerprint
        manifest = fmt.Manifest(
            kind="weights",
            step=0,
            model=model,
            layout=fmt.Layout(dp=1, tp=1, pp=1),
            tokenizer_fingerprint=fingerprint,
            files=files,
        )
        fmt.write_manifest(tmp, manifest)
        fmt.publish_new(tmp, out_dir)
    except BaseException:
        fmt.discard(tmp)
        raise
    return out_dir


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PanguAlpha, PanguTokenizer | None]:
    """`model, tokenizer = pangu.load(DIR)`: the network of any pangu checkpoint (or run directory)
    as a `PanguAlpha` in eval mode in this process, and its tokenizer (None if it carries none)."""
    path = fmt.resolve(path)
    manifest = fmt.read_manifest(path)  # structure and model checked; each weight piece read is checked too
    model_config = manifest.model
    tokenizer_bytes = fmt.read_tokenizer(path, manifest)  # before the network: a foreign one stops here
    reader = fmt.tensor_reader(path, manifest)
    missing = set(fmt.declared_shapes(model_config)) - reader.names()
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:5]}")
    model = PanguAlpha(model_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(reader.read(name, "weight"))
    reader.close()
    model.to(dtype).eval()
    tokenizer = None if tokenizer_bytes is None else PanguTokenizer(tokenizer_bytes, str(path / TOKENIZER_FILE))
    if tokenizer is not None and tokenizer.vocab_size != model_config.vocab_size:
        warnings.warn(f"tokenizer has {tokenizer.vocab_size} pieces, the model {model_config.vocab_size}", stacklevel=2)
    return model, tokenizer
