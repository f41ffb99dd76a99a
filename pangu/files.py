"""Files pangu writes and reads, in one place: writes that an interruption at any moment leaves
either old or new (a temporary name, fsync, rename), paths named by an untrusted file kept inside
their directory, temporary directories that carry a marker so that only pangu's own are ever
removed, and advisory locks that name their holder. Imports nothing of pangu: every package may
use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, BinaryIO

TMP_MARKER = ".pangu-tmp"  # the file inside every temporary directory pangu made


class UnsafePathError(ValueError):
    """A path named inside a file (a manifest, an index) leads outside its directory."""


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` and flushes it to disk (the caller renames or publishes it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_writer(path: str | Path):
    """A binary file that appears at `path` whole or not at all: written under `path.tmp`, fsynced
    and renamed into place when the block ends without an error (removed when it raises)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f: BinaryIO = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename's durability; some file systems refuse this
        fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`path` holds `data` afterwards, or (after any interruption) what it held before."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 1) -> None:
    write_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def relative_parts(root: str | Path, relative: str) -> tuple[str, ...]:
    """The parts of a path read from an untrusted file, refused (UnsafePathError) unless by its
    name alone it stays inside `root`: no absolute path, no `..`. Reads nothing from the disk:
    where many names are read at once, each is checked this way, and `confined` (which follows
    symbolic links) where it is opened."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UnsafePathError(f"{relative!r} is not a relative file name")
    parts = Path(relative).parts
    if Path(relative).is_absolute() or relative.startswith(("/", "\\")) or ".." in parts or "\\" in relative:
        raise UnsafePathError(f"{relative!r} leads outside {root}")
    return parts


def confined(root: str | Path, relative: str) -> Path:
    """`root / relative` for a path read from an untrusted file, refused (UnsafePathError) unless
    it stays inside `root`: no absolute path, no `..`, no symbolic link leading out."""
    parts = relative_parts(root, relative)
    root = Path(root)
    path = root.joinpath(*parts)
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):  # a symbolic link on the way leads out
        raise UnsafePathError(f"{relative!r} leads outside {root} (through a symbolic link)")
    return path


def make_marked_tmp(path: str | Path) -> Path:
    """Creates the temporary directory `path` (empty; a marked one left by an interrupted attempt is
    replaced) with pangu's marker inside. An unmarked directory of that name is not pangu's: it is
    refused (FileExistsError), never removed."""
    path = Path(path)
    remove_marked_tmp(path)
    path.mkdir(parents=True)
    (path / TMP_MARKER).touch()
    return path


def is_marked_tmp(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / TMP_MARKER).is_file() and not Path(path).is_symlink()


def remove_marked_tmp(path: str | Path) -> None:
    """Removes `path` if it is a temporary directory pangu made; refuses (FileExistsError) anything
    else of that name, which belongs to someone else."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not is_marked_tmp(path):
        raise FileExistsError(
            f"{path} exists and was not made by pangu (no {TMP_MARKER} inside): move it away and try again"
        )
    shutil.rmtree(path)


def unmark(path: str | Path) -> None:
    """Takes the marker out of a finished temporary directory, before it is renamed into place."""
    (Path(path) / TMP_MARKER).unlink(missing_ok=True)


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def take_lock(path: str | Path, wait_seconds: float = 0.0) -> IO:
    """An advisory lock on the file `path` (created if needed), held for as long as the returned
    file stays open. The operating system releases it when the holder dies, so a killed process
    never blocks the next one. The holder writes "host H, pid P" into the file; another process
    that cannot take the lock within `wait_seconds` gets `LockHeld` naming it. The lock covers the
    processes that see the same file system: every node for a shared one, one node for local disks.
    An `OSError` means the file system refuses locks (or the file cannot be created)."""
    path = Path(path)
    deadline = time.monotonic() + wait_seconds
    pause = 0.05  # between attempts while waiting, doubled up to 2 s: little load on a shared file system
    lock = open(path, "a+")
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                lock.close()
                raise LockHeld(path, holder) from None
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, 2.0)
            continue
        except OSError:
            lock.close()
            raise
        # the previous holder may have removed the file (release_lock) after it was opened here:
        # a lock on a removed file locks nothing, so take the one on the file that is there now
        try:
            current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        lock.close()
        lock = open(path, "a+")
    lock.seek(0)
    lock.truncate()
    lock.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    lock.flush()
    return lock


def release_lock(lock: IO) -> None:
    """Removes a lock file taken by `take_lock`, then releases the lock: whoever opened the file
    meanwhile finds it gone once the lock is theirs, and takes a new one."""
    Path(lock.name).unlink(missing_ok=True)
    lock.close()
