"""scripts/gpu_check.py keeps working while no GPU is at hand: its --cpu-smoke mode runs every
section on the CPU with a tiny model and writes the JSON and the markdown table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env


@pytest.mark.slow
def test_the_device_check_runs_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert sections["tests"][0]["exit"] in (0, 5)  # the gpu tests skip on the CPU (5: none selected)
    assert [row["eod_reset"] for row in sections["throughput"]] == [False, True]
    assert all(row["tokens/s"] > 0 and row["ratio pangu / plain"] > 0 for row in sections["throughput"])
    assert {row["optimizer"] for row in sections["optimizer step"]} == {"AdamW fused", "S3 fused p=2", "S3 fused p=3"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## throughput" in table and "| ratio pangu / plain |" not in table.splitlines()[0]
