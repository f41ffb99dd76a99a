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
            (rng/rank{R}.pt        older checkpoints only: RNG pickles, never read; dropout is
                                   seeded by the step and the micro-batch, so resume needs none)
            trainer.json           step, sampler state, loss scaler, optimizer scalars
            tokenizer.model        so that a checkpoint is usable on its own

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and
only then does `latest` move (written to a temporary file and renamed). A crash at any moment
leaves the previous checkpoint and pointer intact. Start-up checks structure only (the manifest,
every file present with its size: O(files)); the rank that reads a piece checks its checksum.
A weights-only checkpoint (imported or converted weights) has the same layout with kind
"weights", one tensors/rank00000.bin and no rng/ or trainer.json. Format 1 (before parallel
saves): tensors/pp{P}-tp{T}.{bin,json} with whole tensor-parallel slices and a sha256 per file.

A checkpoint is untrusted input (one may be handed over to be continued): its manifest and index
are read as typed records and checked before anything is built or allocated from them, every file
they name stays inside the checkpoint, and nothing in it is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pangu.checkpoint.store import (
    INDEX_FILE,
    CheckpointError,
    CorruptCheckpointError,
    TensorReader,
    checksum,
    file_checksum,
    parse_json,
)
from pangu.config import ModelConfig
from pangu.data.tokenizer import TOKENIZER_FILE
from pangu.files import (
    UnsafePathError,
    confined,
    fsync_dir,
    make_marked_tmp,
    relative_parts,
    remove_marked_tmp,
    unmark,
    write_atomic,
    write_synced,
)
from pangu.model import declaration
from pangu.schema import ConfigError, from_dict

FORMAT = "pangu-checkpoint"
VERSION = 2
TRAINER_FILE = "trainer.json"
SMALLEST_ITEMSIZE = 2  # bytes of a stored element (float16, bfloat16): what bounds a manifest's model


@dataclass(frozen=True)
class FileRecord:
    """A file of a checkpoint as its manifest lists it: its size and, for the small files (and in
    format 1 for every file), a checksum of its bytes."""

    bytes: int
    xxh3: int | None = None
    crc32: int | None = None
    sha256: str | None = None  # format 1


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json: what a checkpoint is and every file it holds."""

    format: Literal["pangu-checkpoint"] = FORMAT
    version: int = 1  # format 1 wrote it too; only the first manifests lacked it
    kind: Literal["training", "weights"]
    step: int
    model: ModelConfig
    config: dict[str, Any] = field(default_factory=dict)  # the run's whole config, as that pangu wrote it
    layout: Layout
    tokenizer_fingerprint: str | None = None  # sha256 of the tokenizer the weights were trained with
    pieces: int | None = None
    bytes: int | None = None
    upgraded_from: int | None = None
    files: dict[str, FileRecord]

    @property
    def optimizer(self) -> str | None:
        """optim.name of the run that wrote it (None for weights)."""
        optim = self.config.get("optim")
        return optim.get("name") if isinstance(optim, dict) else None


@dataclass(frozen=True)
class SamplerState:
    seed: int
    consumed_samples: int
    skipped_ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class OptimizerScalars:
    """Per param group: state that is not per element, and what the group itself keeps."""

    state: dict[str, float]
    group: dict[str, bool | int | float]


@dataclass(frozen=True)
class TrainerFile:
    """trainer.json: where the run was, and the optimizer's and loss scaler's scalars."""

    step: int
    sampler: SamplerState
    optimizer_scalars: list[OptimizerScalars]
    loss_scaler: dict[str, bool | int | float]
    tokenizer_fingerprint: str | None = None
    corpus_fingerprint: str | None = None  # of the corpus the sampler's position counts samples of


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


def read_manifest(path: Path, verify: bool = True) -> Manifest:
    """The manifest, read as the typed `Manifest` and checked as untrusted input (every file name
    inside the checkpoint, the model valid and no larger than its tensor files can hold); with
    `verify`, after checking the checkpoint's structure (every file present, its size as listed,
    no symbolic link leading out: O(files), no byte read). A damaged one is CorruptCheckpointError."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{path} is not a complete pangu checkpoint: manifest.json is missing")
    try:
        raw = json.loads(manifest_path.read_bytes())
        version = raw.get("version", 1) if isinstance(raw, dict) else None
        if isinstance(version, int) and version > VERSION:
            raise CheckpointError(f"{path} is format {version}; this pangu reads formats 1 to {VERSION}: upgrade pangu")
        manifest = from_dict(Manifest, raw, "", document=manifest_path.name)
        _check_manifest(manifest, Path(path))
    except (ValueError, RecursionError, UnsafePathError) as err:  # JSON, UTF-8 and ConfigError are ValueErrors
        raise CorruptCheckpointError(f"{manifest_path} is corrupt: {err}") from None
    if verify:
        for rel, info in manifest.files.items():
            file = _file(path, rel)
            if not file.is_file():
                raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {rel} is missing")
            if file.stat().st_size != info.bytes:
                raise CorruptCheckpointError(
                    f"checkpoint {path} is torn: {rel} has {file.stat().st_size} bytes, the manifest says {info.bytes}"
                )
    return manifest


