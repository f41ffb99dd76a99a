"""S3's update bound as a check (train.sdc_check, docs/sdc.md): how close fp32 rounding comes to
the bound, a flipped bit in the optimizer state found and held on every path, and a step without
a violation left exactly as it was."""

from __future__ import annotations

import pytest
import torch

from pangu.optim.param_groups import param_groups
from pangu.optim.s3 import S3, UpdateBound, held_coordinates
from pangu.optim.scale_invariant import ScaleInvariantSGD

PATHS = {"foreach": dict(foreach=True), "single": dict(foreach=False), "fused": dict(fused=True)}
TOLERANCE = 1e-4  # train.sdc_check.tolerance's default
EXPONENT_HIGH_BIT = 1 << 30  # set in |x| >= 2, clear below: flipping it multiplies a small x by 2^128
SIGN_BIT = -(1 << 31)  # int32 view


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """XOR one bit of element `index` of a contiguous fp32 tensor, in place."""
    tensor.view(-1).view(torch.int32)[index] ^= bit


def stepped(
    params: list[torch.Tensor], grads: list[torch.Tensor], steps: int, bound: UpdateBound | None, **settings
) -> tuple[list[torch.nn.Parameter], S3]:
    params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = S3(params, **settings)
    optimizer.update_bound = bound
    for _ in range(steps):
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    return params, optimizer


def problem(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, 5, generator=generator), torch.randn(7, generator=generator)]
    grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    return params, grads


# ---------------------------------------------------------------------------------------------
# how close rounding comes to the bound: the tolerance
# ---------------------------------------------------------------------------------------------


def largest_ratios(optimizer: S3, param: torch.nn.Parameter, grad: torch.Tensor, steps: int) -> list[float]:
    """Each step's largest |n| / (b + eps) over `steps` steps of the same gradient."""
    optimizer.update_bound = bound = UpdateBound(TOLERANCE)
    largest = []
    for _ in range(steps):
        param.grad = grad.clone()
        optimizer.step()
        largest.append(float(bound.take()[0].largest))
    return largest


# Gradients over 13 decades, every one constant: Hölder's equality case. Once the moving averages
# have forgotten their zero start, |n| = b in exact arithmetic, so the largest ratio approaches 1.
CONSTANT_GRADIENT = torch.logspace(-10, 3, 512) * torch.linspace(1.0, 1.9, 512)


# every p on the eager paths; the fused kernel (p = 3: the fast cube root) for its specialised cases
BOUND_CASES = [(path, p) for path in ("foreach", "single") for p in (1.0, 1.5, 2.0, 3.0)] + [
    ("fused", 2.0),
    ("fused", 3.0),
]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("path, p", BOUND_CASES)
def test_a_constant_gradient_reaches_the_bound_within_a_few_ulps(path: str, p: float, nesterov: bool) -> None:
    param = torch.nn.Parameter(torch.zeros(512))
    optimizer = S3([param], lr=1e-3, beta=0.9, p=p, nesterov=nesterov, eps=0.0, **PATHS[path])
    largest = largest_ratios(optimizer, param, CONSTANT_GRADIENT, 300)
    assert 1 - 1e-5 < max(largest) <= 1 + 1e-5  # the default tolerance, 1e-4, leaves a margin of 10


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_the_moving_averages_do_not_drift_past_the_bound_at_a_beta_near_1(p: float) -> None:
    """The single-tensor kernel's averages were once beta * m + (1 - beta) * g, whose rounding
    settles ~2^-24 / (1 - beta) away from a constant gradient's fixed point: 3-5e-5 past the bound
    at beta = 0.999 after ~8000 steps. As m + (1 - beta)(g - m) (the foreach path's lerp) the
    fixed point is exact."""
    param = torch.nn.Parameter(torch.zeros(64))
    optimizer = S3([param], lr=1e-3, beta=0.999, p=p, eps=0.0, foreach=False)
    largest = largest_ratios(optimizer, param, CONSTANT_GRADIENT[::8], 10_000)
    assert max(largest[-1000:]) <= 1 + 1e-5


# ---------------------------------------------------------------------------------------------
# a corrupted state found, named and held
# ---------------------------------------------------------------------------------------------


