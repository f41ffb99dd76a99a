"""One place per optimizer: `optim.name` -> an `OptimizerSpec` that says everything the rest of
pangu needs to know about it.

    config      which names exist, and any check across config sections (`check`)
    engine      how to build it from parameter groups (`build`)
    checkpoint  which per-element state tensors it keeps per group (`state_keys`) and which
                per-group scalars (`scalar_state`), so its state is saved under any layout
    planner     how many fp32 buffers per element it keeps (the length of `state_keys`)
    trainer     what to log after each step (`metrics`)

Adding an optimizer is `register(OptimizerSpec(...))` plus its tests (see docs/architecture.md).
This module imports no torch (the planner reads it); `build` imports what it needs when called.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pangu import config as config_module
from pangu.config import Config, OptimConfig
from pangu.optim.param_groups import SCALE_INVARIANT, param_groups
from pangu.schema import ConfigError

if TYPE_CHECKING:
    import torch


def _no_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {}


def _no_check(config: Config) -> None:
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    # (optim config, param groups from pangu.optim.param_groups) -> the optimizer
    build: Callable[[OptimConfig, list[dict[str, Any]]], torch.optim.Optimizer]
    # (optim config, param group name) -> names of the fp32 state tensors it keeps per element
    state_keys: Callable[[OptimConfig, str], tuple[str, ...]]
    # the scale-invariant trunk in a group of its own, with optim.si_lr and optim.si_weight_decay
    scale_invariant_group: bool = False
    # per-parameter state that is not per element, with its value before the first step
    scalar_state: Mapping[str, float] = field(default_factory=dict)
    metrics: Callable[[torch.optim.Optimizer], dict[str, float]] = _no_metrics
    check: Callable[[Config], None] = _no_check


_SPECS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _SPECS:
        raise ValueError(f"optimizer {spec.name!r} is registered already")
    _SPECS[spec.name] = spec
    return spec


def names() -> list[str]:
    return list(_SPECS)


def get(name: str) -> OptimizerSpec:
    if name not in _SPECS:
        raise ConfigError(f"optim.name = {name!r} is not allowed: expected one of {', '.join(map(repr, _SPECS))}")
    return _SPECS[name]


def _check_config(config: Config) -> None:
    get(config.optim.name).check(config)


config_module.register_check(_check_config)


def fused(optim: OptimConfig) -> bool:
    """optim.fused, with "auto" resolved: fused kernels on a GPU."""
    if optim.fused == "auto":
        import torch

        return torch.cuda.is_available()
    return optim.fused


def build_optimizer(
    optim: OptimConfig,
    named_parameters: list[tuple[str, torch.nn.Parameter]],
    *,
    no_decay: Collection[str],
    scale_invariant: Collection[str] = (),
) -> torch.optim.Optimizer:
    """The optimizer `optim.name` over these parameters: `no_decay` names get no weight decay;
    `scale_invariant` names (the trunk of the scale-invariant variant) get their own group when
    the optimizer asks for one."""
    spec = get(optim.name)
    if spec.scale_invariant_group:
        groups = param_groups(
            named_parameters,
            optim.weight_decay,
            no_decay=no_decay,
            scale_invariant=scale_invariant,
            scale_invariant_lr=optim.si_lr,
            scale_invariant_weight_decay=optim.si_weight_decay,
        )
    else:
        groups = param_groups(named_parameters, optim.weight_decay, no_decay=no_decay)
    return spec.build(optim, groups)


# ---------------------------------------------------------------------------------------------
# The built-in optimizers


def _build_s3(optim: OptimConfig, groups: list[dict[str, Any]]):
    from pangu.optim.s3 import S3

    return S3(
        groups,
        lr=optim.lr,
        beta=optim.beta,
        p=optim.p,
        nesterov=optim.nesterov,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=fused(optim),
    )


def _build_adamw(optim: OptimConfig, groups: list[dict[str, Any]]):
    import torch

    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=fused(optim),
        foreach=not fused(optim),
    )


def _build_sgd_si(optim: OptimConfig, groups: list[dict[str, Any]]):
    from pangu.optim.scale_invariant import ScaleInvariantSGD

    return ScaleInvariantSGD(
        groups,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        clip_c=optim.si_clip_c,
        other=optim.si_other,
        beta=optim.beta,
        p=optim.p,
        nesterov=optim.nesterov,
        betas=optim.betas,
        eps=optim.eps,
        fused=fused(optim),
    )


S3_STATE = ("m", "s")
ADAMW_STATE = ("exp_avg", "exp_avg_sq")


def _sgd_si_state(optim: OptimConfig, group: str) -> tuple[str, ...]:
    if group == SCALE_INVARIANT:
        return ()  # plain SGD keeps no state
    return S3_STATE if optim.si_other == "s3" else ADAMW_STATE


def _sgd_si_metrics(optimizer) -> dict[str, float]:
    """How often the relative clip fires (SIBERT: ~1.5% of steps), and the norms behind it."""
    return {
        "si_clip_events": optimizer.clip_events,
        "si_clip_ratio": optimizer.last_clip_ratio,
        "si_weight_norm": optimizer.last_weight_norm,
        "si_grad_norm": optimizer.last_grad_norm,
    }


def _sgd_si_check(config: Config) -> None:
    if not config.model.scale_invariant:
        raise ConfigError(
            "optim.name = 'sgd_si' needs model.scale_invariant = true "
            "(plain SGD is only stable on a scale-invariant trunk)"
        )


register(OptimizerSpec("s3", _build_s3, lambda optim, group: S3_STATE))
register(OptimizerSpec("adamw", _build_adamw, lambda optim, group: ADAMW_STATE, scalar_state={"step": 0.0}))
register(
    OptimizerSpec(
        "sgd_si",
        _build_sgd_si,
        _sgd_si_state,
        scale_invariant_group=True,
        metrics=_sgd_si_metrics,
        check=_sgd_si_check,
    )
)
