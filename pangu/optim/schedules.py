"""Learning-rate schedules as pure functions of the step.

The trainer sets group["lr"] = base_lr * lr_factor(step, ...) before every optimizer step
(`apply_lr_factor` does that), so the schedule has no state of its own and a run resumed at
step k uses exactly the learning rates of a run that never stopped.

`step` counts optimizer steps already taken: the first step is step 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

Decay = Literal["cosine", "linear", "constant", "step"]
DECAYS: tuple[Decay, ...] = ("cosine", "linear", "constant", "step")

# SIBERT: divide the learning rate by 10 at 60% and again at 90% of training.
STEP_DECAY_FRACTIONS = (0.6, 0.9)
STEP_DECAY_FACTOR = 0.1


def step_decay(step: int, total_steps: int) -> float:
    """1 before 60% of total_steps, 0.1 from 60%, 0.01 from 90% (SIBERT)."""
    passed = sum(step >= fraction * total_steps for fraction in STEP_DECAY_FRACTIONS)
    return STEP_DECAY_FACTOR**passed


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, decay: Decay = "cosine", min_ratio: float = 0.1
) -> float:
    """Multiplier of the base learning rate at `step`.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step already moves
    and step warmup_steps - 1 reaches 1. Then, over steps warmup_steps .. total_steps:
    - "cosine": from 1 down to min_ratio along half a cosine;
    - "linear": from 1 down to min_ratio along a straight line;
    - "constant": 1;
    - "step": the SIBERT step decay (see `step_decay`, at fractions of total_steps);
      min_ratio does not apply to it.
    The factor reaches min_ratio at step total_steps and stays there after it.
    """
    if total_steps < 1:
        raise ValueError(f"lr_factor: total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"lr_factor: warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"lr_factor: min_ratio must be in [0, 1], got {min_ratio}")
    if step < 0:
        raise ValueError(f"lr_factor: step must be >= 0, got {step}")
    if decay not in DECAYS:
        raise ValueError(f"lr_factor: decay must be one of {DECAYS}, got {decay!r}")

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "step":
        return step_decay(step, total_steps)
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if decay == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - min_ratio) * progress  # linear


def apply_lr_factor(param_groups: Iterable[dict[str, Any]], factor: float) -> None:
    """Set every group's lr to factor times its base lr.

    The base lr is remembered in group["initial_lr"] (torch's own scheduler key) the first
    time; it is part of the optimizer state dict, so it survives a resume.
    """
    for group in param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
