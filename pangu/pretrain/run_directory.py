"""A run owns its output directory: one run at a time (an advisory lock the OS releases when the
process dies, so a killed run never blocks the next), and nothing written before the run is
accepted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from pangu.config import Config
from pangu.files import LockHeld, take_lock
from pangu.schema import ConfigError

LOCK_FILE = ".pangu.lock"


def claim(directory: Path, field: str = "train.output_dir") -> IO:
    """Creates `directory` if needed, checks that this user can write there, and takes its lock.
    Keep the returned file open for as long as the run lasts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return take_lock(directory / LOCK_FILE)
    except LockHeld as held:
        raise ConfigError(
            f"{field} = {str(directory)!r} is in use by another run ({held.holder}): wait for it to end, or choose "
            "another directory"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{field} = {str(directory)!r} is not writable ({err.strerror}): choose a directory this user can write"
        ) from None


def write_config(directory: Path, config: Config) -> None:
    """RUN_DIR/config.yaml, replaced atomically: a full disk leaves the previous one, and says so."""
    tmp = directory / ".config.yaml.tmp"
    try:
        tmp.write_text(config.dump(), encoding="utf-8")
        os.replace(tmp, directory / "config.yaml")
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write {directory / 'config.yaml'} ({err.strerror}): free space or fix the directory"
        ) from None
