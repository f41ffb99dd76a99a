"""Where `pangu prepare` writes, and what it may remove: the prepared directory, which one
prepare at a time owns (a lock beside it) and which it replaces as a whole only when it holds
nothing but an earlier preparation, and the work directories, each marked with the prepared
directory it works for (data.work_dir may be shared with anything else)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pangu.config import DataConfig
from pangu.data import DataError
from pangu.data.prepared import META_FILE, foreign_entries
from pangu.files import LockHeld, take_lock, write_json_atomic
from pangu.schema import ConfigError, from_dict


def claim(out_dir: Path) -> IO:
    """The prepared directory's lock (`.<name>.lock` beside it: the directory itself is replaced
    by a rename), held until `release_lock`; a second prepare stops at once, naming the holder."""
    lock_path = out_dir.with_name(f".{out_dir.name}.lock")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return take_lock(lock_path)
    except LockHeld as held:
        raise DataError(
            f"data.prepared_dir = {str(out_dir)!r} is being prepared by another `pangu prepare` ({held.holder}): "
            f"wait for it to end, or choose another data.prepared_dir"
        ) from None
    except OSError as err:
        raise DataError(
            f"data.prepared_dir: cannot take the lock {str(lock_path)!r} ({err.strerror}): choose a directory this "
            f"user can write, on a file system that supports locks"
        ) from None


def check_output_dir(out_dir: Path, work_root: Path) -> None:
    """Before any work: prepare replaces out_dir as a whole, so it must hold nothing but an
    earlier preparation; and both directories must be writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"data.prepared_dir = {str(out_dir)!r} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / META_FILE).exists():
            raise DataError(
                f"data.prepared_dir = {str(out_dir)!r} is not empty and holds no {META_FILE}: it is not a "
                f"pangu prepared directory, so prepare will not replace it. Choose another directory"
            )
        foreign = foreign_entries(out_dir)
        if foreign:
            raise DataError(
                f"data.prepared_dir = {str(out_dir)!r} holds what pangu prepare did not write "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), and a rebuild replaces the "
                f"whole directory: move them out, or choose another data.prepared_dir"
            )
    for directory, field in ((out_dir.parent, "data.prepared_dir"), (work_root, "data.work_dir")):
        existing = directory
        while not existing.exists():  # where the directory will be created
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise DataError(
                f"{field}: {str(directory)!r} is not writable ({str(existing)!r} is "
                f"{'not a directory' if not existing.is_dir() else 'read-only for this user'}): choose a "
                f"directory this user can write"
            )


def work_root(data: DataConfig) -> Path:
    out_dir = Path(data.prepared_dir)
    return Path(data.work_dir) if data.work_dir else out_dir.with_name(f".{out_dir.name}.work")


def work_dir(data: DataConfig, fingerprint: str) -> Path:
    return work_root(data) / fingerprint[:16]


WORK_MARKER = ".pangu-prepare.json"  # in each work directory: the prepared directory it works for


@dataclass
class WorkMarker:
    prepared_dir: str  # resolved


def start_work(work: Path, out_dir: Path) -> None:
    """Creates (or keeps, to resume) `work`, and removes the work of earlier runs on other inputs
    for the same prepared directory: only directories whose marker says so (data.work_dir may
    be shared, and may hold anything else)."""
    owner = WorkMarker(str(out_dir.resolve()))
    work.parent.mkdir(parents=True, exist_ok=True)
    for other in work.parent.iterdir():
        if other != work and other.is_dir() and not other.is_symlink() and _marker(other) == owner:
            shutil.rmtree(other, ignore_errors=True)
    for sub in ("pieces", "dedup", "shards", "out"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / WORK_MARKER, asdict(owner))


def _marker(directory: Path) -> WorkMarker | None:
    """The marker of a work directory, or None for anything else (another program's directory)."""
    try:
        return from_dict(WorkMarker, json.loads((directory / WORK_MARKER).read_text(encoding="utf-8")), "", WORK_MARKER)
    except (OSError, ValueError, ConfigError):
        return None


def remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()  # the root, once nothing else is in it
    except OSError:
        pass


def replace_dir(new_dir: Path, target: Path) -> None:
    """Put new_dir at target; the old target is removed only once the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new_dir, target)
        shutil.rmtree(old)
    else:
        os.rename(new_dir, target)
