"""Index arrays built once and memory-mapped by every process afterwards.

`cached_array(cache, name, key, rows, build)` returns `DIRECTORY/NAME-<hash of key>.npy`
memory-mapped when it exists and holds the expected rows, else builds it and publishes it
atomically. `key` must name everything the array depends on: a changed blend, shard or seed gives
another file, and the stale one is never read.

One process builds each array, whoever asks: the builder holds the lock `NAME-<hash>.lock`
beside it, and every other process (the other ranks of the job, other jobs training on the same
prepared directory, a plain process) waits for the lock and maps what the builder published. The
lock reaches as far as the file system does: a cache on a shared file system has one builder in
the whole cluster, a cache on node-local disks one per node, with nothing to configure. A waiter
gives up after `IndexCache.wait_minutes` (a training run passes its parallel.timeout_minutes)
naming the builder; a builder that dies releases its lock, and the next process builds the array
itself, saying so. A directory that cannot be written, or a file system that refuses locks, only
costs the cache: the array is built in memory, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pangu.config import ParallelConfig
from pangu.data import DataError
from pangu.files import LockHeld, atomic_writer, release_lock, take_lock

_warned: set[str] = set()


@dataclass(frozen=True)
class IndexCache:
    """Where index arrays are cached, and how long a process waits for another one that is
    building the array it needs (by default a training run's default timeout)."""

    directory: Path
    wait_minutes: float = ParallelConfig.timeout_minutes


def cache_path(directory: str | Path, name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(directory) / f"{name}-{digest}.npy"


def cached_array(
    cache: IndexCache | None, name: str, key: dict[str, Any], rows: int, build: Callable[[], np.ndarray]
) -> np.ndarray:
    if cache is None:
        return build()
    path = cache_path(cache.directory, name, key)
    array = _published(path, rows)
    if array is not None:
        return array
    lock_path = path.with_suffix(".lock")
    try:
        cache.directory.mkdir(parents=True, exist_ok=True)
        try:
            lock = take_lock(lock_path)
            builder = None
        except LockHeld as held:  # another process is building it: wait, then map what it published
            builder = held.holder
            lock = take_lock(lock_path, wait_seconds=cache.wait_minutes * 60)
    except LockHeld as held:
        raise DataError(
            f"waited {cache.wait_minutes:g} minutes for {path}, which {held.holder} is building: if that process "
            f"is stuck, stop it (the next process builds the index itself)"
        ) from None
    except OSError as err:
        _warn_once(cache.directory, f"cannot cache index arrays in {cache.directory} ({err.strerror})")
        return build()
    try:
        array = _published(path, rows)
        if array is not None:
            return array
        if builder is not None:
            warnings.warn(f"{builder} stopped before it finished building {path}: building it here", stacklevel=2)
        array = build()
        try:
            with atomic_writer(path) as f:
                np.save(f, array)
        except OSError as err:
            _warn_once(cache.directory, f"cannot cache index arrays in {cache.directory} ({err.strerror})")
            return array
    finally:
        release_lock(lock)  # whoever waits on it, or takes a new one, finds the array (or builds it)
    return np.load(path, mmap_mode="r")


def _published(path: Path, rows: int) -> np.ndarray | None:
    """The array at `path`, mapped, if it is a complete one-dimensional integer array of `rows`
    rows; None if it is missing or not that (it is then built again)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) != rows:
        return None
    return array


def _warn_once(directory: Path, reason: str) -> None:
    if str(directory) not in _warned:
        _warned.add(str(directory))
        warnings.warn(f"{reason}: every start rebuilds its index arrays", stacklevel=3)