CORRUPTIONS = {  # state key, bit: what a flip of that bit does to the value
    "m exponent": ("m", EXPONENT_HIGH_BIT),  # |m| x 2^128: |n| far above b
    "s sign": ("s", SIGN_BIT),  # s < 0: b is nan (sqrt, pow and the fast cube root of a negative number)
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("path", PATHS)
def test_a_flipped_bit_in_the_state_is_found_and_held(path: str, p: float, corruption: str) -> None:
    key, bit = CORRUPTIONS[corruption]
    params, grads = problem()
    settings = dict(lr=1e-2, p=p, weight_decay=0.1, **PATHS[path])
    checked, optimizer = stepped(params, grads, 3, UpdateBound(TOLERANCE), **settings)
    clean, clean_optimizer = stepped(params, grads, 3, None, **settings)
    optimizer.update_bound.take()
    theta = checked[0].detach().clone()
    flip_bit(optimizer.state[checked[0]][key], 13, bit)

    for run, params_of_run in ((optimizer, checked), (clean_optimizer, clean)):
        for param, grad in zip(params_of_run, grads, strict=True):
            param.grad = grad.clone()
        run.step()
    corrupted, other = optimizer.update_bound.take()

    assert not float(corrupted.largest) <= 1e6  # huge, or nan
    assert held_coordinates(corrupted).tolist() == [13]
    assert float(other.largest) <= 1 + TOLERANCE and held_coordinates(other).tolist() == []
    # the corrupted coordinate kept its weight, its state restarts from zero (s from -0.0, the mark)
    assert checked[0].view(-1)[13] == theta.view(-1)[13]
    assert optimizer.state[checked[0]]["m"].view(-1)[13] == 0 and optimizer.state[checked[0]]["s"].view(-1)[13] == 0
    # every other coordinate took exactly the step it takes without the corruption and the check
    others = torch.arange(30) != 13
    assert torch.equal(checked[0].detach().view(-1)[others], clean[0].detach().view(-1)[others])
    assert torch.equal(checked[1].detach(), clean[1].detach())
    for key in ("m", "s"):
        state, clean_state = optimizer.state[checked[0]][key], clean_optimizer.state[clean[0]][key]
        assert torch.equal(state.view(-1)[others], clean_state.view(-1)[others])
    # at the next step the mark is gone and the coordinate steps again, within the bound
    for param, grad in zip(checked, grads, strict=True):
        param.grad = grad.clone()
    optimizer.step()
    assert all(float(r.largest) <= 1 and held_coordinates(r).tolist() == [] for r in optimizer.update_bound.take())
    assert checked[0].view(-1)[13] != theta.view(-1)[13]


@pytest.mark.parametrize("path", PATHS)
def test_a_held_coordinate_of_a_bf16_parameter_keeps_its_exact_value(path: str) -> None:
    params, grads = problem(seed=1)
    params = [p.to(torch.bfloat16) for p in params]
    grads = [g.to(torch.bfloat16) for g in grads]
    before, optimizer = stepped(params, grads, 2, UpdateBound(TOLERANCE), lr=1e-2, **PATHS[path])
    theta = before[1].detach().clone()
    flip_bit(optimizer.state[before[1]]["m"], 4, EXPONENT_HIGH_BIT)
    for param, grad in zip(before, grads, strict=True):
        param.grad = grad.clone()
    optimizer.step()
    assert before[1].dtype == torch.bfloat16 and before[1][4] == theta[4]
    assert not torch.equal(before[1], theta)  # the other coordinates moved


# ---------------------------------------------------------------------------------------------
# no violation: the checked step is the unchecked step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_without_a_violation_the_check_changes_nothing_and_records_the_largest_ratio(path: str, nesterov: bool) -> None:
    params, grads = problem(seed=2)
    settings = dict(lr=1e-2, beta=0.9, p=3.0, nesterov=nesterov, eps=1e-8, weight_decay=0.1, **PATHS[path])
    unchecked, plain = stepped(params, grads, 4, None, **settings)
    checked, optimizer = stepped(params, grads, 3, UpdateBound(TOLERANCE), **settings)
    optimizer.update_bound.take()
    # the fourth step, with the ratios worked out from the state before it, in fp64
    expected = []
    for param, grad in zip(checked, grads, strict=True):
        m, s, g = (t.double() for t in (optimizer.state[param]["m"], optimizer.state[param]["s"], grad))
        m, s = 0.9 * m + 0.1 * g, 0.9 * s + 0.1 * g.abs() ** 3
        n, b = (0.9 * m + 0.1 * g, (0.9 * s + 0.1 * g.abs() ** 3) ** (1 / 3)) if nesterov else (m, s ** (1 / 3))
        expected.append(float((n.abs() / (b + 1e-8)).max()))
        param.grad = grad.clone()
    optimizer.step()
    records = optimizer.update_bound.take()
    assert [r.param for r in records] == checked
    for record, value in zip(records, expected, strict=True):
        assert float(record.largest) == pytest.approx(value, rel=1e-5)
        assert held_coordinates(record).tolist() == []
    for a, b in zip(checked, unchecked, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(checked, unchecked, strict=True):
        for key in ("m", "s"):
            assert torch.equal(optimizer.state[a][key], plain.state[b][key])


def test_scale_invariant_sgd_checks_its_s3_groups_only() -> None:
    generator = torch.Generator().manual_seed(3)
    named = [(name, torch.nn.Parameter(torch.randn(8, generator=generator))) for name in ("embedding", "trunk")]
    groups = param_groups(named, 0.1, no_decay=[], scale_invariant=["trunk"], scale_invariant_lr=0.1)
    optimizer = ScaleInvariantSGD(groups, lr=1e-2, weight_decay=0.1)
    optimizer.update_bound = UpdateBound(TOLERANCE)
    embedding, trunk = (param for _, param in named)
    for _ in range(2):
        for param in (embedding, trunk):
            param.grad = torch.randn(8, generator=generator)
        optimizer.step()
    optimizer.update_bound.take()
    flip_bit(optimizer.state[embedding]["m"], 2, EXPONENT_HIGH_BIT)
    held = embedding.detach()[2].clone()
    optimizer.step()
    records = optimizer.update_bound.take()
    assert [r.param for r in records] == [embedding]  # plain SGD has no bound to check
    assert held_coordinates(records[0]).tolist() == [2] and embedding[2] == held
