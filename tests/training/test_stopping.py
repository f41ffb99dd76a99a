"""Stop means stop in every long phase of a run: a signal during validation or task scoring stops
every rank at the next batch (the step it finished is checkpointed), validation is at most one pass
over its set and says how far it is, and a rank that stops answering is named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pangu.checkpoint.training import latest_checkpoint
from tests.helpers import TASK_DATA, run_pretrain, tiny_overrides, torchrun

pytestmark = [pytest.mark.slow]

# Counts the engine's calls of `method` (saying each count: the process ends without atexit, see
# pangu.cli.entry) and sends this process SIGTERM at call `signal_at`.
SIGNAL_AT_CALL = """
import os, signal, sys
import pangu.pretrain.trainer as trainer
from pangu.parallel.native.engine import TorchEngine
trainer.PROGRESS_EVERY_S = 0.0
original = TorchEngine.{method}
calls = []
def counted(self, *args):
    calls.append(1)
    print(f"calls: {{len(calls)}}", file=sys.stderr, flush=True)
    if len(calls) > 100:
        raise SystemExit("{method} was called past one pass")
    if len(calls) == {signal_at}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args)
TorchEngine.{method} = counted
"""


def calls(err: str) -> int:
    """How many times the counted engine method was called."""
    return max((int(line.split()[1]) for line in err.splitlines() if line.startswith("calls: ")), default=0)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_during_validation_stops_at_the_next_batch_and_checkpoints_the_step(tiny_corpus, tmp_path):
    """train.eval_batches = 1000 asks for far more than the validation set holds: one pass is
    taken (said once), with a progress line per batch here. SIGTERM in the second batch of step 6's
    validation: the ranks agree before the third, the validation is cut short (not logged), step 6
    is checkpointed and the run stops."""
    from pangu.data.prepare import load_prepared

    one_pass = math.ceil(len(load_prepared(tiny_corpus, "valid", 32)[0]) / 8)
    assert one_pass >= 3
    out = tmp_path / "run"
    prelude = SIGNAL_AT_CALL.format(method="evaluate", signal_at=one_pass + 2)
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.steps=9", "train.eval_batches=1000"), prelude)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert err.count("train.eval_batches = 1000 is more than one pass over the") == 1
    assert f"validation takes {one_pass} global batches of 8" in err
    assert f"validation: batch {one_pass - 1} of {one_pass}" in err
    assert f"SIGTERM, during validation (batch 3 of {one_pass}): the validation of step 6 is cut short" in err
    assert calls(err) == one_pass + 2  # not one batch more
    logged = records(out)
    assert [r["step"] for r in logged if "val_loss" in r] == [3]
    assert max(r["step"] for r in logged if "loss" in r) == 6
    assert [r["step"] for r in logged if r.get("event") == "preempted"] == [6]
    assert latest_checkpoint(out).name == "step_00000006"


def test_sigterm_during_task_scoring_stops_before_the_next_call(tiny_corpus, tmp_path):
    """Two tasks scored at step 3's validation; SIGTERM during the first engine call: the second
    call is not made, the step's validation loss is logged but not its tasks, and step 3 is
    checkpointed."""
    out = tmp_path / "run"
    tasks = f"train.eval_tasks=[sentiment={TASK_DATA / 'sentiment.jsonl'}, text_ppl={TASK_DATA / 'text.txt'}]"
    prelude = SIGNAL_AT_CALL.format(method="token_losses", signal_at=1)
    result = run_pretrain(tiny_overrides(tiny_corpus, out, tasks, "train.eval_task_examples=8"), prelude)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the validation of step 3 is cut short (its tasks are not logged)" in result.stderr
    assert calls(result.stderr) == 1
    at_3 = [r for r in records(out) if r.get("step") == 3 and "loss" in r]
    assert len(at_3) == 1 and "val_loss" in at_3[0] and not [key for key in at_3[0] if key.startswith("task/")]
    assert [r["step"] for r in records(out) if r.get("event") == "preempted"] == [3]
    assert latest_checkpoint(out).name == "step_00000003"


def test_sigterm_during_start_up_stops_before_the_first_step_with_nothing_to_save(straight_run, tiny_corpus, tmp_path):
    """A resuming run gets SIGTERM while it reads its checkpoint: it stops before training a step,
    and writes no checkpoint (nothing changed since the one it read)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    prelude = (
        "import os, signal\nfrom pangu.checkpoint.saver import Checkpointer\n"
        "restore = Checkpointer.restore\n"
        "def signalled(self, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return restore(self, *args, **kwargs)\n"
        "Checkpointer.restore = signalled\n"
    )
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.steps=9"), prelude)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM during start-up: the run stops before its first step, with nothing to save" in result.stderr
    assert max(r["step"] for r in records(out) if "loss" in r) == 6
    assert [r for r in records(out) if r.get("event") == "preempted"][-1]["before_first_step"] is True
    assert latest_checkpoint(out).name == "step_00000006"


@pytest.mark.distributed
def test_a_rank_that_stops_answering_is_named(tiny_corpus, tmp_path):
    """Rank 1 hangs after step 2 (before the stop agreement every step ends with): rank 0 ends
    after parallel.timeout_minutes with one line naming rank 1 and where it did not come, exit
    status 1 (a launcher may restart it), not gloo's traceback."""
    script = tmp_path / "hangs.py"
    script.write_text(
        "import sys, time\nimport torch.distributed as dist\n"
        "from pangu.pretrain.metrics import MetricsLogger\n"
        "log = MetricsLogger.log\n"
        "def hang(self, record):\n"
        "    if dist.get_rank() == 1 and record.get('step') == 2:\n"
        "        time.sleep(40)\n"
        "    return log(self, record)\n"
        "MetricsLogger.log = hang\n"
        "from pangu.cli import main\nsys.exit(main(['pretrain', *sys.argv[1:]]))\n"
    )
    settings = ["parallel.timeout_minutes=0.3", "train.micro_batch_size=1", "model.dropout=0.0"]
    result = torchrun(script, tiny_overrides(tiny_corpus, tmp_path / "run", *settings), 2, timeout=300)
    assert result.returncode != 0
    named = (
        "pangu pretrain: error: rank 1 did not reach the stop agreement after step 2 within "
        "parallel.timeout_minutes = 0.3: look at its log"
    )
    assert any(line.startswith(named) for line in result.stderr.splitlines()), result.stderr[-3000:]
    assert "Timed out waiting" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The launchers: a user's error is not retried


@pytest.mark.distributed
def test_a_users_error_under_launch_torchrun_ends_at_once(tmp_path):
    """Every worker fails on a bad value (a prepared directory that does not exist: exit status
    2). torchrun would restart the workers MAX_RESTARTS times, each failing alike; launch/torchrun.sh
    ends after the first attempt, with status 2 and pangu's line last."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, subprocess_env

    env = dict(subprocess_env(), NPROC_PER_NODE="2", MAX_RESTARTS="3")
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    settings = ["--set", f"data.prepared_dir={tmp_path / 'nowhere'}", "--set", f"train.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(
        [str(REPO / "launch" / "torchrun.sh"), "--config", "tiny", *settings],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    workers = [line for line in done.stderr.splitlines() if line.startswith("pangu pretrain: error:")]
    assert len(workers) == 2 and "holds no prepared data" in workers[0]  # one attempt of two workers
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"launch/torchrun.sh: not restarted, a user's error (2 ranks): {workers[0]}"
    )
