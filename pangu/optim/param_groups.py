"""Split a model's parameters into optimizer groups: with and without weight decay, and the
scale-invariant trunk (for ScaleInvariantSGD). Which parameters decay and which form the trunk
is the model's to say (pangu.model.declaration declares it for PanGu-α); this module only groups."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch import: the planner reads the groups
    from torch import Tensor

DECAY, NO_DECAY, SCALE_INVARIANT = "decay", "no_decay", "scale_invariant"
GROUP_ORDER = (DECAY, NO_DECAY, SCALE_INVARIANT)


def group_of(*, decays: bool, scale_invariant: bool) -> str:
    """The group of one parameter (scale_invariant: it is in the trunk and the optimizer keeps
    the trunk apart)."""
    if scale_invariant:
        return SCALE_INVARIANT
    return DECAY if decays else NO_DECAY


def param_groups(
    named_parameters: Iterable[tuple[str, Tensor]],
    weight_decay: float,
    *,
    no_decay: Collection[str],
    scale_invariant: Collection[str] = (),
    scale_invariant_lr: float | None = None,
    scale_invariant_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer param groups, in the order "decay", "no_decay", "scale_invariant".

    Each group has a "name" (for logging and for the optimizer's spec) and its "weight_decay".
    Parameters named in `no_decay` get none. Parameters named in `scale_invariant` go to the
    "scale_invariant" group (marked `scale_invariant=True`) whatever `no_decay` says: they keep
    weight decay (`scale_invariant_weight_decay`, default `weight_decay`) and get their own "lr"
    when `scale_invariant_lr` is given. Parameters that do not require grad are left out, and so
    are empty groups. Within a group the parameters keep the order of named_parameters, so the
    grouping is deterministic.
    """
    scale_invariant = set(scale_invariant)
    no_decay = set(no_decay)
    members: dict[str, list[Tensor]] = {group: [] for group in GROUP_ORDER}
    seen = set()
    for name, param in named_parameters:
        seen.add(name)
        if param.requires_grad:
            members[group_of(decays=name not in no_decay, scale_invariant=name in scale_invariant)].append(param)
    unknown = sorted((scale_invariant | no_decay) - seen)
    if unknown:
        raise ValueError(f"param_groups: names not among the parameters: {unknown}")

    si_group: dict[str, Any] = {
        "weight_decay": weight_decay if scale_invariant_weight_decay is None else scale_invariant_weight_decay,
        "scale_invariant": True,
    }
    if scale_invariant_lr is not None:
        si_group["lr"] = scale_invariant_lr
    settings = {DECAY: {"weight_decay": weight_decay}, NO_DECAY: {"weight_decay": 0.0}, SCALE_INVARIANT: si_group}
    return [{"name": group, "params": members[group], **settings[group]} for group in GROUP_ORDER if members[group]]
