"""train.async_save: the state is copied to host memory and written in the background while
training goes on; the losses and checkpoints are those of a synchronous save, and a process
killed during the background write leaves the previous checkpoint in use."""

from __future__ import annotations

import json

import pytest
import torch

from pangu.checkpoint.training import latest_checkpoint
from tests.helpers import STEPS, losses, run_pretrain, stored_tensors, tiny_overrides

pytestmark = [pytest.mark.slow]


def events(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_async_save_trains_and_resumes_like_sync_save(tiny_corpus, straight_run, tmp_path):
    out = tmp_path / "async"
    for stop_at in (3, 0):  # stopped at 3 with the checkpoint of step 2 (and 3) written in the background
        done = run_pretrain(
            tiny_overrides(
                tiny_corpus, out, "train.async_save=true", "train.save_interval=2", f"train.stop_at={stop_at}"
            )
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == losses(straight_run)
    resumed, straight = stored_tensors(out), stored_tensors(straight_run)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[key], tensor) for key, tensor in straight.items())
    saves = [e for e in events(out) if e.get("event") == "checkpoint"]
    assert [e["step"] for e in saves] == [2, 3, 4, 6] and all(e["async"] for e in saves)
    assert latest_checkpoint(out).name == f"step_{STEPS:08d}"


def test_kill_9_during_the_background_write_keeps_the_previous_checkpoint(tiny_corpus, straight_run, tmp_path):
    """The writer of checkpoint 4 stalls until training has logged step 5 (so the write is in
    the background), then the process is killed: checkpoint 2 stays the latest, and the next run
    resumes from it and reaches the uninterrupted run's losses."""
    out = tmp_path / "killed"
    stall_then_die = (
        "import os, signal, time\nfrom pathlib import Path\nfrom pangu.checkpoint.store import TensorWriter\n"
        "add = TensorWriter.add\n"
        "def add_then_die(self, *args, **kwargs):\n"
        "    add(self, *args, **kwargs)\n"
        "    if 'step_00000004' in str(self.bin_path) and len(self._entries) == 5:\n"
        f"        metrics = Path({str(out)!r}) / 'metrics.jsonl'\n"
        "        while '\"step\": 5,' not in metrics.read_text():\n"
        "            time.sleep(0.05)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "TensorWriter.add = add_then_die\n"
    )
    settings = ("train.async_save=true", "train.save_interval=2")
    killed = run_pretrain(tiny_overrides(tiny_corpus, out, *settings), prelude=stall_then_die)
    assert killed.returncode == -9
    assert 5 in losses(out)  # training went on while checkpoint 4 was being written
    assert latest_checkpoint(out).name == "step_00000002"
    assert (out / "checkpoints" / ".tmp_step_00000004").is_dir()
    resumed = run_pretrain(tiny_overrides(tiny_corpus, out, *settings))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in events(out) if e.get("event") == "resumed"] == [2]
    assert losses(out) == losses(straight_run)
    assert not (out / "checkpoints" / ".tmp_step_00000004").exists()
