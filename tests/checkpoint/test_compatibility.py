"""Checkpoints written by earlier code still load: tests/fixtures/checkpoint_v1 was written by the
code before the architecture refactor, at (dp, tp, pp) = (1, 2, 1) (see tests/fixtures/README.md),
in format 1. It loads as it is, and `pangu checkpoint upgrade` converts it to format 2, which
loads the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"
LOGITS = FIXTURE.parent / "checkpoint_v1_logits.npy"


def test_load_needs_no_process_group_and_gives_the_logits_it_gave_before():
    """pangu.load builds the network with plain torch layers: torch.distributed is never
    initialised, and the logits equal those the old (megatron-layer) model gave."""
    code = (
        "import numpy as np, torch, torch.distributed as dist, pangu\n"
        f"model, tokenizer = pangu.load({str(FIXTURE)!r})\n"
        "ids = torch.arange(16).view(1, 16) * 17 % 300\n"
        "with torch.no_grad():\n"
        "    logits = model(ids).numpy()\n"
        f"expected = np.load({str(LOGITS)!r})\n"
        "assert not dist.is_initialized()\n"
        "assert tokenizer is not None and tokenizer.vocab_size == 300\n"
        "print(float(np.abs(logits - expected).max()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-6


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    from pangu.cli import main

    out = tmp_path_factory.mktemp("upgrade") / "v2"
    assert main(["checkpoint", "upgrade", str(FIXTURE), str(out)]) == 0
    return out


def test_upgrade_writes_format_2_with_the_same_tensors(upgraded):
    import numpy as np

    import pangu
    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.store import TensorReader
    from pangu.cli import main

    manifest = fmt.read_manifest(upgraded)
    assert manifest.version == 2 and manifest.upgraded_from == 1 and manifest.step == 2
    assert not [rel for rel in manifest.files if rel.startswith("rng/")]  # pickles nothing reads: left behind
    assert main(["checkpoint", "verify", str(upgraded), "--quiet"]) == 0
    old, new = TensorReader(FIXTURE / "tensors"), TensorReader(upgraded / "tensors")
    assert old.names() == new.names()
    for name in old.names():
        assert old.keys(name) == new.keys(name) == {"weight", "m", "s"}
        for key in old.keys(name):
            assert torch.equal(old.read(name, key), new.read(name, key)), (name, key)
    model, tokenizer = pangu.load(upgraded)
    with torch.no_grad():
        logits = model(torch.arange(16).view(1, 16) * 17 % 300).numpy()
    assert np.abs(logits - np.load(LOGITS)).max() <= 1e-6 and tokenizer.vocab_size == 300


@pytest.mark.parametrize("which", ["format 1", "upgraded"])
def test_an_old_training_checkpoint_resumes_weights_and_optimizer_state(single_process, upgraded, which):
    """Loaded into a training engine at (1, 1, 1), the old tp=2 checkpoint's weights and S3
    state (and those of its upgraded copy) are what it stores, element for element."""
    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.store import TensorReader
    from pangu.checkpoint.training import load_checkpoint
    from pangu.config import config_from_dict
    from pangu.parallel.engine import build_engine
    from pangu.parallel.topology import init_distributed

    path = FIXTURE if which == "format 1" else upgraded
    manifest = fmt.read_manifest(path)
    assert manifest.version == (1 if which == "format 1" else 2)
    assert manifest.layout == fmt.Layout(dp=1, tp=2, pp=1)
    config = config_from_dict(manifest.config)
    config = config_from_dict({**config.to_dict(), "parallel": {**config.to_dict()["parallel"], "tp": 1}})
    topology = init_distributed(config.parallel)
    engine = build_engine(config, topology)
    trainer = load_checkpoint(path, engine, topology, config)
    assert trainer["step"] == 2 and not trainer["same_layout"]
    reader = TensorReader(FIXTURE / "tensors")
    buffers = engine.checkpoint_buffers()
    state_norm = 0.0
    fragments = engine.fragments()
    assert {f.name for f in fragments} == reader.names()
    for fragment in fragments:
        assert set(buffers[fragment.buffer]) == {"weight", "m", "s"}
        for key in buffers[fragment.buffer]:
            stored = reader.read_flat(fragment.name, key, fragment.box, fragment.flat)
            assert torch.equal(fragment.view(buffers, key), stored), (fragment.name, key)
            if key != "weight":
                state_norm += float(stored.norm())
    for name, param in engine.stages[0].named_parameters():  # the model's weights: the master weights
        assert torch.equal(param.detach(), reader.read(name)), name
    assert state_norm > 0  # two steps were taken: the state is not the zeros a fresh run starts with


def test_a_format_2_checkpoint_with_every_optimizers_keys_in_its_config_resumes(single_process):
    """tests/fixtures/checkpoint_v2_flat_optim was written before each optimizer's options moved
    to its registry entry: its stored optim section holds every optimizer's keys (sgd_si with
    si_other adamw, and S3's beta). Its config reads back, and its weights and AdamW state load
    into a training engine, element for element; the scale-invariant trunk has no state."""
    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.store import TensorReader
    from pangu.checkpoint.training import load_checkpoint
    from pangu.config import config_from_dict
    from pangu.parallel.engine import build_engine
    from pangu.parallel.topology import init_distributed

    path = FIXTURE.parent / "checkpoint_v2_flat_optim"
    manifest = fmt.read_manifest(path)
    assert manifest.version == 2 and manifest.config["optim"]["beta"] == 0.5
    config = config_from_dict(manifest.config)
    assert config.optim.options.si_other == "adamw" and config.optim.options.other.betas == (0.8, 0.9)
    topology = init_distributed(config.parallel)
    engine = build_engine(config, topology)
    trainer = load_checkpoint(path, engine, topology, config)
    assert trainer["step"] == 2 and trainer["same_layout"]
    reader = TensorReader(path / "tensors")
    buffers = engine.checkpoint_buffers()
    assert {tuple(k for k in part if k != "weight") for part in buffers} == {(), ("exp_avg", "exp_avg_sq")}
    for fragment in engine.fragments():
        for key in buffers[fragment.buffer]:
            stored = reader.read_flat(fragment.name, key, fragment.box, fragment.flat)
            assert torch.equal(fragment.view(buffers, key), stored), (fragment.name, key)
            assert key == "weight" or stored.abs().sum() > 0
