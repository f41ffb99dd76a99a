"""A streaming, layout-independent tensor file: the storage under every pangu checkpoint.

A store is a pair of files: `NAME.bin` (raw tensor bytes, appended one tensor at a time) and
`NAME.json` (for each entry: parameter name, state key, dtype, offset, the full tensor's shape and
the slice of it this entry holds). A tensor-parallel rank writes its slices; a reader assembles
any region of the full tensor from whichever slices cover it, so a checkpoint written under one
(tp, pp) layout loads under another.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pangu.config import PanguError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


class CheckpointError(PanguError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


@dataclass(frozen=True)
class Entry:
    name: str
    key: str  # "weight" or an optimizer state name ("m", "s", "exp_avg", ...)
    dtype: str
    offset: int
    full_shape: tuple[int, ...]
    index: tuple[tuple[int, int], ...]  # [start, stop) of this piece in every dimension
    file: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.index)


class TensorWriter:
    """Appends tensors to NAME.bin and records them; `close()` fsyncs and writes NAME.json."""

    def __init__(self, directory: Path, name: str):
        self.bin_path = directory / f"{name}.bin"
        self.index_path = directory / f"{name}.json"
        self._file = open(self.bin_path, "wb")
        self._sha = hashlib.sha256()
        self._entries: list[dict] = []
        self._offset = 0

    def add(
        self,
        name: str,
        key: str,
        tensor: torch.Tensor,
        full_shape: tuple[int, ...],
        index: tuple[slice, ...] | None = None,
    ) -> None:
        tensor = tensor.detach().cpu().contiguous()
        if index is None:
            index = tuple(slice(0, n) for n in tensor.shape)
        data = (
            tensor.view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
        )
        self._file.write(data)
        self._sha.update(data)
        self._entries.append(
            {
                "name": name,
                "key": key,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "offset": self._offset,
                "full_shape": list(full_shape),
                "index": [[s.start, s.stop] for s in index],
            }
        )
        self._offset += len(data)

    def abort(self) -> None:
        """Stops writing after an error (the caller removes the partial files)."""
        self._file.close()

    def close(self) -> dict[str, dict]:
        """Flush to disk; returns {file name: {"bytes", "sha256"}} for the manifest."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index_bytes = json.dumps({"bin": self.bin_path.name, "entries": self._entries}).encode()
        write_file_synced(self.index_path, index_bytes)
        return {
            self.bin_path.name: {"bytes": self._offset, "sha256": self._sha.hexdigest()},
            self.index_path.name: {"bytes": len(index_bytes), "sha256": hashlib.sha256(index_bytes).hexdigest()},
        }


class TensorReader:
    """Reads any region of any stored tensor, from all the stores in a directory."""

    def __init__(self, directory: Path):
        self._entries: dict[tuple[str, str], list[Entry]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for index_path in sorted(directory.glob("*.json")):
            meta = json.loads(index_path.read_text())
            bin_path = directory / meta["bin"]
            for e in meta["entries"]:
                entry = Entry(
                    e["name"],
                    e["key"],
                    e["dtype"],
                    e["offset"],
                    tuple(e["full_shape"]),
                    tuple(tuple(i) for i in e["index"]),
                    bin_path,
                )
                self._entries.setdefault((entry.name, entry.key), []).append(entry)

    def names(self) -> set[str]:
        return {name for name, _ in self._entries}

    def keys(self, name: str) -> set[str]:
        return {key for n, key in self._entries if n == name}

    def full_shape(self, name: str, key: str = "weight") -> tuple[int, ...]:
        return self._pieces(name, key)[0].full_shape

    def read(self, name: str, key: str = "weight", index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The region `index` (default: everything) of the full tensor, assembled from its pieces."""
        pieces = self._pieces(name, key)
        full_shape = pieces[0].full_shape
        if index is None:
            index = tuple(slice(0, n) for n in full_shape)
        out = torch.empty([s.stop - s.start for s in index], dtype=_DTYPES[pieces[0].dtype])
        covered = 0
        for piece in pieces:
            overlap = [(max(a, s.start), min(b, s.stop)) for (a, b), s in zip(piece.index, index)]
            if any(lo >= hi for lo, hi in overlap):
                continue
            source = self._tensor(piece)[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(overlap, piece.index))]
            out[tuple(slice(lo - s.start, hi - s.start) for (lo, hi), s in zip(overlap, index))] = source
            covered += int(np.prod([hi - lo for lo, hi in overlap]))
        if covered != out.numel():
            raise CheckpointError(
                f"checkpoint pieces of {name!r} ({key}) cover {covered} of the "
                f"{out.numel()} elements asked for: a shard file is missing"
            )
        return out

    def _pieces(self, name: str, key: str) -> list[Entry]:
        if (name, key) not in self._entries:
            raise CheckpointError(f"the checkpoint has no {key!r} for parameter {name!r}")
        return self._entries[(name, key)]

    def _tensor(self, entry: Entry) -> torch.Tensor:
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        count = int(np.prod(entry.shape))
        dtype = _DTYPES[entry.dtype]
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        raw = self._maps[entry.file][entry.offset : entry.offset + nbytes]
        if raw.size != nbytes:
            raise CheckpointError(f"{entry.file} is truncated: {entry.name!r} ends past the end of the file")
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(entry.shape)


def write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
