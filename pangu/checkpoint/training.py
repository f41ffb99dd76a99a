"""Saving and loading a training checkpoint under any layout: every rank writes what it owns and
reads what it needs (the format: format.py; the pieces: store.py; what a rank owns: the engine's
fragments, pangu/parallel/engine.py; saving in the background: saver.py).

Save: each rank writes, for its fragment of every parameter (its ZeRO-1 or FSDP share), the fp32
master weight and each optimizer state as pieces of tensors/rank{R}.bin, each with its box in the
full tensor and flat range, plus its RNG states. Rank 0 then gathers the pieces' records (metadata, not tensors),
writes the index, the trainer state, the tokenizer and the manifest, and publishes. No collective
carries tensor data, and the model's half-precision weights are not written (they are the master
weights rounded).

Load: each rank reads the pieces covering its own fragments (on the layout that wrote the
checkpoint, exactly its own pieces; under another layout, the stored pieces overlapping its
share), checks their checksums, and only then do the ranks agree: a corrupt piece found by any
rank makes every rank raise CorruptCheckpointError (`resume` falls back to the previous
checkpoint). The model's weights are refreshed from the master weights by the data-parallel
all-gather every optimizer step ends with.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import (
    INDEX_FILE,
    CheckpointError,
    CorruptCheckpointError,
    TensorReader,
    TensorWriter,
    write_index,
)
from pangu.config import Config
from pangu.data.tokenizer import TOKENIZER_FILE
from pangu.files import make_marked_tmp, write_synced
from pangu.model import declaration
from pangu.optim import registry
from pangu.parallel.engine import Engine
from pangu.parallel.topology import Topology

_GROUP: list = []  # [the checkpoint group, the default group it was made under]


def checkpoint_group():
    """A gloo group of all ranks for checkpoint metadata (host objects), used by the background
    writer while the training thread runs collectives on the other groups. Every rank creates it
    at the same point (the first save or load); its timeout is every group's
    (parallel.timeout_minutes, which pangu.parallel.topology makes torch's default)."""
    default = dist.distributed_c10d._get_default_group()
    if not _GROUP or _GROUP[1] is not default:
        _GROUP[:] = [dist.new_group(backend="gloo"), default]
    return _GROUP[0]


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}"


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint to resume from


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run whose structure is intact (format.find_intact), or None for
    a fresh run. In a distributed run rank 0 looks and tells the others."""
    candidates = checkpoint_candidates(run_dir)
    return candidates[0] if candidates else None


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """A run's structurally intact checkpoints, newest first (format.intact_checkpoints); in a
    distributed run rank 0 checks the files (O(files), no byte read) and tells the others."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fmt.intact_checkpoints(run_dir)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [[str(p) for p in fmt.intact_checkpoints(run_dir)]]
        except CheckpointError as err:
            box = [err]
    dist.broadcast_object_list(box, src=0, group=checkpoint_group())
    if isinstance(box[0], Exception):
        raise box[0]
    return [Path(p) for p in box[0]]


def resume(
    candidates: list[Path],
    engine: Engine,
    topology: Topology,
    config: Config,
    prefetch: Prefetch | None = None,
) -> tuple[Path, dict]:
    """Loads the newest of `candidates` whose pieces all check out; a torn or corrupt piece found
    by any rank makes every rank go on to the next older one, with a warning naming the file.
    `prefetch`: the newest one's share, read ahead (Prefetch)."""
    problems = []
    for i, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, engine, topology, config, prefetch=prefetch)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            following = candidates[i + 1].name if i + 1 < len(candidates) else "none is left"
            if topology.rank == 0:
                warnings.warn(f"{err}; falling back to {following}", stacklevel=2)
            continue
        return path, state
    raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(problems))


