"""S3 (SoftSignSGD, Peng et al. 2025): Adam-like updates that can never exceed the learning rate.

Per element, with one beta for both moments and an order p >= 1 (docs/reference.md section 2):

    m = beta * m + (1 - beta) * g
    s = beta * s + (1 - beta) * |g|^p
    n = beta * m + (1 - beta) * g                  # Nesterov look-ahead (n = m without it)
    b = (beta * s + (1 - beta) * |g|^p)^(1/p)      # (b = s^(1/p) without it)
    theta <- theta - lr * wd * theta               # decoupled weight decay
    theta <- theta - lr * n / (b + eps)

Numerator and denominator average the same gradients with the same weights, so Hölder's
inequality gives |n| <= b and every coordinate of the update lies in [-lr, lr].

Three ways to run the same update, chosen per parameter group:
- foreach (default): torch._foreach_* ops over the whole list of parameters.
- single tensor (foreach=False): a loop over parameters, one tensor at a time.
- fused (fused=True): the single-tensor update compiled by torch.compile into one
  elementwise kernel per parameter (CPU or GPU).

The state is two fp32 buffers per parameter ("m", "s") whatever the parameter dtype; bf16 and
fp16 parameters are updated in fp32 and written back.

The bound is also a check (train.sdc_check, docs/sdc.md): with an `UpdateBound` set on the
optimizer, every path computes each tensor's largest |n| / (b + eps) in the same step (inside the
fused kernel where the step is fused) and holds the coordinates above the bound (theta kept, m
and s restarted from zero, the coordinate marked for whoever names it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Fast cube root (the root of the recommended p = 3)
# --------------------------------------------------------------------------------------------

# Dividing the int32 bit pattern of a float by 3 divides its exponent by 3; adding this constant
# restores the exponent bias and leaves a first guess within ~3.2% of the true cube root
# (FreeBSD's cbrtf: B1 = (127 - 127/3 - 0.03306235651) * 2**23).
_CUBE_ROOT_MAGIC = 709_958_130
# Newton roughly squares the relative error: 3.2e-2 -> 1e-3 -> 1e-6 -> fp32 rounding (~1 ulp).
_CUBE_ROOT_NEWTON_STEPS = 3
# The bit trick assumes a normal float. Subnormals are scaled by 2**24 first (exact), which
# makes them normal, and the root is scaled back by 2**-8 (the cube root of 2**-24, also exact).
_SMALLEST_NORMAL_FP32 = 2.0**-126
_SUBNORMAL_SCALE = 2.0**24
_SUBNORMAL_ROOT_SCALE = 2.0**-8


def cube_root(x: Tensor) -> Tensor:
    """Cube root of a non-negative float32 tensor, within ~1.3 ulp of the exact value.

    Elementwise ops only, so torch.compile fuses it into the surrounding kernel, where it is
    much cheaper than pow (an exp and a log per element). 0 and +inf map to themselves.
    Negative inputs are not supported (S3 only takes roots of averages of |g|^p).
    """
    subnormal = x < _SMALLEST_NORMAL_FP32
    normal_x = torch.where(subnormal, x * _SUBNORMAL_SCALE, x)
    # The division by 3 is done in float: int32 division does not vectorize, and rounding
    # the bit pattern to 24 significant bits moves the guess by < 1e-5, far below its error.
    bits_over_3 = (normal_x.view(torch.int32).float() * (1.0 / 3.0)).to(torch.int32)
    root = (bits_over_3 + _CUBE_ROOT_MAGIC).view(torch.float32)
    for _ in range(_CUBE_ROOT_NEWTON_STEPS):
        root = root + (normal_x / (root * root) - root) * (1.0 / 3.0)
    root = torch.where(subnormal, root * _SUBNORMAL_ROOT_SCALE, root)
    # Newton never reaches 0 (it only shrinks the guess by 2/3 per step) and turns inf into nan.
    return torch.where((x == 0) | (x == float("inf")), x, root)


# --------------------------------------------------------------------------------------------
# The update bound as a check (train.sdc_check)
# --------------------------------------------------------------------------------------------


@dataclass
class BoundRecord:
    """What one step saw in one tensor it updated under an `UpdateBound`."""

    param: Tensor  # the tensor stepped: a parameter, its local shard, or ZeRO's flat partition
    # 0-d fp32 on the tensor's device (the step never waits for it): the largest |n| / (b + eps) of
    # its coordinates; nan when one was nan
    largest: Tensor
    s: Tensor  # its second moment, where -0.0 marks the coordinates the step held (`held_coordinates`)


class UpdateBound:
    """Checks, inside the step, that every coordinate's |n| / (b + eps) (its update before decay,
    in units of lr) is at most `limit` = 1 + tolerance. Exact arithmetic keeps it <= 1 (Hölder);
    fp32 rounding adds at most a few ulps (docs/sdc.md), so a coordinate above the limit (or nan)
    was computed from corrupted state (a flipped bit in m or s) or by faulty arithmetic. Such a
    coordinate is held: theta keeps its value, and m and s restart from zero there (their corrupted
    values would break the bound again at every step). s restarts from -0.0, the same zero to the
    update, whose sign marks the coordinate until the next step: the step itself only reduces each
    tensor to its largest ratio, and the rare step that held something is looked into afterwards
    (`held_coordinates`). Each step leaves one `BoundRecord` per tensor it updated (a tensor stepped
    again before `take` keeps its latest); `take` hands them over and forgets them."""

    def __init__(self, tolerance: float) -> None:
        if not tolerance >= 0:
            raise ValueError(f"UpdateBound: tolerance must be >= 0, got {tolerance}")
        self.limit = 1.0 + tolerance
        self._records: dict[int, BoundRecord] = {}  # by id of the tensor stepped

    def add(self, record: BoundRecord) -> None:
        self._records[id(record.param)] = record

    def take(self) -> list[BoundRecord]:
        records, self._records = list(self._records.values()), {}
        return records


def held_coordinates(record: BoundRecord) -> Tensor:
    """The flat indices of the coordinates the record's step held (read before the next step).
    s is never -0.0 otherwise: it starts at +0.0 and only ever adds (1 - beta)(|g|^p - s), which is
    +0.0 when both are zero."""
    s = record.s.reshape(-1)
    return torch.nonzero((s == 0) & torch.signbit(s)).flatten()


# --------------------------------------------------------------------------------------------
# Single-tensor update: run eagerly by the single-tensor path, compiled by the fused path
# --------------------------------------------------------------------------------------------


def _update_tensor(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    s: Tensor,
    hyperparameters: Tensor,
    abs_pow: Callable[[Tensor, Tensor], Tensor],
    root: Callable[[Tensor, Tensor], Tensor],
    checked: bool,
) -> Tensor | None:
    """The docs/reference.md formulas for one tensor, in fp32.

    maximize and nesterov are numbers rather than branches so that torch.compile builds one
    kernel for every combination: grad_sign is -1 to maximize, +1 otherwise, and lookahead is
    beta with Nesterov and 1 without, which turns n into m and b into s^(1/p) exactly.

    checked: the UpdateBound check in the same pass (`limit` is its bound): coordinates above it
    are held (see UpdateBound); returns the largest ratio. The coordinates within it get exactly
    the unchecked update.
    """
    lr, beta, p, eps, weight_decay, grad_sign, lookahead, limit = hyperparameters.unbind()
    g = grad.float() * grad_sign
    g_pow = abs_pow(g, p)
    # the moving averages as m + (1 - beta)(g - m), like the foreach path's lerp: a constant gradient
    # is then their exact fixed point (beta * m + (1 - beta) * g drifts from it by up to ~2^-24 / (1 - beta),
    # which the update bound's check would have to tolerate)
    m_new = m + (1 - beta) * (g - m)
    s_new = s + (1 - beta) * (g_pow - s)
    n = lookahead * m_new + (1 - lookahead) * g
    b = root(lookahead * s_new + (1 - lookahead) * g_pow, p)
    direction = n / (b + eps)  # each coordinate in [-1, 1]: the check reads it without dividing again
    theta = param.float()
    stepped = theta - lr * weight_decay * theta
    stepped = stepped - lr * direction
    if not checked:
        m.copy_(m_new)
        s.copy_(s_new)
        param.copy_(stepped)
        return None
    within = direction.abs() <= limit  # False for nan
    m.copy_(torch.where(within, m_new, 0.0))
    s.copy_(torch.where(within, s_new, -0.0))
    param.copy_(torch.where(within, stepped, theta))
    return direction.abs().amax()


def _square(g: Tensor, p: Tensor) -> Tensor:
    return g * g


def _abs_cube(g: Tensor, p: Tensor) -> Tensor:
    return g * g * g.abs()


def _abs_pow(g: Tensor, p: Tensor) -> Tensor:
    return g.abs().pow(p)


def _sqrt(x: Tensor, p: Tensor) -> Tensor:
    return x.sqrt()


def _cube_root(x: Tensor, p: Tensor) -> Tensor:
    return cube_root(x)


def _root_p(x: Tensor, p: Tensor) -> Tensor:
    return x.pow(1.0 / p)


# One top-level function per special case of p. torch.compile keeps its cache per function, so
# each case compiles once per dtype and per value of `checked` (shapes are dynamic,
# hyperparameters are tensor values).
def _update_tensor_p2(param: Tensor, grad: Tensor, m: Tensor, s: Tensor, hyperparameters: Tensor, checked: bool):
    return _update_tensor(param, grad, m, s, hyperparameters, abs_pow=_square, root=_sqrt, checked=checked)


def _update_tensor_p3(param: Tensor, grad: Tensor, m: Tensor, s: Tensor, hyperparameters: Tensor, checked: bool):
    return _update_tensor(param, grad, m, s, hyperparameters, abs_pow=_abs_cube, root=_cube_root, checked=checked)


def _update_tensor_any_p(param: Tensor, grad: Tensor, m: Tensor, s: Tensor, hyperparameters: Tensor, checked: bool):
    return _update_tensor(param, grad, m, s, hyperparameters, abs_pow=_abs_pow, root=_root_p, checked=checked)


_TensorUpdate = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, bool], Tensor | None]
_compiled_updates: dict[_TensorUpdate, _TensorUpdate] = {}


def _tensor_update_for(p: float, fused: bool) -> _TensorUpdate:
    """The single-tensor update specialised for p, compiled on first use when fused."""
    if p == 2:
        update = _update_tensor_p2
    elif p == 3 and fused:
        update = _update_tensor_p3
    else:
        # Eagerly, each op of the bit-trick cube root is a pass over memory with a fresh
        # allocation: a dozen of them cost far more than one pow. Only fusion makes it cheap.
        update = _update_tensor_any_p
    if not fused:
        return update
    if update not in _compiled_updates:
        # With dynamic shapes the CPU backend decides at compile time, from the first tensor
        # it sees, whether the kernel runs on several threads; dynamic_threads makes it always
        # emit a parallel loop and leaves the thread count to OpenMP at run time.
        _compiled_updates[update] = torch.compile(update, dynamic=True, options={"cpp.dynamic_threads": True})
    return _compiled_updates[update]


# --------------------------------------------------------------------------------------------
# foreach update: the same formulas as a handful of passes over the whole parameter list
# --------------------------------------------------------------------------------------------


def fp32_working_copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    """fp32 tensors to update in place: the tensor itself when it is fp32, else a copy."""
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def write_back(tensors: Sequence[Tensor], working: Sequence[Tensor]) -> None:
    """Copy updated fp32 working copies back into the (bf16/fp16) tensors they came from."""
    for tensor, copy in zip(tensors, working, strict=True):
        if copy is not tensor:
            tensor.copy_(copy)


def _foreach_abs_pow(grads: list[Tensor], p: float) -> list[Tensor]:
    if p == 2:
        return torch._foreach_mul(grads, grads)
    magnitudes = torch._foreach_abs(grads)
    if p == 3:
        squares = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(magnitudes, squares)
        return magnitudes
    torch._foreach_pow_(magnitudes, p)
    return magnitudes


def _foreach_root(values: list[Tensor], p: float, *, in_place: bool) -> list[Tensor]:
    """values^(1/p), written over `values` when they are a temporary (saves an allocation)."""
    if p == 2:
        if in_place:
            torch._foreach_sqrt_(values)
            return values
        return torch._foreach_sqrt(values)
    # p = 3 included: as separate eager passes the bit-trick cube root (a dozen passes over
    # memory) is slower than one pow pass; it pays off only inside a fused kernel.
    if in_place:
        torch._foreach_pow_(values, 1.0 / p)
        return values
    return torch._foreach_pow(values, 1.0 / p)


def _s3_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    *,
    lr: float,
    beta: float,
    p: float,
    nesterov: bool,
    eps: float,
    weight_decay: float,
    maximize: bool,
    bound: UpdateBound | None,
) -> None:
    # .float() returns fp32 gradients themselves: every op below on grads32 is out of place.
    grads32 = [g.float() for g in grads]
    if maximize:
        grads32 = torch._foreach_neg(grads32)
    g_pow = _foreach_abs_pow(grads32, p)
    torch._foreach_lerp_(ms, grads32, 1 - beta)  # m + (1-beta)(g - m) = beta m + (1-beta) g
    torch._foreach_lerp_(ss, g_pow, 1 - beta)
    if nesterov:
        numerator = torch._foreach_lerp(grads32, ms, beta)  # beta m + (1-beta) g
        torch._foreach_lerp_(g_pow, ss, beta)  # beta s + (1-beta) |g|^p, in g_pow's memory
        denominator = _foreach_root(g_pow, p, in_place=True)
    else:
        numerator = ms
        denominator = _foreach_root(ss, p, in_place=False)
    torch._foreach_add_(denominator, eps)
    # the direction n / (b + eps), each coordinate in [-1, 1], in the numerator's memory when it is a
    # temporary (a fresh buffer costs a page fault per 4 KiB on the CPU, more than the pass itself)
    if nesterov:
        torch._foreach_div_(numerator, denominator)
        directions = numerator
    else:
        directions = torch._foreach_div(ms, denominator)
    held = [] if bound is None else _hold_over_bound(params, ms, ss, directions, bound)
    params32 = fp32_working_copies(params)
    if weight_decay != 0:
        torch._foreach_mul_(params32, 1 - lr * weight_decay)
    torch._foreach_add_(params32, directions, alpha=-lr)
    for index, over, theta in held:
        params32[index][over] = theta
    write_back(params, params32)


def _hold_over_bound(
    params: Sequence[Tensor], ms: list[Tensor], ss: list[Tensor], directions: list[Tensor], bound: UpdateBound
) -> list[tuple[int, Tensor, Tensor]]:
    """The UpdateBound check of the foreach path, before any parameter moves: records each
    tensor's largest |n| / (b + eps) (one more pass: the smallest and largest direction) and, in
    the rare step where one is above the bound, restarts m and s from zero there and returns
    (tensor index, those coordinates, their theta) for the step to put theta back. Deciding that
    costs one wait for the device (free on the CPU, where foreach is the default path)."""
    # one tensor at a time: foreach has no smallest, and torch's inf-norm is ~15x slower on the CPU
    stepped = [i for i, param in enumerate(params) if param.numel()]  # the largest of nothing is undefined
    if not stepped:
        return []
    smallest, biggest = (torch.stack(ends) for ends in zip(*(torch.aminmax(directions[i]) for i in stepped)))
    largest = torch.maximum(-smallest, biggest)  # nan stays nan
    for k, i in enumerate(stepped):
        bound.add(BoundRecord(params[i], largest[k], ss[i]))
    held = []
    if bool((largest <= bound.limit).all()):  # False for nan
        return held
    for k, i in enumerate(stepped):
        if largest[k] <= bound.limit:
            continue
        over = ~(directions[i].abs() <= bound.limit)
        ms[i][over] = 0.0
        ss[i][over] = -0.0
        held.append((i, over, params[i][over].float()))
    return held


# --------------------------------------------------------------------------------------------
# Functional entry point, shared by S3 and ScaleInvariantSGD
# --------------------------------------------------------------------------------------------


def check_s3_hyperparameters(lr: float, beta: float, p: float, eps: float, weight_decay: float) -> None:
    """Raise a ValueError naming the first hyperparameter outside its allowed range."""
    if not lr >= 0:
        raise ValueError(f"S3: lr must be >= 0, got {lr}")
    if not 0 <= beta < 1:
        raise ValueError(f"S3: beta must be in [0, 1), got {beta}")
    if not 1 <= p < float("inf"):
        raise ValueError(f"S3: p must be a finite number >= 1, got {p}")
    if not eps >= 0:
        raise ValueError(f"S3: eps must be >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"S3: weight_decay must be >= 0, got {weight_decay}")


def s3_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    *,
    lr: float,
    beta: float,
    p: float,
    nesterov: bool,
    eps: float,
    weight_decay: float,
    maximize: bool,
    fused: bool = False,
    foreach: bool | None = None,
    bound: UpdateBound | None = None,
) -> None:
    """One S3 step, in place on params and their fp32 state buffers ms and ss.

    foreach=None picks the foreach path when every tensor is on one device and fused is off.
    bound: check every coordinate against it (see UpdateBound) in the same step.
    """
    if fused and foreach:
        raise ValueError("S3: choose at most one of fused=True and foreach=True")
    if not params:
        return
    if foreach is None:
        foreach = not fused and len({t.device for t in chain(params, grads, ms, ss)}) == 1
    if foreach:
        _s3_foreach(
            params,
            grads,
            ms,
            ss,
            lr=lr,
            beta=beta,
            p=p,
            nesterov=nesterov,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            bound=bound,
        )
        return
    update = _tensor_update_for(p, fused)
    # Passed as one small tensor (per device): with seven Python floats instead, torch.compile
    # would wrap each into a tensor on every call, doubling the ~25 us a call costs.
    hyperparameters = [
        lr,
        beta,
        p,
        eps,
        weight_decay,
        -1.0 if maximize else 1.0,
        beta if nesterov else 1.0,
        math.inf if bound is None else bound.limit,
    ]  # the order _update_tensor unpacks
    hyperparameters_on: dict[torch.device, Tensor] = {}
    for param, grad, m, s in zip(params, grads, ms, ss, strict=True):
        if bound is not None and not param.numel():
            continue  # nothing to update, and no largest ratio to record
        if param.device not in hyperparameters_on:
            hyperparameters_on[param.device] = torch.tensor(hyperparameters, device=param.device)
        # torch.compile makes one graph serve every parameter only if it gets 1-D plain
        # tensors: it compiles again for each new number of dimensions, treats nn.Parameter
        # shapes as static and guards on the shape a view was taken from (detach() drops it).
        tensors = (param, grad, m, s)
        flat = all(t.is_contiguous() for t in tensors)
        tensors = tuple((t.view(-1) if flat else t).detach() for t in tensors)
        largest = update(*tensors, hyperparameters_on[param.device], bound is not None)
        if bound is not None:
            bound.add(BoundRecord(param, largest, s))


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


def restore_fp32_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo torch's cast of loaded state to the parameter dtype: our buffers are always fp32.

    torch.optim.Optimizer.load_state_dict converts floating state tensors to each parameter's
    dtype (bf16 params would get bf16 moments) and may alias the tensors of `state_dict`;
    this puts fresh fp32 copies of the saved values in their place.
    """
    saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
    params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
    for saved_id, param in zip(saved_ids, params, strict=True):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                optimizer.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)


