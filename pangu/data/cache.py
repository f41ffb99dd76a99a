"""Index arrays built once and memory-mapped by every rank afterwards.

`cached_array(directory, name, key, build)` returns `directory/NAME-<hash of key>.npy` memory-mapped
when it exists and holds the expected number of rows, else builds it, publishes it atomically
(a uniquely named temporary file renamed into place, so ranks racing to build the same array
never see a partial one) and returns it. `key` must name everything the array depends on: a
changed blend, shard or seed gives another file, and the stale one is never read. A directory
that cannot be written (a read-only prepared directory) only costs the cache: the array is
built in memory, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_warned: set[str] = set()


def cache_path(directory: str | Path, name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(directory) / f"{name}-{digest}.npy"


def cached_array(
    directory: str | Path | None, name: str, key: dict[str, Any], rows: int, build: Callable[[], np.ndarray]
) -> np.ndarray:
    if directory is None:
        return build()
    path = cache_path(directory, name, key)
    try:
        array = np.load(path, mmap_mode="r")
        if len(array) == rows:
            return array
    except (OSError, ValueError):
        pass  # missing, or not a complete .npy: build it again
    array = build()
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
    except OSError as err:
        if str(directory) not in _warned:
            _warned.add(str(directory))
            warnings.warn(
                f"cannot cache index arrays in {directory} ({err.strerror}): every start rebuilds them",
                stacklevel=2,
            )
        return array
