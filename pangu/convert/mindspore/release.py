"""Merging the released PanGu-α 2.6B / 13B checkpoints: 512 per-rank MindSpore slices -> full tensors.

The public release of the 2.6B and 13B models (trained 64-way data x 8-way model parallel with
the parallel optimizer) is laid out as::

    checkpoint_file/
        filtered_0.ckpt ... filtered_511.ckpt   one MindSpore checkpoint per rank, optimizer state
                                                 removed; each holds that rank's part of every
                                                 parameter of the blocks, query layer and final LN
        word_embedding.npy                       the three embedding tables, whole, as NumPy arrays
        position_embedding.npy
        top_query_embedding.npy
    strategy_load_ckpt/strategy.ckpt             the parallel-strategy file (or the released
                                                 pangu_alpha_{2.6B,13B}_ckpt_strategy.ckpt)

`SlicedRelease` finds these files, checks all of them before any tensor is produced, and
`tensors()` yields one full parameter at a time (MindSpore names and stored layouts, like
`read_mindspore_ckpt`), reading from each slice file only the bytes of that parameter. Peak
memory is about one full parameter plus one piece; the slice files are never loaded whole.

How a rank's slice relates to the full tensor comes from the strategy file (`slice_of_rank`):
a rank holds either the 8-way model-parallel slice (the checkpoint was saved after gathering
over the parallel-optimizer group) or, for optimizer-sharded parameters, a further 1/64 of it
along dimension 0 (saved without that gather). Which one is decided from the tensor shapes:
the full shapes follow from the model size (hidden size from the embeddings or the final
LayerNorm, FFN size from `output.mapping`), and every stored shape must equal the slice of
exactly one of the two modes, the same for the whole release.

Errors name the file: a missing rank, two files for one rank, a parameter missing from a slice
or stored with a shape or dtype the strategy does not allow, and a slice whose values duplicate
another rank's part of the same parameter (a file copied under the wrong rank).

Embedding files accepted (for each of word / position / top-query): `word_embedding.npy`,
`<anything>_word_embedding.npy` (e.g. `Newexp69_GPT3_5-684_2_word_embedding.npy`), or the full
MindSpore name `backbone.word_embedding.embedding_table.npy`; likewise with
`position_embedding` and `top_query_embedding`. An embedding may instead be in the slices (if the
strategy file lists it); a `.npy` file takes precedence.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pangu.config import ModelConfig
from pangu.convert.mindspore.ckpt import (
    BFLOAT16,
    StoredTensor,
    index_mindspore_ckpt,
    read_stored_into,
    read_stored_tensor,
)
from pangu.convert.mindspore.names import (
    BLOCK_NAME,
    BLOCK_PARAMETERS,
    MINDSPORE_FINAL_LAYERNORM_GAMMA,
    MINDSPORE_POSITION_EMBEDDING,
    MINDSPORE_QUERY_EMBEDDING,
    MINDSPORE_WORD_EMBEDDING,
    MINDSPORE_WORD_EMBEDDINGS,
    QUERY_LAYER_PREFIX,
    stored_shape,
)
from pangu.convert.mindspore.strategy import read_parallel_strategy, slice_of_rank
from pangu.schema import PanguError

logger = logging.getLogger(__name__)

PathLike = str | Path

WORD = MINDSPORE_WORD_EMBEDDING
POSITION = MINDSPORE_POSITION_EMBEDDING
TOP_QUERY = MINDSPORE_QUERY_EMBEDDING
FINAL_LN_GAMMA = MINDSPORE_FINAL_LAYERNORM_GAMMA
QUERY_MAPPING = f"{QUERY_LAYER_PREFIX}output.mapping.weight"

# Base names of the embedding .npy files (see the module docstring for the accepted forms).
EMBEDDING_FILE_BASES = {WORD: "word_embedding", POSITION: "position_embedding", TOP_QUERY: "top_query_embedding"}

MODEL_SLICE = "model-parallel slice"
OPTIMIZER_SHARD = "optimizer-sharded piece"

_SLICE_FILE = re.compile(r"(?P<prefix>.*?)(?P<rank>\d+)\.ckpt")
# MindSpore's floating tensor_types -> numpy dtype of the array read_stored_tensor returns (BFloat16 is widened).
_ARRAY_DTYPES = {"Float16": np.float16, "Float32": np.float32, "Float64": np.float64, BFLOAT16: np.float32}
_FINGERPRINT_ELEMENTS = 1 << 12
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class ReleaseError(PanguError, ValueError):
    """A sliced release is incomplete or inconsistent; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Finding the files of a release


