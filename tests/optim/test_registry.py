"""One place per optimizer: a spec registered from outside pangu trains, checkpoints and resumes
under any layout, and the config, planner and checkpoint code ask the spec."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pangu.checkpoint.training import latest_checkpoint
from pangu.config import load_config
from pangu.optim import registry
from pangu.schema import ConfigError
from tests.helpers import PROBES, losses, stored_tensors, subprocess_env, tiny_overrides, torchrun

PLUGIN = "tests.optim.momentum_sgd_spec"
RUN_CLI = str(PROBES / "run_cli.py")


def test_unknown_optimizer_is_a_config_error_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"optim.name = 'adamm' is not allowed: expected one of 's3', 'adamw'"):
        load_config(None, ["optim.name=adamm"])


def test_fused_auto_means_fused_on_gpus_only():
    import torch

    assert registry.fused(load_config(None, []).optim) is torch.cuda.is_available()
    assert registry.fused(load_config(None, ["optim.fused=true"]).optim) is True
    with pytest.raises(ConfigError, match="optim.fused"):
        load_config(None, ["optim.fused=sometimes"])


def test_the_planner_counts_the_state_the_spec_declares():
    import tests.optim.momentum_sgd_spec  # noqa: F401
    from pangu.parallel.memory_model import stage_memory
    from pangu.parallel.planner import Layout

    def state_bytes(name: str) -> int:
        config = load_config(None, [f"optim.name={name}", "model.vocab_size=1000"])
        return stage_memory(config, Layout(1, 1, 1, "none", 1, 8), 0).optimizer_state

    assert state_bytes("momentum_sgd") * 2 == state_bytes("s3") == state_bytes("adamw") > 0


def test_a_registered_optimizer_brings_its_own_options():
    """momentum_sgd's `optim.momentum`, declared in its own file only: set like any key, checked,
    handed to the optimizer, stored flat, and refused under another optimizer (and vice versa)."""
    import torch

    import tests.optim.momentum_sgd_spec  # noqa: F401

    config = load_config(None, ["optim.name=momentum_sgd", "optim.momentum=0.5"])
    weight = [("blocks.0.mlp.dense_h_to_4h.weight", torch.nn.Parameter(torch.ones(2, 2)))]
    assert registry.build_optimizer(config.optim, weight, no_decay=[]).defaults["momentum"] == 0.5
    assert config.to_dict()["optim"]["momentum"] == 0.5
    with pytest.raises(ConfigError, match=r"optim.momentum = 1.5 is not allowed: expected in \[0, 1\)"):
        load_config(None, ["optim.name=momentum_sgd", "optim.momentum=1.5"])
    with pytest.raises(ConfigError, match=r"'optim.beta' for optim.name = 'momentum_sgd' .* grad_clip, momentum$"):
        load_config(None, ["optim.name=momentum_sgd", "optim.beta=0.9"])
    with pytest.raises(ConfigError, match=r"'optim.momentum' for optim.name = 's3' \(an option of 'momentum_sgd'"):
        load_config(None, ["optim.momentum=0.5"])


def _pangu(args: list[str], world: int = 1) -> subprocess.CompletedProcess:
    """`pangu pretrain ARGS` with the test optimizer registered, in `world` processes."""
    command = [PLUGIN, "pretrain", *args]
    if world > 1:
        return torchrun(RUN_CLI, command, world)
    return subprocess.run(
        [sys.executable, RUN_CLI, *command], capture_output=True, text=True, env=subprocess_env(), timeout=600
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_a_registered_optimizer_trains_checkpoints_and_resumes(tiny_corpus, tmp_path):
    """momentum_sgd, registered by a test module, with its own option set from --set: 4 steps
    straight at (1, 1, 1); stopped at step 2 and resumed at (1, 1, 1) (bitwise the same) and at
    (2, 1, 1) (the same to float rounding); its momentum buffers and its option are in the
    checkpoint."""
    steps = [
        "train.steps=4",
        "optim.name=momentum_sgd",
        "optim.momentum=0.8",
        "optim.lr=0.05",
        "optim.warmup_steps=1",
        "model.dropout=0.0",
    ]
    straight = tmp_path / "straight"
    assert _pangu(tiny_overrides(tiny_corpus, straight, *steps)).returncode == 0
    for world, out in ((1, tmp_path / "resumed"), (2, tmp_path / "resumed_dp2")):
        for stop_at in (2, 0):
            done = _pangu(tiny_overrides(tiny_corpus, out, *steps, f"train.stop_at={stop_at}"), world)
            assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "resumed") == losses(straight)
    dp2, reference = losses(tmp_path / "resumed_dp2"), losses(straight)
    assert dp2.keys() == reference.keys() == {1, 2, 3, 4}
    for step, (loss, grad_norm) in reference.items():
        assert dp2[step][0] == pytest.approx(loss, rel=1e-5) and dp2[step][1] == pytest.approx(grad_norm, rel=1e-4)
    manifest = json.loads((latest_checkpoint(tmp_path / "resumed") / "manifest.json").read_text())
    assert manifest["config"]["optim"]["momentum"] == 0.8
    tensors = stored_tensors(straight)
    assert {key for _, key in tensors} == {"weight", "momentum_buffer"}
    assert all(float(t.abs().sum()) > 0 for (name, key), t in tensors.items() if key == "momentum_buffer")
