"""pangu's checkpoint format: per parameter, layout-independent, crash-safe, written and read in
parallel by every rank (format 2; format 1 is still read).

    RUN_DIR/checkpoints/
        latest                     name of the newest complete checkpoint (replaced atomically)
        step_00000100/
            manifest.json          written last: format, kind, step, config, layout, tokenizer
                                   fingerprint, every file with its size (and checksum for
                                   the small files)
            tensors/rank{R}.bin    what rank R owns under ZeRO-1: the fp32 master weights and the
                                   optimizer state of its fragment of each parameter (store.py)
            tensors/index.json     every piece: parameter, state key, tensor-parallel box, flat
                                   range within it, file, offset, checksum (xxh3)
            rng/rank{R}.pt         every RNG of every rank (exact resume on the same layout)
            trainer.json           step, sampler state, loss scaler, optimizer scalars
            tokenizer.model        so that a checkpoint is usable on its own

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and
only then does `latest` move (written to a temporary file and renamed). A crash at any moment
leaves the previous checkpoint and pointer intact. Start-up checks structure only (the manifest,
every file present with its size: O(files)); the rank that reads a piece checks its checksum.
A weights-only checkpoint (imported or converted weights) has the same layout with kind
"weights", one tensors/rank00000.bin and no rng/ or trainer.json. Format 1 (before parallel
saves): tensors/pp{P}-tp{T}.{bin,json} with whole tensor-parallel slices and a sha256 per file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
import zlib
from pathlib import Path

from pangu.checkpoint.store import (
    CHECKSUM,
    CheckpointError,
    CorruptCheckpointError,
    checksum,
    file_checksum,
    fsync_dir,
    write_file_synced,
)
from pangu.config import ModelConfig

FORMAT = "pangu-checkpoint"
VERSION = 2
# Model fields that change only how a network trains, not the function it computes once trained:
# dropout is off whenever a network is evaluated, and init_std only draws the initial weights,
# which a checkpoint replaces. Every other ModelConfig field (the shapes, the activation, the
# final LayerNorm's place, its epsilon, the vocabulary the logits keep, a field added later)
# changes the function, so a checkpoint and the config it is resumed, continued or evaluated with
# must agree on it (check_model_matches).
TRAINING_ONLY_FIELDS = ("dropout", "attention_dropout", "init_std")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


_STEP_DIR = re.compile(r"step_(\d+)")


def step_dirs(root: Path) -> list[Path]:
    """The checkpoint directories (step_N) under `root`, newest (highest step) first."""
    found = [(int(m[1]), p) for p in root.glob("step_*") if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a `checkpoints/` directory or a run directory
    (the newest intact checkpoint in it)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    for root in (path, checkpoint_root(path)):
        if step_dirs(root):
            return intact_checkpoints(root.parent)[0]
    raise CheckpointError(
        f"{path} is not a pangu checkpoint, checkpoints directory or run directory (no manifest.json, no step_N "
        f"directories): give the path of a checkpoint or of a run directory"
    )


def intact_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints whose structure is intact, newest first ([] for a fresh run). They are
    found from the directory's contents: `latest` is only a hint, so a lost or stale pointer
    loses no work. A torn one (manifest or a file missing, a size wrong) is passed over with a
    warning naming what is wrong; raises when there are checkpoints but none is intact."""
    root = checkpoint_root(run_dir)
    found = step_dirs(root)
    if not found:
        return []
    problems, intact = [], []
    for candidate in found:
        try:
            check_structure(candidate)
        except CorruptCheckpointError as err:
            if not intact:
                problems.append(str(err))
            continue
        intact.append(candidate)
    if not intact:
        raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(problems)}")
    for problem in problems:
        warnings.warn(f"{problem}; using {intact[0].name} instead", stacklevel=2)
    pointer = root / "latest"
    hint = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if not problems and hint != intact[0].name:
        said = f"names {hint!r}" if hint else "is missing"
        warnings.warn(f"{pointer} {said}; resuming from {intact[0].name}, the newest intact checkpoint", stacklevel=2)
    return intact