def params_with_fp32_state(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], state_names: tuple[str, str]
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The group's parameters that have a gradient, their gradients and their two state
    buffers, created as fp32 zeros on first use (so the state never holds anything else)."""
    params, grads, firsts, seconds = [], [], [], []
    for param in group["params"]:
        if param.grad is None:
            continue
        state = optimizer.state[param]
        if not state:
            for name in state_names:
                state[name] = torch.zeros_like(param, dtype=torch.float32)
        params.append(param)
        grads.append(param.grad)
        firsts.append(state[state_names[0]])
        seconds.append(state[state_names[1]])
    return params, grads, firsts, seconds


class S3(torch.optim.Optimizer):
    """SoftSignSGD. Hyperparameters are read from each param group at every step, so a
    trainer may rewrite group["lr"] before each step (see pangu.optim.schedules).

    Works as the inner optimizer of DeepSpeed ZeRO stage 1, which hands it flat fp32
    partitions as parameters: the update is elementwise, so sharding it is exact.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta: float = 0.95,
        p: float = 3.0,
        nesterov: bool = True,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            p=p,
            nesterov=nesterov,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)
        self.update_bound: UpdateBound | None = None  # train.sdc_check sets it

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}  # what the group will hold, checked first
        check_s3_hyperparameters(group["lr"], group["beta"], group["p"], group["eps"], group["weight_decay"])
        if group["fused"] and group["foreach"]:
            raise ValueError("S3: choose at most one of fused=True and foreach=True")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, ss = params_with_fp32_state(self, group, ("m", "s"))
            s3_update_(
                params,
                grads,
                ms,
                ss,
                lr=group["lr"],
                beta=group["beta"],
                p=group["p"],
                nesterov=group["nesterov"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                fused=group["fused"],
                foreach=group["foreach"],
                bound=self.update_bound,
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_fp32_state(self, state_dict)
