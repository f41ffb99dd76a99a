"""Saving and loading a training checkpoint: every rank calls these (format: format.py).

Optimizer state partitioned by ZeRO is gathered one parameter at a time with DeepSpeed's
`safe_get_full_optimizer_state` (deepspeed_state.py), so a rank never holds more than one full
parameter; data-parallel rank 0 of each (pp, tp) coordinate writes that stage's slices.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from pangu.checkpoint import deepspeed_state as ds
from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import CheckpointError, TensorReader, TensorWriter, write_file_synced
from pangu.config import Config
from pangu.model import layout
from pangu.parallel.tensor_parallel import seed_rng_streams
from pangu.parallel.topology import Topology


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run (see format.find_intact), or None for a fresh run.
    In a distributed run rank 0 checks the files and tells the others."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [fmt.find_intact(run_dir) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return fmt.find_intact(run_dir)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    engine,
    names: dict[str, str],
    topology: Topology,
    config: Config,
    trainer_state: dict,
    tokenizer_path: Path | None,
) -> Path:
    """Writes checkpoint `step` (every rank calls this). A failure on any rank (a full disk, say)
    removes the partial checkpoint and raises CheckpointError on every rank; the previous
    checkpoint and the `latest` pointer are untouched."""
    root = fmt.checkpoint_root(run_dir)
    final = root / fmt.step_name(step)
    tmp = root / f".tmp_{final.name}"
    error = None
    if topology.rank == 0:
        error = _attempt(lambda: _make_tmp(tmp))
    error = _first_error(error)
    if error is None:
        files, error = _write_rank_files(tmp, engine, names, topology, config)
        gathered: list = [None] * topology.world_size
        dist.all_gather_object(gathered, (files, error))
        error = next((e for _, e in gathered if e), None)
        if topology.rank == 0 and error is None:
            all_files = {k: v for part, _ in gathered for k, v in part.items()}
            error = _attempt(
                lambda: _finalize(
                    root, tmp, final, step, all_files, config, topology, engine, trainer_state, tokenizer_path
                )
            )
        error = _first_error(error)
    if error is not None:
        if topology.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
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
    return None


def _first_error(error: str | None) -> str | None:
    """Rank 0's error, known to every rank."""
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _make_tmp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tensors").mkdir(parents=True)
    (tmp / "rng").mkdir()


def _write_rank_files(
    tmp: Path, engine, names: dict[str, str], topology: Topology, config: Config
) -> tuple[dict, str | None]:
    """This rank's tensors and RNG state. Keeps taking part in the data-parallel collectives
    after a write error, so that no rank is left waiting."""
    files: dict[str, dict] = {}
    error = None
    writer = (
        TensorWriter(tmp / "tensors", f"pp{topology.pp_rank}-tp{topology.tp_rank}") if topology.dp_rank == 0 else None
    )
    ds.link_optimizer_state(engine, config.optim)
    state_keys = ds.state_keys_by_param(engine, config.optim)
    table = layout.parameter_table(config.model)
    for pipe_name, param in engine.module.named_parameters():
        name = names[pipe_name]
        if name == layout.WORD_EMBEDDING_WEIGHT and not topology.is_first_stage:
            continue  # the head's copy of the tied embedding: the first stage writes it
        # Each call below is a collective over the data-parallel group: all dp ranks take part.
        pieces = {"weight": ds.safe_get_full_fp32_param(param)}
        pieces.update({key: ds.safe_get_full_optimizer_state(param, key) for key in state_keys[param]})
        spec = table[name]
        replica = topology.tp_rank != 0 and spec.split_dim is None
        if writer is not None and not replica:  # a parameter replicated across tp: tp rank 0 writes it
            index = spec.local_index(topology.tp_rank, topology.tp)
            error = _attempt(partial(_add_pieces, writer, name, pieces, spec.shape, index))
            if error is not None:
                writer.abort()
                writer = None
    if writer is not None:
        error = _attempt(lambda: files.update({f"tensors/{k}": v for k, v in writer.close().items()}))
    if error is None:
        rng_file = tmp / "rng" / f"rank{topology.rank:05d}.pt"
        error = _attempt(lambda: torch.save(_rng_state(), rng_file))
        if error is None:
            files[f"rng/{rng_file.name}"] = fmt.file_entry(rng_file)
    return files, error


