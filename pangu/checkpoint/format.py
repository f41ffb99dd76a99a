"""pangu's checkpoint format: per parameter, layout-independent, crash-safe.

    RUN_DIR/checkpoints/
        latest                     name of the newest complete checkpoint (replaced atomically)
        step_00000100/
            manifest.json          written last: format, kind, step, config, layout, tokenizer
                                   fingerprint, every file with its size and sha256
            tensors/pp{P}-tp{T}.*  weights (fp32 master copy) and optimizer state of every
                                   parameter, each tensor-parallel slice with its place in the
                                   full tensor (see store.py)
            rng/rank{R}.pt         every RNG of every rank (exact resume on the same layout)
            trainer.json           step, sampler state, loss scaler, optimizer scalars
            tokenizer.model        so that a checkpoint is usable on its own

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and
only then does `latest` move (written to a temporary file and renamed). A crash at any moment
leaves the previous checkpoint and pointer intact. A weights-only checkpoint (imported or
converted weights) has the same manifest with kind "weights" and no rng/ or trainer.json.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from pangu.checkpoint.store import CheckpointError, fsync_dir, sha256_file, write_file_synced
from pangu.config import ModelConfig

FORMAT = "pangu-checkpoint"
VERSION = 1
# Model fields that decide the shapes of the parameters: a checkpoint must agree on all of them.
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "ffn_size",
    "padded_vocab_size",
    "seq_length",
    "scale_invariant",
)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a `checkpoints/` directory or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "manifest.json").is_file():
            return candidate
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    raise CheckpointError(
        f"{path} is not a pangu checkpoint, checkpoints directory or run directory "
        f"(no manifest.json and no checkpoints/latest)"
    )


def find_intact(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run, or None for a fresh run.

    Starts from the `latest` pointer; a checkpoint that is torn or corrupt (a file missing,
    truncated or not matching its checksum) is passed over with a warning for the next older
    complete one."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    newest = root / pointer.read_text().strip()
    older = sorted((p for p in root.glob("step_*") if p.name < newest.name), reverse=True)
    problems = []
    for candidate in [newest, *older]:
        try:
            read_manifest(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; using {candidate.name} instead", stacklevel=2)
        return candidate
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(problems))


def read_manifest(path: Path, verify: bool = True) -> dict:
    """The manifest, after checking that every file it lists is there with its size and checksum."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete pangu checkpoint: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a pangu checkpoint manifest")
    if verify:
        for rel, info in manifest["files"].items():
            file = path / rel
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing")
            if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {rel} does not match its checksum")
    return manifest


def model_fields(model: ModelConfig) -> dict:
    return dict(model.__dict__)


def check_model_matches(manifest: dict, model: ModelConfig, path: Path) -> None:
    stored = ModelConfig(**manifest["model"])
    for field in SHAPE_FIELDS:
        if getattr(stored, field) != getattr(model, field):
            raise CheckpointError(
                f"checkpoint {path} was written for model.{field} = "
                f"{getattr(stored, field)!r} but the config has {getattr(model, field)!r}"
            )


def file_entry(path: Path) -> dict:
    """A manifest's record of one written file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: Path, manifest: dict) -> None:
    write_file_synced(
        directory / "manifest.json", json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=1).encode()
    )


def publish(tmp: Path, final: Path) -> None:
    """Moves a finished checkpoint directory into place (replacing one of the same name from an
    earlier attempt)."""
    for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()} | {tmp}, reverse=True):
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


def prune(root: Path, keep: int) -> None:
    """Keeps the newest `keep` complete checkpoints; removes older ones and leftovers of crashed saves."""
    complete = sorted(p for p in root.glob("step_*") if (p / "manifest.json").is_file())
    for old in complete[:-keep] + list(root.glob(".tmp_step_*")):
        shutil.rmtree(old, ignore_errors=True)