class Prefetch:
    """A rank's share of a checkpoint read ahead by a background thread, e.g. while the engine is
    being built: the index parsed and, on the layout that wrote the checkpoint, the rank's own
    file read whole and every piece in it checked. `load_checkpoint` then copies from memory."""

    def __init__(self, path: Path, topology: Topology):
        self.path = Path(path)
        self._reader: TensorReader | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(topology,), name="pangu-prefetch", daemon=True)
        self._thread.start()

    def _read(self, topology: Topology) -> None:
        try:
            manifest = fmt.read_manifest(self.path, verify=False)
            own = f"{rank_file(topology.rank)}.bin" if manifest.layout == _layout(topology) else None
            self._reader = fmt.tensor_reader(self.path, manifest, prefer=own)
            if own is not None and f"tensors/{own}" in manifest.files:
                self._reader.preload(own)
        except BaseException as err:  # noqa: BLE001 - raised where the share is read
            self._error = err

    def reader(self) -> TensorReader:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._reader


def _layout(topology: Topology) -> fmt.Layout:
    return fmt.Layout(dp=topology.dp, tp=topology.tp, pp=topology.pp)


# ---------------------------------------------------------------------------------------------
# Saving


@dataclass
class SaveRequest:
    """Everything one rank writes for checkpoint `step`, captured when the save was asked for."""

    root: Path
    step: int
    pieces: list[tuple]  # (name, key, tensor, full shape, box, flat range, copy)
    rank: int
    world_size: int
    keep: int
    finalize: dict = field(default_factory=dict)  # rank 0: trainer state, tokenizer, manifest

    @property
    def final(self) -> Path:
        return self.root / fmt.step_name(self.step)

    @property
    def tmp(self) -> Path:
        return self.root / f".tmp_{self.final.name}"


def save_request(
    run_dir: str | Path,
    step: int,
    engine: Engine,
    topology: Topology,
    config: Config,
    trainer_state: dict,
    tokenizer: bytes | None,
    snapshot: list[dict[str, torch.Tensor]] | None = None,
) -> SaveRequest:
    """This rank's part of checkpoint `step`: its fragments of every parameter's weight and
    optimizer state (views of the live buffers, or of `snapshot` for a background save).
    `tokenizer`: the model file the run trains with (rank 0 writes it into the checkpoint)."""
    engine.create_optimizer_state()
    buffers = snapshot if snapshot is not None else engine.checkpoint_buffers()
    shapes = {p.name: p.shape for p in declaration.parameters(config.model)}
    pieces = []
    for fragment in engine.fragments():
        for key in buffers[fragment.buffer]:
            tensor = fragment.view(buffers, key)
            pieces.append(
                (fragment.name, key, tensor, shapes[fragment.name], fragment.box, fragment.flat, fragment.copy)
            )
    request = SaveRequest(
        fmt.checkpoint_root(run_dir),
        step,
        pieces,
        topology.rank,
        topology.world_size,
        config.train.keep_checkpoints,
    )
    if topology.rank == 0:
        request.finalize = {
            "trainer": json.loads(
                json.dumps(
                    dict(
                        trainer_state,
                        optimizer_scalars=engine.optimizer_scalars(),
                        loss_scaler=engine.loss_scale_state(),
                    )
                )
            ),
            "tokenizer": tokenizer,
            "manifest": fmt.Manifest(
                kind="training",
                step=step,
                model=config.model,
                config=config.to_dict(),
                layout=_layout(topology),
                tokenizer_fingerprint=trainer_state.get("tokenizer_fingerprint"),
                files={},
            ),
        }
    return request


def write_checkpoint(request: SaveRequest, group=None) -> Path:
    """Writes and publishes a checkpoint (every rank calls this with its request, on the training
    thread or a background one). A failure on any rank (a full disk, say) removes the partial
    checkpoint and raises CheckpointError on every rank; the previous checkpoint and the `latest`
    pointer are untouched."""
    group = group if group is not None else checkpoint_group()
    root, tmp, final = request.root, request.tmp, request.final
    error = _attempt(lambda: _make_tmp(tmp)) if request.rank == 0 else None
    error = _broadcast(error, group)
    if error is None:
        files, records, error = _write_rank_files(request)
        gathered = [None] * request.world_size if request.rank == 0 else None
        dist.gather_object((files, records, error), gathered, dst=0, group=group)
        if request.rank == 0:
            error = next((e for _, _, e in gathered if e), None)
            if error is None:
                error = _attempt(lambda: _finalize(request, gathered))
        error = _broadcast(error, group)
    if error is not None:
        if request.rank == 0:
            fmt.discard(tmp)
        dist.barrier(group=group)
        previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else "none"
        raise CheckpointError(
            f"could not write checkpoint {final}: {error}. The previous checkpoint "
            f"({previous}) is intact; free space or fix the directory and resume"
        )
    return final