def _add_pieces(writer: TensorWriter, name: str, pieces: dict, shape: tuple[int, ...], index) -> None:
    for key, tensor in pieces.items():
        writer.add(name, key, tensor, shape, index)


def _finalize(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    all_files: dict,
    config: Config,
    topology: Topology,
    engine,
    trainer_state: dict,
    tokenizer_path: Path | None,
) -> None:
    """Rank 0: trainer state, tokenizer and manifest, fsync, rename into place, move `latest`."""
    trainer = dict(
        trainer_state,
        optimizer_scalars=ds.optimizer_scalars(engine),
        loss_scaler=ds.loss_scaler_state(engine),
    )
    write_file_synced(tmp / "trainer.json", json.dumps(trainer, indent=1).encode())
    all_files["trainer.json"] = fmt.file_entry(tmp / "trainer.json")
    if tokenizer_path is not None:
        write_file_synced(tmp / "tokenizer.model", Path(tokenizer_path).read_bytes())
        all_files["tokenizer.model"] = fmt.file_entry(tmp / "tokenizer.model")
    fmt.write_manifest(
        tmp,
        {
            "kind": "training",
            "step": step,
            "model": fmt.model_fields(config.model),
            "config": config.to_dict(),
            "layout": {"dp": topology.dp, "tp": topology.tp, "pp": topology.pp},
            "tokenizer_fingerprint": trainer_state.get("tokenizer_fingerprint"),
            "files": all_files,
        },
    )
    fmt.publish(tmp, final)
    fmt.publish_latest(root, final.name)
    fmt.prune(root, config.train.keep_checkpoints)


def load_checkpoint(
    path: Path, engine, names: dict[str, str], topology: Topology, config: Config, weights_only: bool = False
) -> dict:
    """Loads weights (and, unless `weights_only`, optimizer state, loss scaler and RNGs) into the
    engine from a checkpoint written under any layout. Returns the stored trainer state.
    The caller has verified the files (latest_checkpoint does)."""
    manifest = fmt.read_manifest(path, verify=False)
    fmt.check_model_matches(manifest, config.model, path)
    reader = TensorReader(path / "tensors")
    if not weights_only:
        ds.link_optimizer_state(engine, config.optim)
    state_keys = ds.state_keys_by_param(engine, config.optim)
    table = layout.parameter_table(config.model)
    for pipe_name, param in engine.module.named_parameters():
        name = names[pipe_name]
        index = table[name].local_index(topology.tp_rank, topology.tp)
        weight = reader.read(name, "weight", index).float()
        with torch.no_grad():
            param.copy_(weight.to(param.dtype))
        ds.safe_set_full_fp32_param(param, weight.to(param.device))
        if weights_only:
            continue
        for key in state_keys[param]:
            if key not in reader.keys(name):
                raise CheckpointError(
                    f"checkpoint {path} has no optimizer state {key!r} for {name!r}: it was written with "
                    f"optim.name = {manifest['config']['optim']['name']!r}, this run uses "
                    f"{config.optim.name!r}; resume with the same optimizer or start from its weights "
                    f"with train.init_from"
                )
            ds.safe_set_full_optimizer_state(param, reader.read(name, key, index).to(param.device), key)
    if weights_only:
        return {}
    trainer = json.loads((path / "trainer.json").read_text())
    ds.restore_optimizer_scalars(engine, trainer["optimizer_scalars"])
    ds.restore_loss_scaler(engine, trainer["loss_scaler"])
    same_layout = manifest["layout"] == {"dp": topology.dp, "tp": topology.tp, "pp": topology.pp}
    rng_file = path / "rng" / f"rank{topology.rank:05d}.pt"
    if same_layout and rng_file.is_file():
        _restore_rng_state(torch.load(rng_file, weights_only=False))
    else:
        # Dropout streams belong to ranks; under a new layout they are re-derived from the seed
        # and the step, so the run stays deterministic (but its dropout masks differ).
        seed_rng_streams(config.train.seed + 7919 * manifest["step"])
    trainer["same_layout"] = same_layout
    return trainer


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": deepspeed.checkpointing.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    deepspeed.checkpointing.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
