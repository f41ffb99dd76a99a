"""scripts/gpu_check.py survives itself and fits its budget, checked on the CPU through its
--cpu-smoke mode (the same rows with a tiny model): a check killed part-way keeps every row it
finished, a row that hangs is timed out and the check goes on, the budget stops new rows, and
the report pairs each pangu row with its plain-loop baseline."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, subprocess_env

CHECK = REPO / "scripts" / "gpu_check.py"
HANG = "PANGU_GPU_CHECK_HANG"


def check_command(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(CHECK), "--cpu-smoke", "--out", str(out), *args]


def rows_of(out: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((out / "gpu_check.json").read_text())["rows"]}


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_a_killed_check_keeps_every_row_it_finished(tmp_path):
    """Killed (SIGKILL: nothing of it runs on) while its third row runs, the check leaves the
    JSON and the table whole, with the two rows it finished, and its row process dies with it."""
    scratch = tmp_path / "tmp"  # the killed check cannot remove its temporary directory: let pytest do it
    scratch.mkdir()
    env = dict(subprocess_env(), TMPDIR=str(scratch), **{HANG: "350m pangu compiled"})  # row 3 runs when killed
    out = tmp_path / "out"
    check = subprocess.Popen(check_command(out), env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert check.poll() is None and time.monotonic() < deadline, "the check ended or never reached row 3"
            time.sleep(0.2)
            if (out / "gpu_check.json").is_file():
                rows = rows_of(out)
                if rows["350m pangu compiled"]["status"] == "running":
                    break
    finally:
        check.send_signal(signal.SIGKILL)
        check.wait()
    rows = rows_of(out)
    assert [rows[name]["status"] for name in ("matmul peak", "optimizer step")] == ["ok", "ok"]
    assert rows["matmul peak"]["result"]["measured FLOP/s"] > 0
    assert set(rows["optimizer step"]["result"]["ms/step"]) == {"AdamW fused", "S3 fused p=2", "S3 fused p=3"}
    assert {row["status"] for name, row in rows.items() if name not in ("matmul peak", "optimizer step")} == {
        "running",
        "pending",
    }
    table = (out / "gpu_check.md").read_text()
    assert "| matmul peak | ok |" in table and "| optimizer step | ok |" in table
    assert "| 350m pangu compiled | running |" in table
    for name, ms in rows["optimizer step"]["result"]["ms/step"].items():
        assert f"| {name} | {ms:.3g} |" in table
    orphan = rows["350m pangu compiled"]["pid"]
    deadline = time.monotonic() + 10
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(orphan), "the row's process outlived the check"


@pytest.mark.slow
def test_a_row_that_hangs_is_timed_out_and_the_check_goes_on(tmp_path):
    """--rows runs rows in the order given: the hanging one first, then one that finishes well
    inside the 15-second cap --row-timeout puts on every row."""
    env = dict(subprocess_env(), **{HANG: "optimizer step"})
    done = subprocess.run(
        check_command(tmp_path, "--rows", "optimizer step,matmul peak", "--row-timeout", "15"),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(tmp_path)
    assert list(rows) == ["optimizer step", "matmul peak"]
    hung, next_row = rows["optimizer step"], rows["matmul peak"]
    assert hung["status"] == "timed out" and "row timeout 15 s" in hung["note"]
    assert "hanging, as PANGU_GPU_CHECK_HANG asks" in hung["stderr_tail"]
    assert 15 <= hung["seconds"] < 40
    assert next_row["status"] == "ok" and next_row["result"]["measured FLOP/s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## optimizer step: timed out" in table and "hanging, as PANGU_GPU_CHECK_HANG asks" in table
    assert "| matmul peak | ok |" in table
    assert "===== optimizer step: timed out" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.slow
def test_the_budget_stops_new_rows_and_cuts_the_running_one(tmp_path):
    """A 9-second budget: the first row (hanging) is killed when the budget ends, not at its own
    150-second timeout, and no other row starts."""
    env = dict(subprocess_env(), **{HANG: "matmul peak"})
    started = time.monotonic()
    done = subprocess.run(
        check_command(tmp_path, "--budget-minutes", "0.15"), env=env, cwd=REPO, capture_output=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 60
    rows = rows_of(tmp_path)
    first = rows.pop("matmul peak")
    assert first["status"] == "timed out" and "(budget)" in first["note"] and first["seconds"] < 15
    assert rows and {row["status"] for row in rows.values()} == {"skipped"}
    assert all(row["note"].startswith("budget") for row in rows.values())
    assert "| optimizer step | skipped |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_every_row_runs_on_the_cpu(tmp_path):
    done = subprocess.run(
        check_command(tmp_path), capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(tmp_path)
    assert {name: row["status"] for name, row in rows.items()} == {name: "ok" for name in rows}
    pangu = [row for row in rows.values() if row["run"] == "pangu"]
    assert len(pangu) == 7 and all(rows[row["baseline"]]["run"] == "plain" for row in pangu)
    for row in pangu:
        ours, plain = row["result"], rows[row["baseline"]]["result"]
        assert ours["tokens/s"] > 0 and plain["tokens/s"] > 0 and len(ours["step seconds"]) == 2 + 5
        assert ours["recompute"] == plain["recompute"] == "none" and "memory model" in ours["recompute why"]
    profile = rows["350m pangu compiled"]["result"]["profile"]
    assert 0 < len(profile) <= 15 and all(op["self CPU ms"] >= 0 for op in profile)
    tests = rows["gpu tests"]["result"]["tests"]
    assert len(tests) == 4 and {test["outcome"] for test in tests} == {"skipped"}  # no CUDA here
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## Throughput" in table and "## Where the time goes: 350m pangu compiled" in table


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    yield load_script("gpu_check")
    del sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def gpu_rows():
    yield load_script("gpu_rows")
    del sys.modules["gpu_rows"]


def test_the_table_pairs_each_pangu_row_with_its_baseline(gpu_check):
    """Ratios and MFU come from the pangu row and the plain row it names; a missing baseline or
    peak leaves a dash, never a made-up figure; a failed row shows the end of its stderr."""
    data = {
        "mode": "GPU",
        "started": "2026-01-01T00:00:00+00:00",
        "budget minutes": 7,
        "elapsed s": 100.0,
        "rows": [
            {"name": "matmul peak", "run": "peak", "status": "ok", "result": {"device": "X", "torch": "2", "measured FLOP/s": 4e14, "vendor FLOP/s": None}},
            {"name": "a pangu", "run": "pangu", "baseline": "a plain", "status": "ok", "result": {"tokens/s": 1000.0, "flops/token": 1e11, "recompute": "none"}},
            {"name": "a plain", "run": "plain", "baseline": "", "status": "ok", "result": {"tokens/s": 2000.0, "flops/token": 1e11}},
            {"name": "b pangu", "run": "pangu", "baseline": "b plain", "status": "ok", "result": {"tokens/s": 500.0, "flops/token": 1e11}},
            {"name": "b plain", "run": "plain", "baseline": "", "status": "failed", "note": "exit 1", "stderr_tail": "CUDA out of memory"},
        ],
    }  # fmt: skip
    table = gpu_check.render_markdown(data)
    assert "| a pangu | none | 1,000 | 2,000 | 0.5 | 0.25 | - | 0.5 |" in table
    assert "| b pangu | - | 500 | - | - | 0.125 | - | - |" in table
    assert "## b plain: failed (exit 1), end of its stderr" in table and "CUDA out of memory" in table
    assert "# pangu device check (GPU): X, torch 2" in table


def test_rows_are_data_and_name_what_exists(gpu_check, gpu_rows):
    """Every row's way of running exists; every pangu row names a plain row of the same config
    and overrides but the engine (compiled against compiled, eager against eager); row names are unique."""
    rows = {row.name: row for row in gpu_check.ROWS}
    assert len(rows) == len(gpu_check.ROWS)
    for row in rows.values():
        assert row.run in gpu_rows.MEASUREMENTS
        if row.run == "pangu":
            baseline = rows[row.baseline]
            # the engine is pangu's choice, not the plain loop's: every other override is the same
            same = tuple(o for o in row.overrides if not o.startswith("parallel.engine="))
            assert (baseline.run, baseline.target, baseline.overrides) == ("plain", row.target, same)
        if row.run == "pytest":
            assert "pytest.mark.gpu" in (REPO / row.target).read_text()
    order = [row.run for row in gpu_check.ROWS]
    assert order[:2] == ["peak", "optimizer"] and order[-1] == "pytest"
    assert os.path.isfile(REPO / "configs" / "350m.yaml") and os.path.isfile(REPO / "configs" / "2.6b.yaml")