def _attempt(action) -> str | None:
    try:
        action()
    except OSError as err:
        return f"{err.strerror or err} ({err.filename or 'while writing'})"
    except Exception as err:  # noqa: BLE001 - every rank must still take part in the collectives
        return f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    return None


def _broadcast(value, group):
    """Rank 0's value, known to every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _make_tmp(tmp: Path) -> None:
    make_marked_tmp(tmp)  # replacing a crashed attempt's
    (tmp / "tensors").mkdir()


def _write_rank_files(request: SaveRequest) -> tuple[dict, list[dict], str | None]:
    """This rank's pieces (tensors/rank{R}.bin)."""
    files: dict[str, dict] = {}
    records: list[dict] = []
    name = rank_file(request.rank)
    box: list = []

    def write() -> None:
        writer = TensorWriter(request.tmp / "tensors", name, hash_file=False)
        box.append(writer)
        for piece_name, key, tensor, shape, piece_box, flat, copy in request.pieces:
            index = tuple(slice(a, b) for a, b in piece_box)
            writer.add(piece_name, key, tensor, shape, index, flat=flat, copy=copy)
        size, written = writer.finish()
        files[f"tensors/{name}.bin"] = fmt.FileRecord(bytes=size)
        records.extend(written)

    error = _attempt(write)
    if error is not None and box:
        box[0].abort()
    return files, records, error


def _finalize(request: SaveRequest, gathered: list) -> None:
    """Rank 0: index, trainer state, tokenizer and manifest, fsync, rename into place, move `latest`."""
    tmp, final, info = request.tmp, request.final, request.finalize
    files = {rel: entry for part, _, _ in gathered for rel, entry in part.items()}
    records = [record for _, part, _ in gathered for record in part]
    write_index(tmp / "tensors", records)
    files[f"tensors/{INDEX_FILE}"] = fmt.file_entry(tmp / "tensors" / INDEX_FILE)
    write_synced(tmp / fmt.TRAINER_FILE, json.dumps(info["trainer"], indent=1).encode())
    files[fmt.TRAINER_FILE] = fmt.file_entry(tmp / fmt.TRAINER_FILE)
    if info["tokenizer"] is not None:
        write_synced(tmp / TOKENIZER_FILE, info["tokenizer"])
        files[TOKENIZER_FILE] = fmt.file_entry(tmp / TOKENIZER_FILE)
    total = sum(entry.bytes for entry in files.values())
    manifest = dataclasses.replace(info["manifest"], pieces=len(records), bytes=total, files=files)
    fmt.write_manifest(tmp, manifest)
    fmt.publish(tmp, final)
    fmt.publish_latest(request.root, final.name)
    fmt.prune(request.root, request.keep, current=final.name)


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: Path,
    engine: Engine,
    topology: Topology,
    config: Config,
    weights_only: bool = False,
    prefetch: Prefetch | None = None,
) -> dict:
    """Loads weights (and, unless `weights_only`, optimizer state and loss scale) into the engine
    from a checkpoint written under any layout, by either engine; every rank calls this. Returns
    the stored trainer state, with `same_layout` and `read` (this rank's bytes read, its share,
    the index's bytes). The caller has checked the structure (checkpoint_candidates or
    format.read_manifest); a piece that does not match its checksum raises
    CorruptCheckpointError on every rank. Nothing random needs restoring: dropout is seeded by
    the step and the micro-batch (pangu.model.pangu_alpha.DropoutSeeds), so the RNG states older
    checkpoints carry are not read."""
    group = checkpoint_group() if dist.is_initialized() else None
    start = time.perf_counter()
    outcome: dict = {}
    try:
        outcome = _read_rank_share(Path(path), engine, topology, config, weights_only, prefetch)
        problem = None
    except (CorruptCheckpointError, OSError, ValueError, KeyError) as err:
        problem = ("corrupt", str(err) if isinstance(err, CheckpointError) else f"{path}: {type(err).__name__}: {err}")
    except CheckpointError as err:
        problem = ("refused", str(err))
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below
        problem = ("failed", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    problems = [problem]
    if group is not None and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem, group=group)
    found = [p for p in problems if p is not None]
    if found:
        kind, message = next((p for p in found if p[0] != "corrupt"), found[0])
        raise {"corrupt": CorruptCheckpointError, "refused": CheckpointError}.get(kind, RuntimeError)(message)
    engine.after_load(optimizer_state=not weights_only)
    if weights_only:
        return {}
    trainer = outcome["trainer"]
    engine.restore_optimizer_scalars(trainer["optimizer_scalars"])
    engine.restore_loss_scale(trainer["loss_scaler"])
    trainer["same_layout"] = outcome["same_layout"]
    trainer["read"] = dict(outcome["read"], seconds=time.perf_counter() - start)
    return trainer


