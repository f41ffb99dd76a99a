"""Every way a checkpoint reaches a training engine fills partitions that are not host memory, as
on a GPU: a resume on the layout that wrote it (read ahead), the fallback past a damaged checkpoint
and the spike guard's rollback (read on demand), train.init_from and the evaluation engine (weights
only, from exact pieces and from pieces of another layout). And what a checkpoint holds besides
tensors runs no code and ends no run in a traceback: RNG files of older checkpoints are not read
at all, and a damaged trainer state makes the checkpoint damaged: the run falls back to an older
one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xxhash

from pangu.checkpoint.saver import Checkpointer
from pangu.checkpoint.store import TensorReader
from pangu.checkpoint.training import latest_checkpoint
from tests.helpers import DeviceTensor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"  # format 1, (1, 2, 1)


@pytest.fixture(scope="module")
def trained(single_process, tmp_path_factory):
    """A (1, 1, 1) engine holding the fixture's state, a format-2 copy of the fixture written whole
    (its pieces match the engine's fragments exactly) and a checkpoint the engine saved itself."""
    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.training import load_checkpoint
    from pangu.cli import main
    from pangu.config import config_from_dict
    from pangu.parallel.engine import build_engine
    from pangu.parallel.topology import init_distributed

    stored = json.loads((FIXTURE / "manifest.json").read_text())["config"]
    config = config_from_dict({**stored, "parallel": {**stored["parallel"], "tp": 1}})
    topology = init_distributed(config.parallel)
    engine = build_engine(config, topology)
    root = tmp_path_factory.mktemp("load-paths")
    assert main(["checkpoint", "upgrade", str(FIXTURE), str(root / "whole")]) == 0
    load_checkpoint(fmt.resolve(root / "whole"), engine, topology, config)
    state = {"step": 2, "sampler": {"seed": 1234, "consumed_samples": 8, "skipped_ranges": []}}
    Checkpointer(root / "run", config, topology).save(2, engine, state, None)
    return SimpleNamespace(
        engine=engine,
        topology=topology,
        config=config,
        root=root,
        whole=root / "whole",
        saved=latest_checkpoint(root / "run"),
    )


@pytest.fixture
def on_device(trained, monkeypatch):
    """The engine's fp32 buffers handed to the checkpoint code as device tensors (views of the
    same memory), after filling them with NaN: what a load leaves there, it wrote."""
    buffers = trained.engine.checkpoint_buffers
    for part in buffers():
        for tensor in part.values():
            tensor.fill_(math.nan)

    def device_buffers(weights_only=False):
        return [{key: t.as_subclass(DeviceTensor) for key, t in part.items()} for part in buffers(weights_only)]

    monkeypatch.setattr(trained.engine, "checkpoint_buffers", device_buffers)
    return trained


def assert_engine_holds(trained, checkpoint: Path, keys: tuple[str, ...]) -> None:
    reader = TensorReader(checkpoint / "tensors")
    buffers = type(trained.engine).checkpoint_buffers(trained.engine)  # the engine's own, not the test's view
    for fragment in trained.engine.fragments():
        for key in ("weight", *keys):
            stored = reader.read_flat(fragment.name, key, fragment.box, fragment.flat)
            assert torch.equal(fragment.view(buffers, key), stored), (fragment.name, key)


@pytest.mark.parametrize("source", ["whole", "fixture"], ids=["exact pieces", "pieces of another layout"])
def test_init_from_reads_weights_into_device_partitions(on_device, source):
    """train.init_from (and the evaluation engine: the same weights-only load)."""
    path = on_device.whole if source == "whole" else FIXTURE
    checkpoints = Checkpointer(on_device.root / "init", on_device.config, on_device.topology)
    checkpoints.load_weights(path, on_device.engine)
    assert_engine_holds(on_device, path, keys=())


def test_a_resume_read_ahead_fills_device_partitions(on_device):
    checkpoints = Checkpointer(on_device.saved.parents[1], on_device.config, on_device.topology)
    checkpoints.prefetch(on_device.saved)
    path, state = checkpoints.restore(on_device.engine, [on_device.saved])
    assert path == on_device.saved and state["same_layout"] and state["read"]["bytes"] > 0
    assert_engine_holds(on_device, on_device.saved, keys=("m", "s"))


def damaged_copy(trained, step: int, damage) -> Path:
    """A copy of the saved checkpoint as a newer one, damaged by `damage(directory, manifest)`;
    the manifest then lists every file with its size and checksum, as a forger would."""
    copy = trained.saved.with_name(f"step_{step:08d}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(trained.saved, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    damage(copy, manifest)
    for rel, info in manifest["files"].items():
        if "xxh3" in info:
            data = (copy / rel).read_bytes()
            manifest["files"][rel] = {"bytes": len(data), "xxh3": xxhash.xxh3_64_intdigest(data)}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def flip_a_byte(directory: Path, manifest: dict) -> None:
    with open(directory / "tensors" / "rank00000.bin", "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0x01]))


def test_the_fallback_and_the_rollback_read_on_demand_into_device_partitions(on_device):
    """The spike guard's rollback and the fallback past a corrupt checkpoint both go through
    Checkpointer.restore without a read-ahead."""
    corrupt = damaged_copy(on_device, 4, flip_a_byte)
    checkpoints = Checkpointer(on_device.saved.parents[1], on_device.config, on_device.topology)
    with pytest.warns(UserWarning, match=r"rank00000.bin is corrupt.*falling back to step_00000002"):
        path, _ = checkpoints.restore(on_device.engine, [corrupt, on_device.saved])
    assert path == on_device.saved
    assert_engine_holds(on_device, on_device.saved, keys=("m", "s"))


class RunsCode:
    """Unpickled, it creates the file `marker`: what a hostile RNG file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_an_rng_file_is_never_unpickled(trained, tmp_path):
    """Checkpoints no longer carry RNG states (dropout is seeded by the step and the micro-batch),
    and the rng/rank{R}.pt files of older ones are not read: a hostile one runs no code."""
    marker = tmp_path / "code-ran"

    def hostile_rng(directory: Path, manifest: dict) -> None:
        for rel in [rel for rel in manifest["files"] if rel.startswith("rng/")]:
            (directory / rel).unlink()
            del manifest["files"][rel]
        (directory / "rng").mkdir(exist_ok=True)  # as an older checkpoint holds it
        torch.save({"torch": RunsCode(marker), "tracker": {}}, directory / "rng" / "rank00000.pt")
        manifest["files"]["rng/rank00000.pt"] = {"xxh3": 0}

    hostile = damaged_copy(trained, 6, hostile_rng)
    checkpoints = Checkpointer(trained.saved.parents[1], trained.config, trained.topology)
    path, _ = checkpoints.restore(trained.engine, [hostile, trained.saved])
    assert path == hostile and not marker.exists()


@pytest.mark.parametrize(
    "change",
    [
        {"step": "two"},
        {"sampler": None},
        {"optimizer_scalars": []},
        {"loss_scaler": {"cur_scale": "big"}},
        {"optimizer_scalars": [{"state": {"m": 0.0}, "group": {}}] * 2},
        {"optimizer_scalars": [{"state": {}, "group": {"initial_lr": 5.0}}] * 2},
    ],
    ids=[
        "step not a number",
        "no sampler",
        "scalars of no group",
        "a scalar not a number",
        "a scalar over per-element state",
        "a learning rate",
    ],
)
def test_a_damaged_trainer_state_falls_back_without_a_traceback(trained, change):
    def damaged_trainer(directory: Path, manifest: dict) -> None:
        trainer = json.loads((directory / "trainer.json").read_text())
        (directory / "trainer.json").write_text(json.dumps({**trainer, **change}))

    damaged = damaged_copy(trained, 8, damaged_trainer)
    checkpoints = Checkpointer(trained.saved.parents[1], trained.config, trained.topology)
    with pytest.warns(UserWarning, match=r"trainer.json is corrupt.*falling back to step_00000002"):
        path, state = checkpoints.restore(trained.engine, [damaged, trained.saved])
    assert path == trained.saved and state["step"] == 2


def test_optimizer_state_is_made_and_restored_on_the_partitions_device():
    """A fused optimizer on a GPU needs its step counts there: the state pangu creates before the
    first step, and the scalars a checkpoint restores, live where the partition does (here the
    meta device stands for a GPU)."""
    from collections import defaultdict

    from pangu.config import OptimConfig
    from pangu.parallel.deepspeed import state as ds

    flat = torch.empty(10, device="meta")
    base = SimpleNamespace(param_groups=[{"params": [flat], "name": "decay"}], state=defaultdict(dict))
    engine = SimpleNamespace(
        optimizer=SimpleNamespace(optimizer=base, _lazy_init_hp_params_optimizer_state=lambda: None)
    )
    ds.link_optimizer_state(engine, SimpleNamespace(optim=OptimConfig(name="adamw")))
    assert sorted(base.state[flat]) == ["exp_avg", "exp_avg_sq", "step"]
    assert all(tensor.is_meta for tensor in base.state[flat].values())
    ds.restore_optimizer_scalars(engine, [{"state": {"step": 3.0}, "group": {"step": 3}}])
    assert base.state[flat]["step"].is_meta and base.param_groups[0]["step"] == 3


def test_init_from_is_checked_before_the_engine_is_built(trained, tmp_path):
    """The trainer asks for train.init_from's checkpoint before it builds the engine: one of
    another shape, or with a manifest of an impossible model, stops the run there."""
    from pangu.checkpoint.store import CheckpointError, CorruptCheckpointError
    from pangu.checkpoint.weights import write_weights
    from pangu.config import ModelConfig
    from pangu.model import declaration

    checkpoints = Checkpointer(tmp_path / "run", trained.config, trained.topology)
    other = ModelConfig(num_layers=2, hidden_size=64, num_heads=2, vocab_size=300, seq_length=16)
    source = write_weights(
        tmp_path / "other", other, [(p.name, torch.zeros(p.shape)) for p in declaration.parameters(other)]
    )
    with pytest.raises(CheckpointError, match="written for model.hidden_size = 64 but the config has 32"):
        checkpoints.weights_source(source)
    manifest = json.loads((source / "manifest.json").read_text())
    (source / "manifest.json").write_text(json.dumps({**manifest, "model": {**manifest["model"], "num_heads": 0}}))
    with pytest.raises(CorruptCheckpointError, match="model.num_heads = 0 is not allowed"):
        checkpoints.weights_source(source)
    assert checkpoints.weights_source(trained.whole) == trained.whole