def _check_manifest(manifest: Manifest, path: Path) -> None:
    """What the types cannot say (raises ConfigError or UnsafePathError, which the caller words)."""
    if manifest.version < 1 or manifest.step < 0 or min(dataclasses.astuple(manifest.layout)) < 1:
        raise ConfigError(f"version {manifest.version}, step {manifest.step} or layout {manifest.layout} is impossible")
    for rel, info in manifest.files.items():
        relative_parts(path, rel)  # names only here: each file is confined (links too) where it is opened
        if info.bytes < 0:
            raise ConfigError(f"{rel} has {info.bytes} bytes")
    manifest.model.validate()  # as a config file's model section, before any network is built
    elements = declared_elements(manifest.model)
    tensor_bytes = sum(info.bytes for rel, info in manifest.files.items() if re.fullmatch(r"tensors/[^/]+\.bin", rel))
    if elements * SMALLEST_ITEMSIZE > tensor_bytes:
        raise ConfigError(
            f"its model has {elements:,} parameter elements, more than its tensor files ({tensor_bytes:,} bytes) "
            f"can hold"
        )


def declared_elements(model: ModelConfig) -> int:
    """The elements of every parameter the model declares, from the declarations of its 2- and
    3-layer versions (each further layer adds one more block): a manifest may name any number of
    layers, and declaring them one by one would take memory in proportion."""
    two, three = (
        sum(p.numel for p in declaration.parameters(dataclasses.replace(model, num_layers=n))) for n in (2, 3)
    )
    return two + (model.num_layers - 2) * (three - two)


def _file(path: Path, rel: str) -> Path:
    """A file a manifest names, inside the checkpoint (a symbolic link leading out is damage)."""
    try:
        return confined(path, rel)
    except UnsafePathError as err:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {err}") from None


def check_structure(path: Path) -> Manifest:
    """The manifest, after checking that every file it lists is there with its size (O(files),
    no byte is read)."""
    return read_manifest(path, verify=True)


def read_checked(path: Path, rel: str, manifest: Manifest) -> bytes:
    """A small file of a checkpoint, checked against the checksum (format 1: sha256) its manifest
    lists for it."""
    info = manifest.files.get(rel)
    if info is None:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its manifest does not list {rel}")
    file = _file(path, rel)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {rel} is missing") from None
    if info.xxh3 is None and info.crc32 is None and info.sha256 is None:
        raise CorruptCheckpointError(f"{file} is not checked: the manifest lists no checksum for it")
    if (
        (info.xxh3 is not None and checksum(data) != info.xxh3)
        or (info.crc32 is not None and zlib.crc32(data) != info.crc32)
        or (info.sha256 is not None and hashlib.sha256(data).hexdigest() != info.sha256)
    ):
        raise CorruptCheckpointError(f"{file} is corrupt: it does not match its checksum")
    return data


def read_tokenizer(path: Path, manifest: Manifest) -> bytes | None:
    """The tokenizer model a checkpoint carries (None if it carries none), checked against its
    checksum and against the fingerprint of the tokenizer its weights were trained with."""
    if TOKENIZER_FILE not in manifest.files:
        return None
    data = read_checked(path, TOKENIZER_FILE, manifest)
    fingerprint = manifest.tokenizer_fingerprint
    if fingerprint is not None and hashlib.sha256(data).hexdigest() != fingerprint:
        raise CorruptCheckpointError(
            f"{path / TOKENIZER_FILE} is not the tokenizer checkpoint {path} was trained with (its sha256 is not the "
            f"manifest's tokenizer_fingerprint {fingerprint[:12]}...): use the tokenizer of the data it was trained on"
        )
    return data


