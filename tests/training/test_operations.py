"""Surviving operations: non-finite gradients, loss spikes, torn checkpoints, full disks, and
hostile input that must fail before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pangu.checkpoint.store import TensorReader
from pangu.checkpoint.training import latest_checkpoint
from tests.helpers import STEPS, losses, run_pretrain, tiny_overrides, torchrun

pytestmark = [pytest.mark.slow]


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader(checkpoint / "tensors")
    return {name: reader.read(name) for name in reader.names()}


def test_nan_gradient_skips_the_update_and_training_goes_on(tiny_corpus, tmp_path):
    out = tmp_path / "nan"
    nan_in_step_3 = (
        "from pangu.pretrain.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "def train_step(self):\n"
        "    hooks = []\n"
        "    if self.step == 2:\n"
        "        param = next(self.engine.stages[0].parameters())\n"
        "        hooks.append(param.register_hook(lambda g: g * float('nan')))\n"
        "    record = step(self)\n"
        "    for hook in hooks:\n"
        "        hook.remove()\n"
        "    return record\n"
        "Trainer.train_step = train_step\n"
    )
    result = run_pretrain(
        tiny_overrides(tiny_corpus, out, "train.save_interval=1", f"train.keep_checkpoints={STEPS}"),
        prelude=nan_in_step_3,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["step"]: r for r in events(out) if "loss" in r}
    assert records[3]["skipped"] and not records[2]["skipped"] and not records[4]["skipped"]
    root = out / "checkpoints"
    before, after = weights(root / "step_00000002"), weights(root / "step_00000003")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not all(torch.equal(after[name], w) for name, w in weights(root / "step_00000004").items())
    assert all(r["loss"] == r["loss"] for r in records.values())  # finite losses throughout


def test_loss_spike_rolls_back_and_skips_the_data(tiny_corpus, tmp_path):
    out = tmp_path / "spike"
    fake_spike = (
        "from pangu.pretrain.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "seen = set()\n"
        "def train_step(self):\n"
        "    record = step(self)\n"
        "    if record['step'] in (5, 6) and record['step'] not in seen:\n"
        "        seen.add(record['step'])\n"
        "        record['loss'] *= 10\n"
        "    return record\n"
        "Trainer.train_step = train_step\n"
    )
    guard = [
        "train.spike_guard.enabled=true",
        "train.spike_guard.window=3",
        "train.spike_guard.consecutive=2",
        "train.save_interval=2",
        f"train.steps={STEPS + 2}",
        "optim.warmup_steps=2",
    ]
    result = run_pretrain(tiny_overrides(tiny_corpus, out, *guard), prelude=fake_spike)
    assert result.returncode == 0, result.stderr[-3000:]
    rollback = [e for e in events(out) if e.get("event") == "rollback"]
    assert rollback == [
        {
            "step": 4,
            "event": "rollback",
            "spike_step": 6,
            "checkpoint": "step_00000004",
            "skipped_samples": [32, 48],
            "rollbacks": 1,
        }
    ]
    final = json.loads((latest_checkpoint(out) / "trainer.json").read_text())
    assert final["step"] == STEPS + 2 and final["sampler"]["skipped_ranges"] == [[32, 48]]
    assert final["sampler"]["consumed_samples"] == 8 * (STEPS + 2) + 16  # the skipped batches are not reused

    capped = tmp_path / "capped"
    result = run_pretrain(
        tiny_overrides(tiny_corpus, capped, *guard, "train.spike_guard.max_rollbacks=0"), prelude=fake_spike
    )
    assert result.returncode == 3 and "max_rollbacks = 0" in result.stderr


def test_torn_latest_checkpoint_falls_back_to_the_previous_one(tiny_corpus, straight_run, tmp_path):
    out = tmp_path / "torn"
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2", "train.stop_at=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    shard = next((out / "checkpoints" / "step_00000004" / "tensors").glob("*.bin"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step_00000004.*using step_00000002"):
        assert latest_checkpoint(out).name == "step_00000002"
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out) == losses(straight_run)


def test_a_lost_latest_pointer_resumes_from_the_newest_checkpoint(tiny_corpus, straight_run, tmp_path):
    out = tmp_path / "no-pointer"
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2", "train.stop_at=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "checkpoints" / "latest").unlink()
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latest is missing; resuming from step_00000004" in result.stderr
    assert losses(out) == losses(straight_run)  # not restarted from step 0, and nothing pruned away


def test_unusable_checkpoints_stop_the_run_unless_it_is_told_to_restart(tiny_corpus, straight_run, tmp_path):
    out = tmp_path / "unusable"
    shutil.copytree(straight_run, out)
    for manifest in (out / "checkpoints").glob("step_*/manifest.json"):
        manifest.write_bytes(os.urandom(512))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".pangu.lock"}
    result = run_pretrain(tiny_overrides(tiny_corpus, out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no intact checkpoint" in result.stderr and "set train.restart=true" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".pangu.lock"} == before

    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.restart=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    aside = out / "checkpoints.set-aside-1"
    old = out / "checkpoints"
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == {
        Path("metrics.jsonl"): before[out / "metrics.jsonl"],
        **{p.relative_to(old): data for p, data in before.items() if p.is_relative_to(old)},
    }
    assert losses(out) == losses(straight_run)  # trained again from step 0


def test_full_disk_during_save_keeps_the_previous_checkpoint(tiny_corpus, tmp_path):
    out = tmp_path / "full"
    disk_full_at_step_4 = (
        "import errno\nfrom pangu.checkpoint.store import TensorWriter\n"
        "add = TensorWriter.add\n"
        "def full(self, *args, **kwargs):\n"
        "    if 'step_00000004' in str(self.bin_path):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(self.bin_path))\n"
        "    return add(self, *args, **kwargs)\n"
        "TensorWriter.add = full\n"
    )
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2"), prelude=disk_full_at_step_4)
    assert result.returncode == 2
    assert "No space left on device" in result.stderr and "step_00000002) is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert latest_checkpoint(out).name == "step_00000002"
    assert not list((out / "checkpoints").glob(".tmp_*"))


# ---------------------------------------------------------------------------------------------
# Hostile input: a clear error before any training step


def test_checkpoint_of_another_model_shape_is_refused(tiny_corpus, straight_run, tmp_path):
    """...and the run directory is left as it was: not even config.yaml is rewritten."""
    out = tmp_path / "other-shape"
    shutil.copytree(straight_run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "model.hidden_size=32"))
    assert result.returncode == 2
    assert "model.hidden_size = 64 but the config has 32" in result.stderr and "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".pangu.lock"}
    assert after == {p: data for p, data in before.items() if p.name != ".pangu.lock"}
    assert "set train.restart=true" in result.stderr

    # told to restart: the engine built to receive the checkpoint is rebuilt with initial weights
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "model.hidden_size=32", "train.restart=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.restart" in result.stderr and (out / "checkpoints.set-aside-1" / "latest").is_file()
    assert sorted(losses(out)) == list(range(1, STEPS + 1))


def test_a_global_batch_larger_than_the_training_set_is_refused(tiny_corpus, tmp_path):
    out = tmp_path / "huge-batch"
    result = run_pretrain(
        tiny_overrides(tiny_corpus, out, "train.micro_batch_size=1", "train.global_batch_size=10000000")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.global_batch_size = 10000000 is more than the" in result.stderr
    assert not out.exists()


def test_a_run_directory_inside_the_prepared_directory_is_refused(tiny_corpus, tmp_path):
    result = run_pretrain(tiny_overrides(tiny_corpus, tiny_corpus / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is inside data.prepared_dir" in result.stderr and not (tiny_corpus / "run").exists()


def test_unwritable_output_directory_is_refused(tiny_corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_pretrain(tiny_overrides(tiny_corpus, blocker / "run"))
    assert result.returncode == 2 and "train.output_dir" in result.stderr and "not writable" in result.stderr


@pytest.mark.distributed
def test_world_size_that_does_not_fit_the_layout_is_refused(tiny_corpus, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        "-m",
        "pangu",
        "pretrain",
        *tiny_overrides(tiny_corpus, tmp_path / "run", "parallel.tp=2"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode != 0
    assert "world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1" in result.stderr


@pytest.mark.distributed
def test_kill_9_of_a_rank_while_checkpointing(tiny_corpus, tmp_path):
    """Two data-parallel ranks; rank 0 is killed (SIGKILL) halfway through writing checkpoint 4.
    The restarted job resumes from checkpoint 2 and reaches the uninterrupted run's losses."""
    plain = tmp_path / "pretrain.py"
    plain.write_text("import sys\nfrom pangu.cli import entry\nentry(['pretrain', *sys.argv[1:]])\n")
    killer = tmp_path / "killed.py"
    killer.write_text(
        "import os, signal, sys\nimport torch.distributed as dist\n"
        "from pangu.checkpoint.store import TensorWriter\n"
        "add = TensorWriter.add\n"
        "def add_then_die(self, *args, **kwargs):\n"
        "    add(self, *args, **kwargs)\n"
        "    if 'step_00000004' in str(self.bin_path) and len(self._entries) == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "TensorWriter.add = add_then_die\n" + plain.read_text()
    )
    settings = ["model.dropout=0.0", "train.save_interval=2", "train.micro_batch_size=1"]
    reference = tmp_path / "reference"
    assert torchrun(plain, tiny_overrides(tiny_corpus, reference, *settings), 2).returncode == 0
    out = tmp_path / "killed"
    crashed = torchrun(killer, tiny_overrides(tiny_corpus, out, *settings), 2)
    assert crashed.returncode != 0
    assert latest_checkpoint(out).name == "step_00000002"
    assert (out / "checkpoints" / ".tmp_step_00000004").exists()  # the torn one, never published
    resumed = torchrun(plain, tiny_overrides(tiny_corpus, out, *settings), 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(reference)
    assert not (out / "checkpoints" / ".tmp_step_00000004").exists()


def test_a_second_run_on_the_same_directory_is_refused(tiny_corpus, tmp_path):
    """While a run holds train.output_dir, another one stops at once naming the holder and changes
    nothing; once the first is killed (its lock dies with it) the directory can be used again."""
    import subprocess
    import sys
    import time

    from tests.helpers import subprocess_env

    out = tmp_path / "shared"
    paused = (
        "import time\nfrom pangu.pretrain.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "def train_step(self):\n"
        "    if self.step == 1:\n"
        "        open(self.output_dir / 'paused', 'w').close()\n"
        "        time.sleep(600)\n"
        "    return step(self)\n"
        "Trainer.train_step = train_step\n"
        "import sys\nfrom pangu.cli import entry\nentry(['pretrain', *sys.argv[1:]])"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", paused, *tiny_overrides(tiny_corpus, out)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (out / "paused").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        second = run_pretrain(tiny_overrides(tiny_corpus, out))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "is in use by another run (host " in second.stderr and f"pid {first.pid})" in second.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        first.kill()
        first.wait()
    third = run_pretrain(tiny_overrides(tiny_corpus, out, "train.steps=1", "optim.warmup_steps=1"))
    assert third.returncode == 0, third.stderr[-3000:]
