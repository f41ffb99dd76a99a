"""A run owns its output directory: one run at a time (an advisory lock the OS releases when the
process dies, so a killed run never blocks the next), and nothing it did not write is taken for
its own.

What pangu writes in a run directory, and only that, it may replace, truncate, prune or set aside:
config.yaml, metrics.jsonl, checkpoints/, tensorboard/, the W&B files and what is set aside of
them. A directory is a run's from the moment the run is accepted: `.pangu-run` then records the
run's identity, and config.yaml (its first line) and metrics.jsonl (its first record) carry it.
`claim` refuses, before anything is written, a directory where those names hold something else:
- in a directory of a run, a config.yaml or metrics.jsonl that does not carry its identity;
- in a directory without `.pangu-run`, any of them, unless the directory is an older pangu's run
  directory (it holds the lock file every pangu run has left, or pangu checkpoints handed over
  to be continued): that one is taken over.
Other files (a job's log, notes) are left as they are; an empty or new directory is fine.

A run that starts from step 0 where metrics.jsonl already records later steps (its checkpoints
were deleted) keeps them: metrics.jsonl and tensorboard/ are set aside (metrics.jsonl.set-aside-N,
tensorboard.set-aside-N), as train.restart sets checkpoints aside, rather than refused: the run
cannot resume anyway, and refusing would leave the user to move or delete them by hand.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pangu.checkpoint import format as checkpoint_format
from pangu.config import Config
from pangu.files import LockHeld, take_lock, write_atomic, write_json_atomic
from pangu.schema import ConfigError, from_dict

log = logging.getLogger(__name__)

LOCK_FILE = ".pangu.lock"
RUN_MARKER = ".pangu-run"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# the names pangu writes in a run directory (temporary names and what is set aside included)
OWN_NAMES = re.compile(
    r"\.?(config\.yaml|metrics\.jsonl)\.tmp|(metrics\.jsonl|checkpoints|tensorboard)(\.set-aside-\d+)?"
    r"|config\.yaml|wandb|wandb_run_id"
)


@dataclass(frozen=True)
class RunMarker:
    """.pangu-run: the identity of the run that owns the directory."""

    run: str
    created: str  # when the run was first accepted (UTC, ISO 8601)


def claim(directory: Path, field: str = "train.output_dir") -> IO:
    """Checks that `directory` holds nothing of pangu's names that is not this run's (before
    anything is written), creates it if needed, checks that this user can write there, and takes
    its lock. Keep the returned file open for as long as the run lasts."""
    if directory.is_dir():
        check_ownership(directory, field)
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


def check_ownership(directory: Path, field: str = "train.output_dir") -> None:
    """Refuses (ConfigError, naming them) what pangu would write over in `directory` but did not
    write: see the module's docstring."""
    marker = read_marker(directory)
    ours = sorted(entry.name for entry in directory.iterdir() if OWN_NAMES.fullmatch(entry.name))
    if marker is None:
        older_pangu = (directory / LOCK_FILE).is_file() or any(
            (step / "manifest.json").is_file()
            for step in checkpoint_format.step_dirs(checkpoint_format.checkpoint_root(directory))
        )
        foreign = [] if older_pangu else ours
    else:
        foreign = [name for name in (CONFIG_FILE, METRICS_FILE) if not _carries(directory / name, marker.run)]
    if foreign:
        raise ConfigError(
            f"{field} = {str(directory)!r} holds {', '.join(foreign)}, which this run did not write (a file of "
            f"another run, or not pangu's): move {'them' if len(foreign) > 1 else 'it'} away, or choose another "
            f"{field}"
        )


def read_marker(directory: Path) -> RunMarker | None:
    path = directory / RUN_MARKER
    if not path.is_file():
        return None
    try:
        return from_dict(RunMarker, json.loads(path.read_bytes()), "", document=path.name)
    except (ValueError, RecursionError) as err:  # JSON, UTF-8 and ConfigError are ValueErrors
        raise ConfigError(
            f"{path} is damaged ({err}): whose run directory this is cannot be told; choose another train.output_dir"
        ) from None


def accept(directory: Path, config: Config, start_step: int) -> None:
    """The run is accepted (every check has passed): the directory becomes its own (taken over
    from an older pangu, or new), metrics of steps it will not resume from are set aside, and
    config.yaml is (re)written. The marker comes last: an interruption before it leaves a
    directory that the next attempt takes over again."""
    marker = read_marker(directory) or RunMarker(
        run=uuid.uuid4().hex, created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    metrics = directory / METRICS_FILE
    if start_step == 0 and _logs_steps(metrics):
        aside = _set_aside(directory)
        log.warning(
            "%s has no checkpoint to resume from, but %s records steps of an earlier attempt: it is kept as %s, "
            "and the run starts from step 0",
            directory,
            METRICS_FILE,
            aside,
        )
    if not metrics.is_file() or not _carries(metrics, marker.run):
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines() if metrics.is_file() else []
        if lines and _run_of(lines[0]) is not None:  # the identity an interrupted takeover gave it
            lines = lines[1:]
        write_atomic(metrics, "".join(line + "\n" for line in [json.dumps(_run_record(marker.run)), *lines]))
    write_config(directory, config, marker.run)
    if not (directory / RUN_MARKER).is_file():
        write_json_atomic(directory / RUN_MARKER, {"run": marker.run, "created": marker.created})


def write_config(directory: Path, config: Config, run: str) -> None:
    """RUN_DIR/config.yaml, replaced atomically: a full disk leaves the previous one, and says so."""
    try:
        write_atomic(directory / CONFIG_FILE, _config_header(run) + config.dump())
    except OSError as err:
        raise ConfigError(
            f"cannot write {directory / CONFIG_FILE} ({err.strerror}): free space or fix the directory"
        ) from None


def _config_header(run: str) -> str:
    return f"# pangu run {run} (see {RUN_MARKER})\n"


def _run_record(run: str) -> dict:
    """metrics.jsonl's first record: the run it belongs to (step 0, so that superseding keeps it)."""
    return {"step": 0, "event": "run", "run": run}


def _run_of(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("run") if isinstance(record, dict) and record.get("event") == "run" else None


def _carries(path: Path, run: str) -> bool:
    """Whether a config.yaml or metrics.jsonl (absent counts) carries the run's identity."""
    if not path.is_file():
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    return first == _config_header(run) if path.name == CONFIG_FILE else _run_of(first) == run


def _logs_steps(metrics: Path) -> bool:
    """Whether metrics.jsonl records a training step (not only what a run logs before its first)."""
    if not metrics.is_file():
        return False
    with open(metrics, encoding="utf-8", errors="replace") as f:
        return any(_step_of(line) > 0 for line in f)


def _step_of(line: str) -> int:
    """The step a metrics.jsonl line records (0 for a damaged line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return 0
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else 0


def _set_aside(directory: Path) -> str:
    """Moves metrics.jsonl and tensorboard/ to their first free .set-aside-N names; returns the first."""
    n = 1
    while any((directory / f"{name}.set-aside-{n}").exists() for name in (METRICS_FILE, "tensorboard")):
        n += 1
    for name in (METRICS_FILE, "tensorboard"):
        if (directory / name).exists():
            os.replace(directory / name, directory / f"{name}.set-aside-{n}")
    return f"{METRICS_FILE}.set-aside-{n}"
