"""launch/slurm.sbatch on a real Slurm cluster (tests/training/slurm_cluster.py: slurmctld, two slurmd as two
nodes, munged, all on this machine): a 2-node x 2-process job trains the tiny model to the end,
and the same job preempted mid-run requeues itself, resumes from its checkpoint and reaches the
same losses. Skipped, with the reason, where Slurm is not installed and cannot be installed."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, tiny_overrides
from tests.training.slurm_cluster import SlurmCluster, SlurmError, ensure_slurm

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.slurm]

ROOT = REPO
SBATCH = ROOT / "launch" / "slurm.sbatch"
STEPS = 12
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit(cluster: SlurmCluster, corpus: Path, out: Path, env: dict | None = None) -> int:
    """sbatch --nodes=2 launch/slurm.sbatch --config ... --set ...: dp = 4 (2 nodes x 2 processes)."""
    out.mkdir(parents=True)
    args = tiny_overrides(corpus, out, f"train.steps={STEPS}", "model.dropout=0.0", "train.global_batch_size=128")
    job_env = dict(
        cluster.env,
        PANGU_NPROC_PER_NODE="2",
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **(env or {}),
    )
    return cluster.sbatch(["--nodes=2", f"--output={out / 'slurm-%j.out'}", str(SBATCH), *args], env=job_env, cwd=ROOT)


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def wait_until_ended(cluster: SlurmCluster, job: int, out: Path, timeout: float = 600) -> list[dict]:
    """The job's completion records (one per run) once a run ended for good (not requeued)."""

    def ended():
        runs = cluster.completions(job)
        return runs if runs and runs[-1]["JobState"] in ENDED else None

    try:
        return cluster.wait_for(ended, timeout, f"job {job} to end", interval=1)
    except SlurmError as err:
        raise AssertionError(f"{err}\n--- job output\n{job_output(out, job)[-5000:]}") from None


def job_output(out: Path, job: int) -> str:
    path = out / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    start = time.monotonic()
    job = submit(cluster, tiny_corpus, out)
    runs = wait_until_ended(cluster, job, out)
    print(f"uninterrupted job: {time.monotonic() - start:.0f} s")
    return job, runs, out


def test_two_node_job_trains_to_the_end(uninterrupted):
    job, runs, out = uninterrupted
    assert [run["JobState"] for run in runs] == ["COMPLETED"], job_output(out, job)[-5000:]
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    text = job_output(out, job)
    assert "(dp, tp, pp) = (4, 1, 1)" in text
    assert "requeueing" not in text and f"job {job}, run 2," not in text


def test_preempted_job_requeues_and_resumes_exactly(cluster, tiny_corpus, uninterrupted, tmp_path):
    """USR1 to the batch shell (what `#SBATCH --signal=B:USR1@...` sends before the time limit)
    after a few steps: the workers finish the step, checkpoint and exit, the script requeues the
    job, the second run resumes and ends with the same losses; the output file is appended to."""
    out = tmp_path / "preempted"
    env = {}
    if (Path(sys.prefix) / "bin" / "activate").exists():  # also exercise PANGU_VENV
        env = {"PANGU_VENV": sys.prefix}
    job = submit(cluster, tiny_corpus, out, env)
    try:
        cluster.wait_for(lambda: len(losses(out)) >= 2, 300, "two steps", interval=0.1)
    except SlurmError as err:
        raise AssertionError(f"{err}\n--- job output\n{job_output(out, job)[-5000:]}") from None
    signalled, signalled_after = time.monotonic(), max(losses(out))
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    runs = wait_until_ended(cluster, job, out)
    print(f"preempted job: signalled after step {signalled_after}, ended {time.monotonic() - signalled:.0f} s later")
    text = job_output(out, job)
    assert [run["JobState"] for run in runs][-1] == "COMPLETED", text[-5000:]
    assert len(runs) == 2, text[-5000:]  # the requeued run and the last one

    events = [r for r in records(out) if "event" in r]
    preempted = [r["step"] for r in events if r["event"] == "preempted"]
    resumed = [r["step"] for r in events if r["event"] == "resumed"]
    assert len(preempted) == 1 and 2 <= preempted[0] < STEPS, events
    assert resumed == preempted, events
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # every step once: resumed after the checkpointed one
    expected = losses(uninterrupted[2])
    assert losses(out) == expected  # bitwise: same layout, same reduction order

    # One output file for both runs, appended to: run 1's lines, the requeue, then run 2's.
    order = [text.find(marker) for marker in (f"job {job}, run 1,", "got SIGUSR1", "requeueing", f"job {job}, run 2,")]
    assert -1 not in order and order == sorted(order), text[-5000:]
    assert len(re.findall(r"parameters, \(dp, tp, pp\) = \(4, 1, 1\)", text)) == 2


def test_requeues_after_failures_are_capped(cluster, tiny_corpus, tmp_path):
    """A requeue the script did not do itself (Slurm's after a node failure; here `scontrol
    requeue` from outside) counts against PANGU_MAX_REQUEUES, preemptions do not: with none
    allowed, the requeued run gives up at once and the job ends FAILED."""
    out = tmp_path / "capped"
    job = submit(cluster, tiny_corpus, out, {"PANGU_MAX_REQUEUES": "0"})
    try:
        cluster.wait_for(lambda: len(losses(out)) >= 1, 300, "a step", interval=0.2)
    except SlurmError as err:
        raise AssertionError(f"{err}\n--- job output\n{job_output(out, job)[-5000:]}") from None
    cluster.run(["scontrol", "requeue", str(job)])
    runs = wait_until_ended(cluster, job, out)
    text = job_output(out, job)
    assert runs[-1]["JobState"] == "FAILED", text[-5000:]
    assert f"job {job}, run 2," in text and "requeued after 1 failures" in text and "giving up" in text, text[-5000:]


def test_a_users_error_ends_the_job_at_once(cluster, tmp_path):
    """A bad value (a prepared directory that does not exist) fails on every rank with exit
    status 2: no worker is restarted, the job is not requeued, it ends FAILED with pangu's line
    last in its output."""
    out = tmp_path / "user-error"
    job = submit(cluster, tmp_path / "nowhere", out)
    runs = wait_until_ended(cluster, job, out)
    text = job_output(out, job)
    assert [run["JobState"] for run in runs] == ["FAILED"], text[-5000:]
    # each worker's line at most once (none restarted; the job is stopped a few seconds after the
    # first), and the job's last line
    assert 2 <= text.count("pangu pretrain: error:") <= 4 + 1, text[-5000:]
    assert "not restarted or requeued, a user's error" in text and "requeueing" not in text
    assert text.strip().splitlines()[-1].startswith("pangu pretrain: error:") and "holds no prepared data" in text
