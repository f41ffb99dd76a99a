"""One place per optimizer: `optim.name` -> an `OptimizerSpec` that says everything the rest of
pangu needs to know about it.

    config      which names exist, the options each reads from the optim section (`options`),
                and any check across config sections (`check`)
    engine      how to build it from parameter groups (`build`)
    checkpoint  which per-element state tensors it keeps per group (`state_keys`) and which
                per-group scalars (`scalar_state`), so its state is saved under any layout
    planner     how many fp32 buffers per element it keeps (the length of `state_keys`)
    trainer     what to log after each step (`metrics`), whether its updates can be checked
                against a bound (`bounded_update`, train.sdc_check)

Adding an optimizer is its options (an `OptimizerOptions` subclass) and `register(OptimizerSpec(...))`,
plus its tests (see docs/architecture.md).
This module imports no torch (the planner reads it); `build` imports what it needs when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pangu import config as config_module
from pangu.config import Config
from pangu.config.optim import OptimConfig, OptimizerOptions, register_options
from pangu.optim.param_groups import SCALE_INVARIANT, param_groups
from pangu.schema import ConfigError, from_dict

if TYPE_CHECKING:
    import torch


def _no_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {}


def _no_check(config: Config) -> None:
    return None


def _unbounded(optim: OptimConfig) -> bool:
    return False


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    # (optim config, param groups from pangu.optim.param_groups) -> the optimizer
    build: Callable[[OptimConfig, list[dict[str, Any]]], torch.optim.Optimizer]
    # (optim config, param group name) -> names of the fp32 state tensors it keeps per element
    state_keys: Callable[[OptimConfig, str], tuple[str, ...]]
    # its own settings (optim config's `options`), read from the optim section beside the shared ones
    options: type[OptimizerOptions] = OptimizerOptions
    # the scale-invariant trunk in a group of its own, with the options' si_lr and si_weight_decay
    scale_invariant_group: bool = False
    # per-parameter state that is not per element, with its value before the first step
    scalar_state: Mapping[str, float] = field(default_factory=dict)
    metrics: Callable[[torch.optim.Optimizer], dict[str, float]] = _no_metrics
    check: Callable[[Config], None] = _no_check
    # its optimizer bounds every update coordinate by lr and checks the bound in its step when given
    # an `update_bound` (pangu/optim/s3.py: UpdateBound; train.sdc_check)
    bounded_update: Callable[[OptimConfig], bool] = _unbounded


_SPECS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _SPECS:
        raise ValueError(f"optimizer {spec.name!r} is registered already")
    _SPECS[spec.name] = spec
    register_options(spec.name, spec.options)
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
            scale_invariant_lr=optim.options.si_lr,
            scale_invariant_weight_decay=optim.options.si_weight_decay,
        )
    else:
        groups = param_groups(named_parameters, optim.weight_decay, no_decay=no_decay)
    return spec.build(optim, groups)


# ---------------------------------------------------------------------------------------------
# The built-in optimizers


@dataclass(frozen=True)
class S3Options(OptimizerOptions):
    beta: float = 0.95  # of both the momentum and the average of |g|^p
    p: float = 3.0
    nesterov: bool = True
    eps: float = 1e-8

    def validate(self) -> None:
        self.require(0.0 <= self.beta < 1.0, "beta", "in [0, 1)")
        self.require(self.p >= 1.0, "p", ">= 1")
        self.require(self.eps >= 0, "eps", ">= 0")


@dataclass(frozen=True)
class AdamWOptions(OptimizerOptions):
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def validate(self) -> None:
        self.require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "two numbers in [0, 1)")
        self.require(self.eps >= 0, "eps", ">= 0")


# sgd_si's optimizer for the parameters outside the scale-invariant trunk: optim.si_other -> its options
SI_OTHER: dict[str, type[S3Options] | type[AdamWOptions]] = {"s3": S3Options, "adamw": AdamWOptions}
_TRUNK_KEYS = ("si_lr", "si_weight_decay", "si_clip_c")


@dataclass(frozen=True)
class ScaleInvariantOptions(OptimizerOptions):
    """sgd_si's trunk settings, and `other`: the options of the optimizer of every other parameter,
    written beside them in the optim section and chosen by `si_other` (beta, p, ... for s3)."""

    si_lr: float = 8e-4
    si_weight_decay: float = 1e-2
    si_clip_c: float = 4.0  # C of the relative clip; sqrt(C) = 2 as in SIBERT; 0 disables
    other: S3Options | AdamWOptions = field(default_factory=S3Options)

    @property
    def si_other(self) -> str:
        return next(name for name, options in SI_OTHER.items() if type(self.other) is options)

    @classmethod
    def keys(cls, section: dict[str, Any]) -> list[str]:
        return [*_TRUNK_KEYS, "si_other", *cls._other(section).keys(section)]

    @classmethod
    def read(cls, section: dict[str, Any]) -> ScaleInvariantOptions:
        trunk = from_dict(cls, {key: value for key, value in section.items() if key in _TRUNK_KEYS}, "optim")
        rest = {key: value for key, value in section.items() if key not in (*_TRUNK_KEYS, "si_other")}
        return dataclasses.replace(trunk, other=cls._other(section).read(rest))

    @staticmethod
    def _other(section: dict[str, Any]) -> type[S3Options] | type[AdamWOptions]:
        name = section.get("si_other", "s3")
        if name not in tuple(SI_OTHER):
            raise ConfigError(
                f"optim.si_other = {name!r} is not allowed: expected one of {', '.join(map(repr, SI_OTHER))}"
            )
        return SI_OTHER[name]

    def to_dict(self) -> dict[str, Any]:
        trunk = {key: getattr(self, key) for key in _TRUNK_KEYS}
        return {**trunk, "si_other": self.si_other, **self.other.to_dict()}

    def validate(self) -> None:
        self.require(self.si_lr > 0, "si_lr", "> 0")
        self.require(self.si_weight_decay >= 0, "si_weight_decay", ">= 0")
        self.require(self.si_clip_c >= 0, "si_clip_c", ">= 0 (0 disables)")
        self.other.validate()


def _build_s3(optim: OptimConfig, groups: list[dict[str, Any]]):
    from pangu.optim.s3 import S3

    options = optim.options
    return S3(
        groups,
        lr=optim.lr,
        beta=options.beta,
        p=options.p,
        nesterov=options.nesterov,
        eps=options.eps,
        weight_decay=optim.weight_decay,
        fused=fused(optim),
    )


def _build_adamw(optim: OptimConfig, groups: list[dict[str, Any]]):
    import torch

    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=optim.options.betas,
        eps=optim.options.eps,
        weight_decay=optim.weight_decay,
        fused=fused(optim),
        foreach=not fused(optim),
    )


def _build_sgd_si(optim: OptimConfig, groups: list[dict[str, Any]]):
    from pangu.optim.scale_invariant import ScaleInvariantSGD

    options = optim.options
    return ScaleInvariantSGD(
        groups,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        clip_c=options.si_clip_c,
        other=options.si_other,
        fused=fused(optim),
        **options.other.to_dict(),  # the other optimizer's settings, named as ScaleInvariantSGD takes them
    )


S3_STATE = ("m", "s")
ADAMW_STATE = ("exp_avg", "exp_avg_sq")


def _sgd_si_state(optim: OptimConfig, group: str) -> tuple[str, ...]:
    if group == SCALE_INVARIANT:
        return ()  # plain SGD keeps no state
    return S3_STATE if optim.options.si_other == "s3" else ADAMW_STATE


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


register(
    OptimizerSpec("s3", _build_s3, lambda optim, group: S3_STATE, options=S3Options, bounded_update=lambda optim: True)
)
register(
    OptimizerSpec(
        "adamw", _build_adamw, lambda optim, group: ADAMW_STATE, options=AdamWOptions, scalar_state={"step": 0.0}
    )
)
register(
    OptimizerSpec(
        "sgd_si",
        _build_sgd_si,
        _sgd_si_state,
        options=ScaleInvariantOptions,
        scale_invariant_group=True,
        metrics=_sgd_si_metrics,
        check=_sgd_si_check,
        bounded_update=lambda optim: optim.options.si_other == "s3",  # the trunk's SGD has no bound
    )
)