def find_strategy_file(directory: Path) -> Path:
    """The one `*strategy*.ckpt` in `directory` (the release puts it in a separate folder: pass it)."""
    candidates = sorted(p for p in directory.glob("*.ckpt") if "strategy" in p.name.lower())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ReleaseError(
            f"{directory}: no parallel-strategy file (*strategy*.ckpt) next to the slices; "
            f"pass it with --strategy (the release ships it as "
            f"strategy_load_ckpt/strategy.ckpt or pangu_alpha_<size>_ckpt_strategy.ckpt)"
        )
    raise ReleaseError(
        f"{directory}: several strategy files ({', '.join(p.name for p in candidates)}); choose one with --strategy"
    )


def find_slice_files(directory: Path, world_size: int, *, exclude: set[Path] = frozenset()) -> list[Path]:
    """The slice file of every rank 0..world_size-1, named `<prefix><rank>.ckpt` with one prefix."""
    by_rank: dict[int, Path] = {}
    prefixes: dict[str, Path] = {}
    for path in sorted(directory.glob("*.ckpt")):
        if path.resolve() in exclude or "strategy" in path.name.lower():
            continue
        match = _SLICE_FILE.fullmatch(path.name)
        if match is None:
            logger.warning("%s: not named like a slice (<prefix><rank>.ckpt): ignored", path)
            continue
        prefixes.setdefault(match["prefix"], path)
        rank = int(match["rank"])
        if rank in by_rank:
            raise ReleaseError(f"{path} and {by_rank[rank]} are both the slice of rank {rank}: remove the duplicate")
        by_rank[rank] = path
    if not by_rank:
        raise ReleaseError(f"{directory}: no slice files (<prefix><rank>.ckpt, e.g. filtered_0.ckpt)")
    if len(prefixes) > 1:
        shown = ", ".join(f"{prefix!r} (e.g. {path.name})" for prefix, path in prefixes.items())
        raise ReleaseError(
            f"{directory}: slice files with different name prefixes: {shown}; keep one release per directory"
        )
    prefix = next(iter(prefixes))
    extra = sorted(rank for rank in by_rank if rank >= world_size)
    if extra:
        raise ReleaseError(
            f"{by_rank[extra[0]]}: rank {extra[0]} does not exist: the strategy file describes "
            f"{world_size} devices (ranks 0..{world_size - 1})"
        )
    missing = [rank for rank in range(world_size) if rank not in by_rank]
    if missing:
        names = ", ".join(f"{prefix}{rank}.ckpt" for rank in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ReleaseError(f"{directory}: {len(missing)} of the {world_size} slice files are missing: {names}")
    return [by_rank[rank] for rank in range(world_size)]


def find_embedding_files(directory: Path) -> dict[str, Path]:
    """MindSpore name -> .npy file of the embedding tables shipped separately (see module docstring)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("*.npy")):
        for name, base in EMBEDDING_FILE_BASES.items():
            # no base name ends with another ("_top_query_embedding" is not "_position_embedding")
            if path.name in (f"{base}.npy", f"{name}.npy") or path.name.endswith(f"_{base}.npy"):
                found.setdefault(name, []).append(path)
    for name, paths in found.items():
        if len(paths) > 1:
            raise ReleaseError(f"{directory}: several files for {name}: {', '.join(p.name for p in paths)}")
    return {name: paths[0] for name, paths in found.items()}


# ---------------------------------------------------------------------------------------------
# The release


def _index_slice(path: Path) -> dict[str, StoredTensor]:
    try:
        return index_mindspore_ckpt(path)
    except ValueError as error:  # names the file
        raise ReleaseError(str(error)) from error


def _declared_shape(name: str, model: ModelConfig) -> tuple[int, ...] | None:
    """The full shape of a parameter other than the word embedding (declaration.py's, as MindSpore
    stores it); None for a name that is not such a PanGu-α parameter."""
    if name in MINDSPORE_WORD_EMBEDDINGS:
        return None
    try:
        return stored_shape(name, model)
    except ValueError:
        return None


def _local_shape(index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


def _region_key(index: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in index)


def _parameter_order(name: str) -> tuple:
    sub_names = list(BLOCK_PARAMETERS)
    block = BLOCK_NAME.fullmatch(name)
    if block:
        sub = block.group(2)
        return (1, int(block.group(1)), sub_names.index(sub) if sub in sub_names else len(sub_names), sub)
    if name.startswith(QUERY_LAYER_PREFIX):
        sub = name.removeprefix(QUERY_LAYER_PREFIX)
        return (2, 0, sub_names.index(sub) if sub in sub_names else len(sub_names), sub)
    embeddings = [WORD, POSITION, TOP_QUERY]
    if name in embeddings:
        return (0, embeddings.index(name), 0, name)
    return (3, 0, 0, name)


class SlicedRelease:
    """A directory of per-rank MindSpore slices plus its strategy file, checked and ready to merge.

    Construction reads the strategy file and the headers of every slice (not the tensor data),
    and raises `ReleaseError` naming the offending file if anything is missing or inconsistent.
    `shapes` gives the full shapes (MindSpore names and stored layouts), `mode` which slicing the
    files hold (MODEL_SLICE or OPTIMIZER_SHARD), `tensors()` streams the merged parameters.
    """

    def __init__(self, directory: PathLike, *, strategy: PathLike | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ReleaseError(f"{self.directory} is not a directory of checkpoint slices")
        self.strategy_path = Path(strategy) if strategy is not None else find_strategy_file(self.directory)
        if not self.strategy_path.is_file():
            raise ReleaseError(f"strategy file {self.strategy_path} does not exist")
        self.strategies = {
            name: s for name, s in read_parallel_strategy(self.strategy_path).items() if name.startswith("backbone.")
        }
        if not self.strategies:
            raise ReleaseError(f"{self.strategy_path}: lists no backbone.* parameters")
        world_sizes = {math.prod(s.dev_matrix) for s in self.strategies.values()}
        if len(world_sizes) != 1:
            raise ReleaseError(
                f"{self.strategy_path}: parameters laid out over different device counts {sorted(world_sizes)}"
            )
        self.world_size = world_sizes.pop()
        self.embedding_files = find_embedding_files(self.directory)
        self.slice_files = find_slice_files(self.directory, self.world_size, exclude={self.strategy_path.resolve()})
        self._index = [_index_slice(path) for path in self.slice_files]
        self._check_names()
        self.shapes = self._full_shapes()
        self.mode = self._decide_mode()
        self._check_slices()
        logger.info("%s: %d slices, each holding the %s of every parameter", self.directory, self.world_size, self.mode)

    # -- checks ---------------------------------------------------------------------------------

    def _sliced_names(self) -> list[str]:
        """Parameters read from the slices (those the strategy lists and no .npy file provides)."""
        return [name for name in self.strategies if name not in self.embedding_files]

    def _check_names(self) -> None:
        wanted = self._sliced_names()
        for path, index in zip(self.slice_files, self._index):
            unknown = [name for name in index if name.startswith("backbone.") and name not in self.strategies]
            if unknown:
                raise ReleaseError(
                    f"{path}: holds {unknown[0]!r}, which the strategy file "
                    f"{self.strategy_path.name} does not list: a slice of another model?"
                )
            missing = [name for name in wanted if name not in index]
            if missing:
                hint = ""
                if any(name in EMBEDDING_FILE_BASES for name in missing):
                    hint = (
                        f" (embedding tables may instead be given as "
                        f"{', '.join(b + '.npy' for b in EMBEDDING_FILE_BASES.values())} next to the slices)"
                    )
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise ReleaseError(
                    f"{path}: lacks {len(missing)} parameters listed in the strategy file: {shown}{hint}"
                )

    def _npy_shape(self, name: str) -> tuple[int, ...]:
        path = self.embedding_files[name]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ReleaseError(f"{path}: not a readable .npy array: {error}") from error
        if array.ndim != 2 or array.dtype.kind != "f":
            raise ReleaseError(f"{path}: expected a 2-d floating-point table, got {array.dtype} {array.shape}")
        return tuple(array.shape)

    def _unambiguous_full_shape(self, name: str) -> tuple[int, ...] | None:
        """The full shape of a parameter read from rank 0's shape where both modes agree on it."""
        strategy = self.strategies[name]
        local = self._index[0][name].shape
        if strategy.opt_weight_shard_step > 0:
            return None
        return tuple(n * strategy.model_split(d) for d, n in enumerate(local))

    def _full_shapes(self) -> dict[str, tuple[int, ...]]:
        def known(name: str) -> tuple[int, ...] | None:
            if name in self.embedding_files:
                return self._npy_shape(name)
            if name in self.strategies:
                return self._unambiguous_full_shape(name)
            return None

        position = known(POSITION) or known(TOP_QUERY)
        word = known(WORD)
        final_ln = known(FINAL_LN_GAMMA)
        table = position or word
        hidden = table[1] if table else final_ln[0] if final_ln else None
        seq = position[0] if position else None
        if hidden is None or seq is None:
            raise ReleaseError(
                f"{self.directory}: cannot tell the model size: give the embedding tables as .npy "
                f"files ({', '.join(b + '.npy' for b in EMBEDDING_FILE_BASES.values())})"
            )
        if QUERY_MAPPING not in self.strategies:
            raise ReleaseError(f"{self.strategy_path}: lists no {QUERY_MAPPING}")
        mapping_local = self._index[0][QUERY_MAPPING].shape
        if len(mapping_local) != 2:
            raise ReleaseError(f"{self.slice_files[0]}: {QUERY_MAPPING} has shape {mapping_local}, not a matrix")
        # output.mapping is stored [hidden, ffn]; the parallel optimizer only ever cuts dimension 0.
        ffn = mapping_local[1] * self.strategies[QUERY_MAPPING].model_split(1)
        blocks = [int(match.group(1)) for name in self.strategies if (match := BLOCK_NAME.fullmatch(name))]
        model = ModelConfig(
            num_layers=max(blocks, default=-1) + 2, hidden_size=hidden, ffn_hidden_size=ffn, seq_length=seq
        )
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.strategies:
            if name in self.embedding_files:
                shape = self._npy_shape(name)
                if name != WORD and shape != (seq, hidden) or name == WORD and shape[1] != hidden:
                    raise ReleaseError(
                        f"{self.embedding_files[name]}: shape {shape} does not fit hidden size "
                        f"{hidden} and sequence length {seq}"
                    )
            elif name == WORD:
                shape = word or ()  # decided with the mode if ambiguous
            else:
                shape = _declared_shape(name, model)
                if shape is None:
                    raise ReleaseError(f"{self.strategy_path}: unknown PanGu-alpha parameter {name!r}")
            shapes[name] = shape
        self._dims = (hidden, ffn, seq)
        return shapes

    def _slice(self, name: str, rank: int, mode: str, full_shape=None) -> tuple[slice, ...] | None:
        try:
            return slice_of_rank(
                self.strategies[name], rank, full_shape or self.shapes[name], optimizer_sharded=mode == OPTIMIZER_SHARD
            )
        except ValueError:
            return None  # this mode cannot split the tensor evenly: not a candidate

    def _decide_mode(self) -> str:
        votes = {MODEL_SLICE: 0, OPTIMIZER_SHARD: 0}
        for name in self._sliced_names():
            if not self.shapes[name]:
                continue
            local = self._index[0][name].shape
            matches = {
                mode
                for mode in votes
                if (index := self._slice(name, 0, mode)) is not None and _local_shape(index) == local
            }
            if len(matches) == 1:
                votes[matches.pop()] += 1
        mode = OPTIMIZER_SHARD if votes[OPTIMIZER_SHARD] > votes[MODEL_SLICE] else MODEL_SLICE
        if WORD in self.shapes and not self.shapes[WORD]:  # word embedding from the slices, cut by the optimizer
            local = self._index[0][WORD].shape
            strategy = self.strategies[WORD]
            shape = [n * strategy.model_split(d) for d, n in enumerate(local)]
            if mode == OPTIMIZER_SHARD:
                replicas = self.world_size // math.prod(strategy.model_split(d) for d in range(len(local)))
                shape[0] *= replicas if strategy.opt_weight_shard_size == -1 else strategy.opt_weight_shard_size
            self.shapes[WORD] = tuple(shape)
        return mode

    def _check_slices(self) -> None:
        other = OPTIMIZER_SHARD if self.mode == MODEL_SLICE else MODEL_SLICE
        for name in self._sliced_names():
            tensor_type = self._index[0][name].tensor_type
            if tensor_type not in _ARRAY_DTYPES:
                raise ReleaseError(f"{self.slice_files[0]}: {name} is stored as {tensor_type}, not a float type")
            for rank, (path, index) in enumerate(zip(self.slice_files, self._index)):
                stored = index[name]
                region = self._slice(name, rank, self.mode)
                expected = _local_shape(region) if region is not None else None
                if stored.shape != expected:
                    alternative = self._slice(name, rank, other)
                    full = f"the full {self.shapes[name]} under {self.strategy_path.name}"
                    if alternative is not None and _local_shape(alternative) == stored.shape:
                        what = (
                            f"which is rank {rank}'s {other} of {full}, but the release holds the "
                            f"{self.mode}s ({expected} here)"
                        )
                    else:
                        what = f"expected rank {rank}'s {self.mode} {expected} of {full}"
                    raise ReleaseError(f"{path}: {name} has shape {stored.shape}, {what}")
                if stored.tensor_type != tensor_type:
                    raise ReleaseError(
                        f"{path}: {name} is stored as {stored.tensor_type}, but as {tensor_type} in "
                        f"{self.slice_files[0].name}"
                    )

    # -- merging --------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The model parameters (MindSpore names), in a natural order: embeddings, blocks, query layer."""
        return sorted(self.strategies, key=_parameter_order)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (MindSpore name, full array) for every parameter, one at a time, in `names` order.

        Arrays keep the stored dtype (BFloat16 arrives as float32). Embedding tables from .npy files
        are yielded memory-mapped (read-only); merged parameters are fresh arrays."""
        for name in self.names:
            yield name, self.read(name)

    def read(self, name: str) -> np.ndarray:
        if name in self.embedding_files:
            return np.load(self.embedding_files[name], mmap_mode="r", allow_pickle=False)
        if name not in self.strategies:
            raise KeyError(f"{name!r} is not a parameter of this release")
        full_shape = self.shapes[name]
        first_rank: dict[tuple, int] = {}
        for rank in range(self.world_size):
            first_rank.setdefault(_region_key(self._slice(name, rank, self.mode)), rank)
        if sum(math.prod(b - a for a, b in key) for key in first_rank) != math.prod(full_shape):
            raise ReleaseError(f"{self.strategy_path}: the slices of {name} do not tile its full shape {full_shape}")
        tensor_type = self._index[0][name].tensor_type
        merged = np.empty(full_shape, _ARRAY_DTYPES[tensor_type])
        fingerprints: dict[bytes, int] = {}
        for key, rank in first_rank.items():
            path = self.slice_files[rank]
            stored = self._index[rank][name]
            region = tuple(slice(a, b) for a, b in key)
            target = merged[region]
            if tensor_type == BFLOAT16:  # widened to float32 on reading
                piece = read_stored_tensor(path, stored)
                target[...] = piece
            elif target.flags.c_contiguous:  # e.g. a block of rows: read straight into place
                read_stored_into(path, stored, target)
                piece = target
            else:
                piece = np.empty(target.shape, target.dtype)
                read_stored_into(path, stored, piece)
                target[...] = piece
            if len(first_rank) > 1:
                fingerprint = _fingerprint(piece)
                if fingerprint is not None and fingerprint in fingerprints:
                    twin = fingerprints[fingerprint]
                    raise ReleaseError(
                        f"{path}: its part of {name} ({_describe(region)}) holds the same values as "
                        f"{self.slice_files[twin].name}'s ({_describe(self._slice(name, twin, self.mode))}), "
                        f"though they are different parts of the tensor: a slice copied under the wrong rank?"
                    )
                if fingerprint is not None:
                    fingerprints[fingerprint] = rank
            del piece, target
        return merged

    def describe(self) -> dict:
        hidden, ffn, seq = self._dims
        return {
            "directory": str(self.directory),
            "strategy": str(self.strategy_path),
            "slices": self.world_size,
            "mode": self.mode,
            "hidden_size": hidden,
            "ffn_hidden_size": ffn,
            "seq_length": seq,
            "embedding_files": {name: str(path) for name, path in self.embedding_files.items()},
        }


def _fingerprint(piece: np.ndarray) -> bytes | None:
    """A digest of (a sample of) a piece's values; None for a constant piece (e.g. zero-initialised
    biases), whose equality with another part says nothing."""
    flat = piece.reshape(-1)  # a view: pieces here are C-contiguous
    if flat.size < 2:
        return None
    bits = flat.view(_UINT_OF_SIZE[flat.itemsize])  # integer compares: numpy's float16 reductions are slow
    sample = np.ascontiguousarray(bits[:: max(1, flat.size // _FINGERPRINT_ELEMENTS)])
    if (sample == sample[0]).all():
        return None
    return hashlib.blake2b(sample.view(np.uint8), digest_size=16).digest()


def _describe(region: tuple[slice, ...] | None) -> str:
    if region is None:
        return "?"
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"
