"""Numbers at the edges of what the config allows still train."""

from __future__ import annotations

import json

import pytest

from pangu.config import load_config
from pangu.schema import ConfigError
from tests.helpers import run_pretrain, tiny_overrides


def _allowed(power: int) -> bool:
    try:
        load_config(None, [f"train.initial_loss_scale_power={power}"])
    except ConfigError:
        return False
    return True


@pytest.mark.slow
def test_fp16_trains_at_the_largest_initial_loss_scale_the_config_allows(tiny_corpus, tmp_path):
    """DeepSpeed starts the scale as the integer 2^power: at 2^63 and above torch cannot multiply
    the loss by it (OverflowError), so the config must stop below."""
    largest = max(power for power in range(0, 129) if _allowed(power))
    settings = ["train.precision=fp16", f"train.initial_loss_scale_power={largest}", "train.steps=2"]
    settings += ["optim.warmup_steps=1", "train.eval_interval=0"]
    result = run_pretrain(tiny_overrides(tiny_corpus, tmp_path / "run", *settings))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record.get("skipped") for record in steps if "loss" in record] == [
        True,
        True,
    ]  # the scale overflows: halved
