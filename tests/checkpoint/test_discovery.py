"""Finding the checkpoint to resume from cannot lose work: the directory's contents decide,
`latest` is only a hint, a damaged manifest of any shape falls back to an older checkpoint, and
pruning never deletes the checkpoint just written or anything newer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import CheckpointError
from pangu.files import make_marked_tmp
from tests.helpers import structurally_intact_checkpoint


def make_run(tmp_path: Path, steps: list[int], latest: int | str | None) -> Path:
    """A run directory with structurally intact (empty) checkpoints at `steps`."""
    root = fmt.checkpoint_root(tmp_path)
    for step in steps:
        structurally_intact_checkpoint(root / fmt.step_name(step), step)
    if latest is not None:
        (root / "latest").write_text(latest if isinstance(latest, str) else fmt.step_name(latest))
    return tmp_path


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_the_newest_checkpoint_is_found_when_latest_is_missing(tmp_path):
    run = make_run(tmp_path, [2, 4, 6], latest=None)
    with pytest.warns(UserWarning, match="latest is missing; resuming from step_00000006"):
        assert names(fmt.intact_checkpoints(run)) == ["step_00000006", "step_00000004", "step_00000002"]


def test_a_stale_or_dangling_latest_is_only_a_hint(tmp_path):
    run = make_run(tmp_path, [2, 4, 6], latest="step_00000001")  # names a directory that is gone
    with pytest.warns(UserWarning, match="names 'step_00000001'; resuming from step_00000006"):
        assert fmt.intact_checkpoints(run)[0].name == "step_00000006"
    assert fmt.resolve(run).name == "step_00000006"


def test_steps_are_ordered_as_numbers_not_names(tmp_path):
    run = make_run(tmp_path, [99_999_999, 100_000_000], latest=100_000_000)
    assert fmt.intact_checkpoints(run)[0].name == "step_100000000"


def test_a_fresh_run_has_no_checkpoint_and_foreign_entries_are_not_checkpoints(tmp_path):
    root = fmt.checkpoint_root(tmp_path)
    root.mkdir()
    (root / "step_notes").mkdir()
    (root / "step_00000009").write_text("a file, not a checkpoint")
    assert fmt.intact_checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    "manifest",
    [
        os.urandom(4096),
        b"",
        b"[1, 2]",
        b"7",
        b'{"format": "pangu-checkpoint", "files": 3}',
        b'{"files": {}}',
        b'{"format": "pangu-checkpoint", "kind": "training", "step": 4, "files": {}}',
        b'{"format": "pangu-checkpoint", "kind": "training", "step": 4, "model": {"colour": 1}, "files": {}, '
        b'"layout": {"dp": 1, "tp": 1, "pp": 1}}',
    ],
    ids=["random bytes", "empty", "a list", "a number", "files not a mapping", "no format", "no layout", "odd model"],
)
def test_a_damaged_manifest_of_any_shape_falls_back_to_the_older_checkpoint(tmp_path, manifest):
    run = make_run(tmp_path, [2, 4], latest=4)
    (fmt.checkpoint_root(run) / "step_00000004" / "manifest.json").write_bytes(manifest)
    with pytest.warns(UserWarning, match="step_00000004.*corrupt.*using step_00000002"):
        assert names(fmt.intact_checkpoints(run)) == ["step_00000002"]


def test_checkpoints_that_are_all_damaged_are_an_error_not_a_fresh_start(tmp_path):
    run = make_run(tmp_path, [2, 4], latest=4)
    for directory in fmt.step_dirs(fmt.checkpoint_root(run)):
        (directory / "manifest.json").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        fmt.intact_checkpoints(run)


def test_pruning_keeps_the_checkpoint_just_written_and_everything_newer(tmp_path):
    run = make_run(tmp_path, [2, 4, 6, 8, 10], latest=6)
    root = fmt.checkpoint_root(run)
    make_marked_tmp(root / ".tmp_step_00000012")  # a crashed save's leftovers
    (root / ".tmp_step_00000014").mkdir()  # not marked: not pangu's (a user's, or an older pangu's)
    fmt.prune(root, keep=1, current="step_00000006")
    assert names(fmt.step_dirs(root)) == ["step_00000010", "step_00000008", "step_00000006"]
    assert not (root / ".tmp_step_00000012").exists() and (root / ".tmp_step_00000014").is_dir()
    fmt.prune(root, keep=2, current="step_00000010")
    assert names(fmt.step_dirs(root)) == ["step_00000010", "step_00000008"]


def test_set_aside_moves_every_checkpoint_and_deletes_nothing(tmp_path):
    run = make_run(tmp_path, [2, 4], latest=4)
    first = fmt.set_aside(run)
    make_run(tmp_path, [2], latest=2)
    second = fmt.set_aside(run)
    assert (first.name, second.name) == ("checkpoints.set-aside-1", "checkpoints.set-aside-2")
    assert names(fmt.step_dirs(first)) == ["step_00000004", "step_00000002"] and (second / "latest").is_file()
    assert fmt.intact_checkpoints(run) == []
