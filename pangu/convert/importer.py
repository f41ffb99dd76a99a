"""`pangu convert import-mindspore`: original PanGu-α weights (MindSpore names) -> pangu weights.

SRC is one of
  * a MindSpore `.ckpt` or an `.npz` holding the whole model (original names), or
  * a directory holding a sliced release: per-rank `<prefix><rank>.ckpt` slices (the 2.6B/13B
    release's `filtered_0.ckpt` ... `filtered_511.ckpt`), the embedding tables as `.npy` files, and
    the parallel-strategy file (there, or given with `strategy=` / `--strategy`); see
    pangu/convert/mindspore/release.py.

Streams one tensor at a time: read (merging the slices of a release), rename and transpose to the
canonical layout, cast to `dtype` if asked, append to a weights-only pangu checkpoint
(pangu/checkpoint/weights.py). Peak memory is a few copies of the largest parameter.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pangu.config import ModelConfig
from pangu.convert.mindspore.ckpt import read_mindspore_ckpt, read_mindspore_ckpt_shapes, read_one_tensor
from pangu.convert.mindspore.names import MINDSPORE_WORD_EMBEDDINGS, infer_model_shape, to_pangu_names
from pangu.model import declaration
from pangu.schema import ConfigError

if TYPE_CHECKING:  # torch is imported when needed: the CLI builds its parser from this module
    import torch

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")  # what --dtype accepts


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


PANGU_VOCAB_SIZE = 40000  # the released tokenizer's pieces
PANGU_PADDED_VOCAB_SIZE = 40064  # the embedding rows of the PyTorch (Megatron / HF) ports


def import_mindspore(
    src: str | Path,
    out: str | Path,
    *,
    num_heads: int,
    activation: str = "fast_gelu",
    final_layernorm: str = "before",
    tokenizer: str | Path | None = None,
    strategy: str | Path | None = None,
    dtype: str | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Import original PanGu-α weights into a pangu weights checkpoint at `out`; returns `out`.

    `dtype` ("float32", "float16", "bfloat16"; None keeps the stored dtypes) casts every tensor.
    `vocab_size` is the real vocabulary when the stored word embedding is padded; by default it is
    the tokenizer's size when `tokenizer` is given, else 40000 for an embedding of 40064 rows whose
    last 64 rows are zero (the PyTorch ports' padding), else the number of rows.
    """
    import torch

    from pangu.checkpoint.weights import write_weights

    src, out = Path(src), Path(out)
    check_dtype(dtype)
    if src.is_dir():
        from pangu.convert.mindspore.release import SlicedRelease

        release = SlicedRelease(src, strategy=strategy)
        shapes = release.shapes
        named_arrays = release.tensors()

        def read_word_embedding() -> np.ndarray:
            return release.read(_word_name(shapes))
    elif src.is_file():
        if strategy is not None:
            raise ValueError(f"--strategy applies to a directory of checkpoint slices; {src} is a single file")
        if src.suffix == ".npz":
            with np.load(src, mmap_mode="r", allow_pickle=False) as arrays:
                shapes = {name: arrays[name].shape for name in arrays.files}
            named_arrays = read_npz(src)

            def read_word_embedding() -> np.ndarray:
                with np.load(src, allow_pickle=False) as arrays:
                    return arrays[_word_name(shapes)]
        else:
            shapes = read_mindspore_ckpt_shapes(src)
            named_arrays = read_mindspore_ckpt(src)

            def read_word_embedding() -> np.ndarray:
                return read_one_tensor(src, _word_name(shapes))
    else:
        raise ConfigError(f"{src} does not exist: give a .ckpt, an .npz or a directory of release slices")

    shape = infer_model_shape(shapes)
    rows = shape["vocab_size"]
    vocab = _vocab_size(rows, vocab_size, tokenizer, read_word_embedding)
    model = ModelConfig(
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        num_heads=num_heads,
        ffn_hidden_size=shape["ffn_hidden_size"],
        vocab_size=vocab,
        seq_length=shape["seq_length"],
        activation=activation,
        final_layernorm=final_layernorm,
    )
    model.validate()
    if model.padded_vocab_size < rows:
        raise ValueError(
            f"the word embedding has {rows} rows, more than vocab_size {vocab} padded to a multiple "
            f"of 128 ({model.padded_vocab_size})"
        )
    torch_dtype = getattr(torch, dtype) if dtype else None
    tensors = ((name, _to_torch(array, torch_dtype)) for name, array in to_pangu_names(named_arrays, model=model))
    progress = tqdm(tensors, total=len(declaration.parameters(model)), desc="importing", unit="tensor", disable=None)
    return write_weights(out, model, progress, Path(tokenizer) if tokenizer else None)


def read_npz(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from an .npz keyed by MindSpore names (what people export from a
    MindSpore session to move weights around), one array at a time."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is a single .npy array, not an .npz archive of named arrays")
    with archive:
        for name in archive.files:
            try:
                array = archive[name]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
                raise ValueError(f"{path}: member {name!r} cannot be read: {error}") from error
            yield name, array


def _word_name(shapes) -> str:
    return next(name for name in MINDSPORE_WORD_EMBEDDINGS if name in shapes)


def _vocab_size(rows: int, vocab_size: int | None, tokenizer, read_word_embedding) -> int:
    if vocab_size is not None:
        if not 1 <= vocab_size <= rows:
            raise ValueError(f"vocab_size {vocab_size} must be between 1 and the {rows} rows of the word embedding")
        return vocab_size
    if tokenizer is not None:
        from pangu.data.tokenizer import PanguTokenizer

        # the PyTorch ports store the embedding padded to 40064 rows; the tokenizer knows the real size
        return min(rows, PanguTokenizer.from_file(tokenizer).vocab_size)
    if rows == PANGU_PADDED_VOCAB_SIZE:
        padding = np.asarray(read_word_embedding()[PANGU_VOCAB_SIZE:])
        if not padding.any():
            logger.info(
                "word embedding of %d rows, the last %d zero: vocabulary %d",
                rows,
                rows - PANGU_VOCAB_SIZE,
                PANGU_VOCAB_SIZE,
            )
            return PANGU_VOCAB_SIZE
        warnings.warn(
            f"the word embedding has {rows} rows and its last {rows - PANGU_VOCAB_SIZE} are not zero: "
            f"keeping vocab_size {rows}; pass vocab_size (--vocab-size) or the tokenizer to override",
            stacklevel=3,
        )
    return rows


def _to_torch(array: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    import torch

    if not array.flags.writeable:  # a memory-mapped .npy: copy once, in the target dtype if it is a numpy one
        target = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype, array.dtype)
        array = np.array(array, dtype=target)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
