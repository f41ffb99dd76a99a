"""Learning-rate schedules: warmup, the four decay shapes, end values, and apply_lr_factor."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from pangu.optim.s3 import S3
from pangu.optim.schedules import apply_lr_factor, lr_factor, step_decay

TOTAL, WARMUP, MIN_RATIO = 110, 10, 0.1


def factors(decay: str, steps: range = range(TOTAL + 20)) -> list[float]:
    return [lr_factor(step, total_steps=TOTAL, warmup_steps=WARMUP, decay=decay, min_ratio=MIN_RATIO) for step in steps]


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "step"])
def test_warmup_rises_linearly_from_the_first_step_to_one(decay: str) -> None:
    warmup = factors(decay, range(WARMUP))
    assert warmup == pytest.approx([(step + 1) / WARMUP for step in range(WARMUP)])
    assert factors(decay, range(WARMUP, WARMUP + 1)) == [1.0]


def test_cosine_decays_along_half_a_cosine_to_min_ratio() -> None:
    values = factors("cosine")
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert values[middle] == pytest.approx((1 + MIN_RATIO) / 2)
    quarter = WARMUP + (TOTAL - WARMUP) // 4  # cos(pi/4): above the straight line
    assert values[quarter] == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) * (1 + 2**-0.5) / 2)
    assert values[TOTAL] == pytest.approx(MIN_RATIO)
    assert values[TOTAL:] == [values[TOTAL]] * len(values[TOTAL:])
    assert all(a >= b for a, b in pairwise(values[WARMUP:]))


def test_linear_decays_along_a_straight_line_to_min_ratio() -> None:
    values = factors("linear")
    for fraction in (0.25, 0.5, 0.75):
        step = WARMUP + int(fraction * (TOTAL - WARMUP))
        assert values[step] == pytest.approx(1 - (1 - MIN_RATIO) * fraction)
    assert values[TOTAL] == pytest.approx(MIN_RATIO)
    assert values[-1] == pytest.approx(MIN_RATIO)


def test_constant_stays_at_one_after_warmup() -> None:
    assert factors("constant")[WARMUP:] == [1.0] * (TOTAL + 20 - WARMUP)


def test_step_decay_divides_by_ten_at_60_and_90_percent_of_training() -> None:
    assert [step_decay(step, 100) for step in (0, 59, 60, 89, 90, 99, 150)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01]
    )
    values = factors("step")
    assert values[65] == 1.0 and values[66] == pytest.approx(0.1)  # 0.6 * 110 = 66
    assert values[98] == pytest.approx(0.1) and values[99] == pytest.approx(0.01)


def test_no_warmup_starts_at_full_learning_rate() -> None:
    assert lr_factor(0, total_steps=10, warmup_steps=0, decay="cosine") == 1.0
    assert lr_factor(10, total_steps=10, warmup_steps=10, decay="cosine", min_ratio=0.2) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(total_steps=10, warmup_steps=11), "warmup_steps"),
        (dict(total_steps=0, warmup_steps=0), "total_steps"),
        (dict(total_steps=10, warmup_steps=2, decay="exponential"), "decay"),
        (dict(total_steps=10, warmup_steps=2, min_ratio=1.5), "min_ratio"),
    ],
)
def test_invalid_schedules_are_rejected(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lr_factor(0, **arguments)


def test_apply_lr_factor_scales_each_group_from_its_own_base_lr() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = S3([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 8e-4}])
    apply_lr_factor(optimizer.param_groups, 0.5)
    apply_lr_factor(optimizer.param_groups, 0.25)  # relative to the base, not compounding
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-4, 2e-4])

    # The base lr travels with the optimizer state, so a resumed run keeps it.
    resumed = S3([{"params": params[:1], "lr": 123.0}, {"params": params[1:], "lr": 456.0}])
    resumed.load_state_dict(optimizer.state_dict())
    apply_lr_factor(resumed.param_groups, 1.0)
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([1e-3, 8e-4])