def read_manifest(path: Path, verify: bool = True) -> dict:
    """The manifest; with `verify`, after checking the checkpoint's structure (check_structure)."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{path} is not a complete pangu checkpoint: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{manifest_path} is corrupt: {err}") from None
    if not (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("version", 1), int)
        and _has_manifest_shape(manifest)
    ):
        raise CorruptCheckpointError(f"{manifest_path} is corrupt: it is not a pangu checkpoint manifest")
    if manifest.get("version", 1) > VERSION:
        raise CheckpointError(
            f"{path} is format {manifest['version']}; this pangu reads formats 1 to {VERSION}: upgrade pangu"
        )
    if verify:
        for rel, info in manifest["files"].items():
            file = Path(path) / rel
            if not file.is_file():
                raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {rel} is missing")
            if file.stat().st_size != info["bytes"]:
                raise CorruptCheckpointError(
                    f"checkpoint {path} is torn: {rel} has {file.stat().st_size} bytes, the manifest says {info['bytes']}"
                )
    return manifest


def _has_manifest_shape(manifest: dict) -> bool:
    """Whether a manifest holds every field pangu reads, with its type."""
    layout = manifest.get("layout")
    return (
        isinstance(manifest.get("kind"), str)
        and isinstance(manifest.get("step"), int)
        and isinstance(manifest.get("model"), dict)
        and set(manifest["model"]) <= set(ModelConfig.__dataclass_fields__)
        and isinstance(layout, dict)
        and all(isinstance(layout.get(axis), int) for axis in ("dp", "tp", "pp"))
        and all(isinstance(info, dict) and isinstance(info.get("bytes"), int) for info in manifest["files"].values())
    )


def check_structure(path: Path) -> dict:
    """The manifest, after checking that every file it lists is there with its size (O(files),
    no byte is read); returns the manifest."""
    return read_manifest(path, verify=True)


def read_checked(path: Path, rel: str, manifest: dict) -> bytes:
    """A small file of a checkpoint, checked against the checksum (format 1: sha256) in its manifest."""
    import hashlib

    file = Path(path) / rel
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {rel} is missing") from None
    info = manifest["files"].get(rel, {})
    if (
        (CHECKSUM in info and checksum(data) != info[CHECKSUM])
        or ("crc32" in info and zlib.crc32(data) != info["crc32"])
        or (info.get("sha256") and hashlib.sha256(data).hexdigest() != info["sha256"])
    ):
        raise CorruptCheckpointError(f"{file} is corrupt: it does not match its checksum")
    return data


def model_fields(model: ModelConfig) -> dict:
    return dict(model.__dict__)


def model_mismatch(stored: ModelConfig, given: ModelConfig, given_name: str = "the config") -> str | None:
    """Why `given` computes another function than `stored`: every field (but TRAINING_ONLY_FIELDS)
    that differs, stored and given; None when they agree."""
    changed = []
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in TRAINING_ONLY_FIELDS or getattr(stored, name) == getattr(given, name):
            continue
        if name == "ffn_hidden_size" and stored.ffn_size == given.ffn_size:
            continue  # 0 means 4 x hidden_size: one width written two ways
        changed.append(f"model.{name} = {getattr(stored, name)!r} but {given_name} has {getattr(given, name)!r}")
    return "; ".join(changed) + " (the network would compute another function)" if changed else None


def check_model_matches(manifest: dict, model: ModelConfig, path: Path) -> None:
    why = model_mismatch(ModelConfig(**manifest["model"]), model)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} was written for {why}")


def file_entry(path: Path) -> dict:
    """A manifest's record of one written (small) file: its size and checksum."""
    return {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}


def write_manifest(directory: Path, manifest: dict) -> None:
    write_file_synced(
        directory / "manifest.json", json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=1).encode()
    )


def publish(tmp: Path, final: Path) -> None:
    """Moves a finished checkpoint directory into place (replacing one of the same name from an
    earlier attempt)."""
    for sub in sorted({p for p in tmp.rglob("*") if p.is_dir()} | {tmp}, reverse=True):
        fsync_dir(sub)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)


def publish_latest(root: Path, name: str) -> None:
    """Moves the `latest` pointer atomically (write a temporary file, fsync, rename)."""
    tmp = root / ".latest.tmp"
    write_file_synced(tmp, name.encode())
    tmp.rename(root / "latest")
    fsync_dir(root)


def prune(root: Path, keep: int, current: str | None = None) -> None:
    """Keeps the newest `keep` complete checkpoints up to `current` (the one just published; newer
    ones belong to a timeline the run has left, e.g. written but never published before a crash,
    and are replaced when the run gets there again); removes older ones and leftovers of crashed
    saves."""
    newest_kept = int(current.removeprefix("step_")) if current else None
    complete = [
        p
        for p in step_dirs(root)
        if (p / "manifest.json").is_file() and (newest_kept is None or int(p.name.removeprefix("step_")) <= newest_kept)
    ]
    for old in complete[keep:] + list(root.glob(".tmp_step_*")):
        shutil.rmtree(old, ignore_errors=True)


def set_aside(run_dir: str | Path) -> Path:
    """Moves a run's checkpoints out of the way (to checkpoints.set-aside-N, never deleted) so
    that the run starts again from step 0 (train.restart)."""
    root = checkpoint_root(run_dir)
    n = 1
    while (target := root.with_name(f"{root.name}.set-aside-{n}")).exists():
        n += 1
    root.rename(target)
    fsync_dir(root.parent)
    return target
