"""SGD + weight decay + relative gradient clipping for a scale-invariant trunk (SIBERT recipe).

docs/reference.md section 3. For the group marked `scale_invariant=True`:

    thr = sqrt(C) * sqrt(2 * wd / lr) * ||x||        # default C = 4, i.e. sqrt(C) = 2
    g   <- g * min(1, thr / ||g||)
    x   <- (1 - lr * wd) * x - lr * g

At equilibrium ||g||^2 ~ (2 wd / lr) ||x||^2, so the clip only removes rare large gradients.
Both norms are global: over every scale-invariant parameter of this optimizer and over every
process of `norm_group`. Each rank adds up its local sums of squares and they are all-reduced
with SUM. That counts every element exactly once because the scale-invariant weights are never
replicated: ZeRO-1 gives each data-parallel rank a disjoint flat partition, tensor parallelism
gives each tensor rank disjoint slices and each pipeline stage holds disjoint layers. A
replicated scale-invariant parameter (e.g. a LayerNorm gain copied on every tensor rank) would
be counted once per copy; the SIBERT trunk has none (its LayerNorms have no affine weights).

Every other group (embeddings, head, ...) is trained with S3 or AdamW, so one
torch.optim.Optimizer covers the whole model, which is what DeepSpeed accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from pangu.optim.s3 import (
    UpdateBound,
    check_s3_hyperparameters,
    fp32_working_copies,
    params_with_fp32_state,
    restore_fp32_state,
    s3_update_,
    write_back,
)

OtherOptimizer = Literal["s3", "adamw"]


def _sum_of_squares(tensors: list[Tensor], device: torch.device) -> Tensor:
    """sum(||t||^2) as an fp64 scalar, so that sums from many ranks add up without loss."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


