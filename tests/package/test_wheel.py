"""pangu as its users get it: a wheel, installed into a fresh virtual environment outside the
checkout, carries its configs, task definitions and the released tokenizer, and runs the main
job: prepare the builtin corpus, train, evaluate a builtin task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO


def own_lines_only(stderr: str) -> bool:
    """A newcomer sees pangu's lines: no dependency's warning, banner or print."""
    return all(line.startswith(("[pangu]", "[prepare")) for line in stderr.splitlines() if line.strip())


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(env, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("pangu_lm-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    # pangu's dependencies come from this environment (a .pth file: no download); pangu itself only
    # from the wheel: this environment's editable install of the checkout is not reachable from there
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work)
    Path(site.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run([str(python), "-c", "import pangu; print(pangu.__file__)"], cwd=work).stdout.strip()
    assert where.startswith(str(venv)), where

    pangu = str(venv / "bin" / "pangu")
    small = [
        "--set",
        "data.prepared_dir=prepared",
        "--set",
        "train.output_dir=run",
        "--set",
        "train.steps=3",
        "--set",
        "train.eval_interval=0",
        "--set",
        "optim.warmup_steps=1",
    ]
    done = run([pangu, "prepare", "--config", "tiny", *small], cwd=work)
    report = json.loads(done.stdout)  # results alone on stdout
    assert own_lines_only(done.stderr), done.stderr
    assert report["totals"]["train"]["tokens"] > 1_000_000  # the builtin corpus, with the tiny config's tokenizer
    done = run([pangu, "pretrain", "--config", "tiny", *small], cwd=work)
    assert own_lines_only(done.stderr) and not done.stdout, done.stdout + done.stderr
    assert (work / "run" / "checkpoints" / "latest").is_file()
    done = run(
        [
            pangu,
            "evaluate",
            "--config",
            "tiny",
            *small,
            "--checkpoint",
            "run",
            "--task",
            "sentiment",
            "--max-examples",
            "20",
        ],
        cwd=work,
    )
    result = json.loads(done.stdout)
    assert own_lines_only(done.stderr), done.stderr
    assert result["tasks"]["sentiment"]["examples"] == 20