def read_trainer_state(path: Path, manifest: Manifest) -> TrainerFile:
    """trainer.json of a training checkpoint, checked against its checksum and read as typed."""
    return parse_json(TrainerFile, read_checked(path, TRAINER_FILE, manifest), path / TRAINER_FILE)


def tensor_reader(path: Path, manifest: Manifest, prefer: str | None = None) -> TensorReader:
    """A reader of a checkpoint's pieces (any layout), every piece checked against the files the
    manifest lists and the shapes its model declares. `prefer`: see TensorReader."""
    index_rel = f"tensors/{INDEX_FILE}"
    return TensorReader(
        path / "tensors",
        prefer=prefer,
        index=read_checked(path, index_rel, manifest) if index_rel in manifest.files else None,
        sizes={
            rel.removeprefix("tensors/"): info.bytes
            for rel, info in manifest.files.items()
            if rel.startswith("tensors/")
        },
        shapes=declared_shapes(manifest.model),
    )


def declared_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{parameter: full shape} as the model declares them: what a checkpoint's pieces must be."""
    return {name: spec.shape for name, spec in declaration.parameter_table(model).items()}


def model_mismatch(stored: ModelConfig, given: ModelConfig, given_name: str = "the config") -> str | None:
    """Why `given` computes another function than `stored`: every field (but TRAINING_ONLY_FIELDS)
    that differs, stored and given; None when they agree."""
    changed = []
    for declared in dataclasses.fields(ModelConfig):
        name = declared.name
        if name in TRAINING_ONLY_FIELDS or getattr(stored, name) == getattr(given, name):
            continue
        if name == "ffn_hidden_size" and stored.ffn_size == given.ffn_size:
            continue  # 0 means 4 x hidden_size: one width written two ways
        changed.append(f"model.{name} = {getattr(stored, name)!r} but {given_name} has {getattr(given, name)!r}")
    return "; ".join(changed) + " (the network would compute another function)" if changed else None


def check_model_matches(manifest: Manifest, model: ModelConfig, path: Path) -> None:
    why = model_mismatch(manifest.model, model)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} was written for {why}")


def file_entry(path: Path) -> FileRecord:
    """A manifest's record of one written (small) file: its size and checksum."""
    return FileRecord(bytes=path.stat().st_size, xxh3=file_checksum(path))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Writes manifest.json (format 2) into a checkpoint directory being written (then published)."""
    record = {key: value for key, value in dataclasses.asdict(manifest).items() if value is not None}
    record.update(format=FORMAT, version=VERSION)
    record["files"] = {rel: {k: v for k, v in info.items() if v is not None} for rel, info in record["files"].items()}
    write_synced(directory / "manifest.json", json.dumps(record, indent=1).encode())


def temporary_beside(out: Path) -> Path:
    """The marked temporary directory (.tmp_<name> beside `out`) that `out` is written in before it
    is published: one left by an interrupted attempt is replaced; a directory of that name pangu
    did not make is refused, never removed."""
    try:
        return make_marked_tmp(out.with_name(f".tmp_{out.name}"))
    except FileExistsError as err:
        raise CheckpointError(str(err)) from None


def discard(tmp: Path) -> None:
    """Removes a temporary directory after a failure (only if it is pangu's, marked)."""
    with contextlib.suppress(OSError):
        remove_marked_tmp(tmp)


def publish(tmp: Path, final: Path) -> None:
    """Moves a finished checkpoint directory into place (replacing one of the same name from an
    earlier attempt)."""
    _sync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    unmark(final)  # after the rename: a crash before it leaves a stray marker, never an unmarked leftover
    fsync_dir(final.parent)


def publish_new(tmp: Path, out: Path) -> None:
    """Moves a finished directory to `out`, a new output directory (one that appeared there
    meanwhile is refused, never replaced)."""
    _sync_tree(tmp)
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out} appeared while it was being written: choose a new output directory")
    tmp.rename(out)
    unmark(out)
    fsync_dir(out.parent)


def _sync_tree(directory: Path) -> None:
    """fsyncs every directory of a tree (its files are fsynced as they are written)."""
    for sub in sorted({p for p in directory.rglob("*") if p.is_dir()} | {directory}, reverse=True):
        fsync_dir(sub)


def publish_latest(root: Path, name: str) -> None:
    """Moves the `latest` pointer atomically."""
    write_atomic(root / "latest", name)


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
    for old in complete[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp_step_*"):
        with contextlib.suppress(FileExistsError):  # not marked: not pangu's (or an older pangu's) to remove
            remove_marked_tmp(leftover)


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
