"""The optim section: what every optimizer shares is `OptimConfig`'s; each optimizer's own options
(S3's beta, AdamW's betas, ...) are declared with its registry entry (pangu/optim/registry.py),
which registers them here by the optimizer's name when it is imported, since the config cannot
import it. Users write both in the optim section (`optim.beta`, `--set optim.p=2`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from pangu.schema import ConfigError, did_you_mean, from_dict
from pangu.schema import require as _require


@dataclass(frozen=True)
class OptimizerOptions:
    """An optimizer's own options: subclass it with typed fields, their defaults and a `validate`,
    and hand the subclass to the optimizer's `OptimizerSpec`."""

    @classmethod
    def keys(cls, section: dict[str, Any]) -> list[str]:
        """The keys of the optim section `section` (as written) that these options read."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def read(cls, section: dict[str, Any]) -> OptimizerOptions:
        """The options from `section`, which holds only keys of `keys(section)`, each typed and checked."""
        return from_dict(cls, section, "optim")

    def to_dict(self) -> dict[str, Any]:
        """The keys and values as `read` takes them."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Each value within its domain (`require`)."""

    def require(self, ok: bool, key: str, allowed: str) -> None:
        _require(ok, f"optim.{key}", getattr(self, key), allowed)


_OPTIONS: dict[str, type[OptimizerOptions]] = {}  # optim.name -> the options it reads


def register_options(optimizer: str, options: type[OptimizerOptions]) -> None:
    _OPTIONS[optimizer] = options


@dataclass
class OptimConfig:
    name: str = "s3"  # a registered optimizer (pangu/optim/registry.py): s3, adamw, sgd_si
    lr: float = 1e-3
    weight_decay: float = 0.1  # not applied to LayerNorm parameters and biases
    # S3 and AdamW: one fused kernel per tensor (S3: torch.compile, built on the first step;
    # AdamW: torch's fused kernel) instead of the multi-tensor foreach path; under sgd_si it
    # applies to si_other = s3 (its AdamW part runs unfused). "auto": fused on GPUs, where it is
    # faster; foreach on the CPU, where compiling costs more than a short run saves
    fused: bool | Literal["auto"] = "auto"
    # schedule and clipping
    warmup_steps: int = 10
    decay: Literal["cosine", "linear", "constant", "step"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # the options of optimizer `name`, written beside the keys above; None: their defaults
    options: OptimizerOptions | None = None

    def __post_init__(self) -> None:
        if self.options is None and self.name in _OPTIONS:
            self.options = _OPTIONS[self.name]()

    def validate(self) -> None:
        _require(self.name in _OPTIONS, "optim.name", self.name, f"one of {', '.join(map(repr, _OPTIONS))}")
        if not isinstance(self.options, _OPTIONS[self.name]):
            raise TypeError(f"optim.options {self.options!r} are not the options of optim.name = {self.name!r}")
        self.options.validate()
        _require(self.lr > 0, "optim.lr", self.lr, "> 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0 (0 disables)")

    def to_dict(self) -> dict[str, Any]:
        """The optim section as users write it: the shared keys, then the options'."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**shared, **self.options.to_dict()}


def read_optim(section: Any, stored: bool) -> OptimConfig:
    """The optim section: the shared keys into OptimConfig, the others into the options of the
    optimizer it names; a key of neither is an error naming the optimizer and its keys. A `stored`
    section (a checkpoint's config) may also hold options of other optimizers, which are left out:
    before each optimizer's options moved to its registry entry, every optim section was stored
    with every optimizer's keys (they never acted on the run)."""
    if not isinstance(section, dict):
        raise ConfigError(f"optim must be a mapping, got {section!r}")
    name = section.get("name", OptimConfig.name)
    if not isinstance(name, str) or name not in _OPTIONS:
        raise ConfigError(f"optim.name = {name!r} is not allowed: expected one of {', '.join(map(repr, _OPTIONS))}")
    shared = [f.name for f in dataclasses.fields(OptimConfig) if f.name != "options"]
    own = _OPTIONS[name].keys(section)
    for key in section:
        owners = [other for other, options in _OPTIONS.items() if other != name and key in options.keys({})]
        if key in shared or key in own or (stored and owners):
            continue
        reason = f" (an option of {', '.join(map(repr, owners))}; each optimizer reads only its own)" if owners else ""
        raise ConfigError(
            f"unknown key 'optim.{key}' for optim.name = {name!r}{reason}.{did_you_mean(key, shared + own)} "
            f"Allowed keys of optim for {name}: {', '.join(shared + own)}"
        )
    optim = from_dict(OptimConfig, {key: value for key, value in section.items() if key in shared}, "optim")
    optim.options = _OPTIONS[name].read({key: value for key, value in section.items() if key in own})
    return optim