class ScaleInvariantSGD(torch.optim.Optimizer):
    """One optimizer for a model whose trunk is scale invariant.

    params: param groups as made by pangu.optim.param_groups. At most one group may carry
        `scale_invariant=True`: DeepSpeed ZeRO steps the inner optimizer one group at a time,
        so the global norms must be computable from that single group. Groups may set their
        own "lr" and "weight_decay" (e.g. the SIBERT lr 8e-4, wd 1e-2 for the trunk).
    lr, weight_decay: defaults for groups that do not set their own.
    clip_c: C of the relative clip (sqrt(C) = 2 by default, as in SIBERT); 0 turns it off.
    other: "s3" or "adamw", the optimizer of the groups that are not scale invariant.
    beta, p, nesterov: S3 settings (other="s3"); betas: AdamW settings (other="adamw");
        eps: used by both. fused: the fused S3 kernels (see pangu.optim.s3).
    norm_group: process group over which the norms are summed. None means the default world
        group when torch.distributed is initialised and no reduction when it is not. Every
        rank of that group must hold a scale-invariant group and step it at the same time.

    Each group carries "step", the number of steps it has taken (AdamW's bias correction uses
    it; DeepSpeed checkpoints expect the same key). Logging: `clip_events`, `last_clip_ratio`,
    `last_weight_norm`, `last_grad_norm`, counted since construction (not checkpointed). They
    are kept as tensors so that a step never waits for the device; reading them does.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]] | Iterable[Tensor],
        lr: float,
        weight_decay: float,
        clip_c: float = 4.0,
        other: OtherOptimizer = "s3",
        beta: float = 0.95,
        p: float = 3.0,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        fused: bool = False,
        norm_group: dist.ProcessGroup | None = None,
    ) -> None:
        if other not in ("s3", "adamw"):
            raise ValueError(f"ScaleInvariantSGD: other must be 's3' or 'adamw', got {other!r}")
        if not clip_c >= 0:
            raise ValueError(f"ScaleInvariantSGD: clip_c must be >= 0 (0 disables), got {clip_c}")
        # Set before super().__init__, which calls add_param_group.
        self.other = other
        self.clip_c = clip_c
        self.fused = fused
        self.norm_group = norm_group
        self._clip_events: Tensor | None = None
        self._last_norms: tuple[Tensor, Tensor, Tensor] | None = None  # ratio, ||x||, ||g||
        # train.sdc_check sets it: the S3 groups' updates are checked against their bound (SGD's
        # and AdamW's steps have none)
        self.update_bound: UpdateBound | None = None
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            scale_invariant=False,
            beta=beta,
            p=p,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
            step=0,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}  # what the group will hold, checked first
        name = f"ScaleInvariantSGD group {group.get('name', len(self.param_groups))!r}"
        if not group["lr"] >= 0:
            raise ValueError(f"{name}: lr must be >= 0, got {group['lr']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {group['weight_decay']}")
        if group["scale_invariant"]:
            if any(g["scale_invariant"] for g in self.param_groups):
                raise ValueError(
                    f"{name}: only one group may be scale invariant (its norms "
                    "must be complete when DeepSpeed steps it on its own)"
                )
            if self.clip_c > 0 and group["weight_decay"] == 0:
                raise ValueError(
                    f"{name}: the relative clip needs weight_decay > 0 (its "
                    "threshold is proportional to sqrt(weight_decay)); or clip_c=0"
                )
        elif self.other == "s3":
            check_s3_hyperparameters(group["lr"], group["beta"], group["p"], group["eps"], group["weight_decay"])
        elif not all(0 <= b < 1 for b in group["betas"]) or not group["eps"] >= 0:
            raise ValueError(
                f"{name}: AdamW needs betas in [0, 1) and eps >= 0, got betas={group['betas']}, eps={group['eps']}"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["scale_invariant"]:
                self._step_scale_invariant(group)
            elif self.other == "s3":
                self._step_s3(group)
            else:
                self._step_adamw(group)
            group["step"] += 1
        return loss

    def _step_scale_invariant(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        grads32 = [p.grad.float() for p in params]
        weights32 = fp32_working_copies(params)
        device = group["params"][0].device
        # Even a rank without gradients joins the all-reduce, or the others would wait forever.
        sums = torch.stack([_sum_of_squares(weights32, device), _sum_of_squares(grads32, device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.norm_group)
        weight_norm, grad_norm = sums.sqrt().unbind()

        lr, weight_decay = group["lr"], group["weight_decay"]
        clip_ratio = torch.ones_like(grad_norm)
        if self.clip_c > 0 and lr > 0:
            threshold = math.sqrt(self.clip_c) * math.sqrt(2 * weight_decay / lr) * weight_norm
            clipped = grad_norm > threshold  # implies grad_norm > 0
            clip_ratio = torch.where(clipped, threshold / grad_norm, clip_ratio)
            if self._clip_events is None:
                self._clip_events = torch.zeros((), dtype=torch.int64, device=device)
            self._clip_events += clipped
        self._last_norms = (clip_ratio, weight_norm, grad_norm)

        torch._foreach_mul_(weights32, 1 - lr * weight_decay)
        torch._foreach_add_(weights32, torch._foreach_mul(grads32, -lr * clip_ratio))
        write_back(params, weights32)

    def _step_s3(self, group: dict[str, Any]) -> None:
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
            maximize=False,
            fused=self.fused,
            bound=self.update_bound,
        )

    def _step_adamw(self, group: dict[str, Any]) -> None:
        """AdamW with bias correction, as torch.optim.AdamW computes it, state in fp32."""
        params, grads, exp_avgs, exp_avg_sqs = params_with_fp32_state(self, group, ("exp_avg", "exp_avg_sq"))
        if not params:
            return
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step = group["step"] + 1
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step

        grads32 = [g.float() for g in grads]
        torch._foreach_lerp_(exp_avgs, grads32, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads32, grads32, 1 - beta2)
        denominator = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominator, math.sqrt(bias_correction2))
        torch._foreach_add_(denominator, eps)
        params32 = fp32_working_copies(params)
        torch._foreach_mul_(params32, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(params32, exp_avgs, denominator, value=-lr / bias_correction1)
        write_back(params, params32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_fp32_state(self, state_dict)

    @property
    def clip_events(self) -> int:
        """Number of steps on which the relative clip shortened the gradient."""
        return 0 if self._clip_events is None else int(self._clip_events)

    @property
    def last_clip_ratio(self) -> float | None:
        """min(1, thr / ||g||) of the last step (1.0: not clipped); None before any step."""
        return None if self._last_norms is None else float(self._last_norms[0])

    @property
    def last_weight_norm(self) -> float | None:
        """Global ||x|| of the scale-invariant weights before the last step."""
        return None if self._last_norms is None else float(self._last_norms[1])

    @property
    def last_grad_norm(self) -> float | None:
        """Global ||g|| of the scale-invariant gradients at the last step, before clipping."""
        return None if self._last_norms is None else float(self._last_norms[2])