def _read_rank_share(
    path: Path,
    engine: Engine,
    topology: Topology,
    config: Config,
    weights_only: bool,
    prefetch: Prefetch | None,
) -> dict:
    """Reads this rank's fragments into the engine's fp32 buffers, and (for a resume) the
    trainer state, checking every checksum. No collective."""
    manifest = fmt.read_manifest(path, verify=False)
    fmt.check_model_matches(manifest, config.model, path)
    same_layout = manifest.layout == _layout(topology)
    own = f"{rank_file(topology.rank)}.bin" if same_layout else None
    if prefetch is not None and prefetch.path == path:
        reader = prefetch.reader()
    else:
        reader = fmt.tensor_reader(path, manifest, prefer=own)
    if not weights_only:  # state the checkpoint fills need not be zeroed first
        engine.create_optimizer_state(zeros=False)
    buffers = engine.checkpoint_buffers(weights_only)
    share = 0
    try:
        for fragment in engine.fragments():
            name = fragment.name
            for key in buffers[fragment.buffer]:
                if key not in reader.keys(name):
                    raise CheckpointError(
                        f"checkpoint {path} has no {'weights' if key == 'weight' else 'optimizer state'} {key!r} "
                        f"for {name!r}: it was written with optim.name = "
                        f"{manifest.optimizer!r}, this run uses "
                        f"{config.optim.name!r}; resume with the same optimizer or start from its weights "
                        f"with train.init_from"
                    )
                target = fragment.view(buffers, key)
                reader.read_flat(name, key, fragment.box, fragment.flat, out=target)
                share += target.numel() * target.element_size()
    finally:
        reader.close()
    outcome = {
        "same_layout": same_layout,
        "step": manifest.step,
        "read": {"bytes": reader.bytes_read, "share_bytes": share, "index_bytes": reader.index_bytes},
    }
    if not weights_only:
        trainer = fmt.read_trainer_state(path, manifest)
        _check_scalars(trainer, len(engine.optimizer.param_groups), config, path / fmt.TRAINER_FILE)
        outcome["trainer"] = dataclasses.asdict(trainer)
    return outcome


def _check_scalars(trainer: fmt.TrainerFile, groups: int, config: Config, file: Path) -> None:
    """The optimizer scalars restore sets are those of this optimizer's param groups: its declared
    scalar state and a group's step count, nothing else (no per-element state, no learning rate)."""
    declared = set(registry.get(config.optim.name).scalar_state)
    if len(trainer.optimizer_scalars) != groups:
        problem = f"the scalars of {len(trainer.optimizer_scalars)} param groups, the optimizer has {groups}"
    elif any(set(s.state) - declared or set(s.group) - {"step"} for s in trainer.optimizer_scalars):
        problem = f"optimizer scalars other than {sorted(declared)} and a group's step"
    else:
        return
    raise CorruptCheckpointError(f"{file} is corrupt: it holds {problem}")
