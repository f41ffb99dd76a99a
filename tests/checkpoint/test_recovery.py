"""Automatic recovery: launch/torchrun.sh restarts a worker group one of whose workers died, and
the run resumes from its newest checkpoint by itself, reaching an uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, losses, subprocess_env, tiny_overrides, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Imported by every Python process of the job (on PYTHONPATH): in the first attempt only
# (TORCHELASTIC_RESTART_COUNT 0), worker 1 is killed (SIGKILL) at step 3, after checkpoint 2.
KILL_WORKER_1_AT_STEP_3 = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import signal
    from pangu.pretrain.trainer import Trainer
    step = Trainer.train_step
    def train_step(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self)
    Trainer.train_step = train_step
"""


def test_a_killed_worker_is_restarted_and_the_run_finishes_by_itself(tiny_corpus, tmp_path):
    settings = ["model.dropout=0.0", "train.save_interval=2", "train.micro_batch_size=1"]
    plain = tmp_path / "pretrain.py"
    plain.write_text("import sys\nfrom pangu.cli import entry\nentry(['pretrain', *sys.argv[1:]])\n")
    reference = tmp_path / "reference"
    done = torchrun(plain, tiny_overrides(tiny_corpus, reference, *settings), 2)
    assert done.returncode == 0, done.stderr[-3000:]

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_WORKER_1_AT_STEP_3)
    out = tmp_path / "killed"
    env = dict(
        subprocess_env(),
        PYTHONPATH=f"{hooks}{os.pathsep}{REPO}",
        NPROC_PER_NODE="2",
        MAX_RESTARTS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    job = subprocess.Popen(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *tiny_overrides(tiny_corpus, out, *settings)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # torchrun and its workers: one process group, killed whole on a hang
    )
    try:
        _, stderr = job.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(f"the restarted job did not finish:\n{job.communicate()[1][-4000:]}")
    assert job.returncode == 0, stderr[-4000:]
    # torchrun saw it die, or rank 0 saw it go away first and failed naming it
    died = "failed (exitcode: -9) local_rank: 1" in stderr or "rank 1 went away" in stderr
    assert died and "resumed" in stderr, stderr[-4000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [2]
    assert losses(out) == losses(reference)
