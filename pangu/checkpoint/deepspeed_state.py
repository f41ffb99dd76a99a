"""The one place that reaches into DeepSpeed's optimizer wrappers (ZeRO-1's
DeepSpeedZeroOptimizer, BF16_Optimizer): per-parameter access to the fp32 master weights and the
optimizer state that ZeRO partitions, the per-group scalars, and the loss scaler.

What state an optimizer keeps is its spec's to say (pangu/optim/registry.py); this module only
knows where DeepSpeed keeps it.
"""

from __future__ import annotations

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from pangu.config import OptimConfig
from pangu.optim import registry

__all__ = [
    "safe_get_full_fp32_param",
    "safe_get_full_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_optimizer_state",
]


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer pangu built, as DeepSpeed wraps it (its params are flat fp32 partitions)."""
    return engine.optimizer.optimizer


def flat_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 partition each param group of the base optimizer updates on this rank."""
    return [group["params"][0] for group in base_optimizer(engine).param_groups]


def state_keys_by_param(engine, optim: OptimConfig) -> dict[torch.nn.Parameter, tuple[str, ...]]:
    """For every model parameter of this rank, the names of its per-element optimizer state."""
    spec = registry.get(optim.name)
    keys_per_group = [spec.state_keys(optim, group["name"]) for group in base_optimizer(engine).param_groups]
    wrapper = engine.optimizer
    groups = getattr(wrapper, "bit16_groups", None) or wrapper.bf16_groups
    return {param: keys_per_group[i] for i, params in enumerate(groups) for param in params}


def link_optimizer_state(engine, optim: OptimConfig) -> None:
    """Lets DeepSpeed map each parameter to its fragment of the flat optimizer state. Before the
    first step the optimizer has no state: it is created (zeros, and the spec's initial scalars)
    so that it can be set. DeepSpeed links lazily, once, at its first step, before the optimizer
    has created its state, so the link is redone here."""
    spec = registry.get(optim.name)
    base = base_optimizer(engine)
    for group, flat in zip(base.param_groups, flat_partitions(engine)):
        if not base.state[flat]:
            state = {key: torch.zeros_like(flat, dtype=torch.float32) for key in spec.state_keys(optim, group["name"])}
            state.update({key: torch.tensor(value, dtype=torch.float32) for key, value in spec.scalar_state.items()})
            base.state[flat] = state
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_scalars(engine) -> list[dict]:
    """Per param group, the state that is not per element: e.g. torch AdamW's per-parameter
    step count ("state"), or a step count kept in the group itself ("group")."""
    base = base_optimizer(engine)
    out = []
    for group, flat in zip(base.param_groups, flat_partitions(engine)):
        state = base.state.get(flat, {})
        out.append(
            {
                "state": {k: float(v) for k, v in state.items() if not (torch.is_tensor(v) and v.shape == flat.shape)},
                "group": {"step": group["step"]} if "step" in group else {},
            }
        )
    return out


def restore_optimizer_scalars(engine, scalars: list[dict]) -> None:
    base = base_optimizer(engine)
    for group, flat, values in zip(base.param_groups, flat_partitions(engine), scalars):
        for key, value in values["state"].items():
            base.state[flat][key] = torch.tensor(value, dtype=torch.float32)
        group.update(values["group"])


def loss_scaler_state(engine) -> dict:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return {}
    return {
        k: (float(v) if torch.is_tensor(v) else v)
        for k, v in vars(scaler).items()
        if isinstance(v, (int, float, bool)) or (torch.is_tensor(v) and v.numel() == 1)
    }


def restore_loss_scaler(engine, state: dict) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not state:
        return
    for key, value in state.items():
        current = getattr(scaler, key, None)
        setattr(
            scaler,
            key,
            torch.tensor(value, dtype=current.dtype, device=current.device) if torch.is_tensor(current) else value,
        )


def memory_report(engine) -> dict[str, int]:
    """Bytes this rank holds for the model: parameters (as trained, e.g. bf16), the ZeRO-1 fp32
    master partitions, gradients (one buffer per parameter in the accumulation dtype) and the
    optimizer state (this rank's partition). Measured from the tensors, not from a formula."""
    params = list(engine.module.parameters())
    base = base_optimizer(engine)
    param_pointers = {p.data_ptr() for p in params}
    grad_dtype = torch.float32 if engine.bfloat16_enabled() else params[0].dtype
    return {
        "parameter_bytes": _tensor_bytes(params),
        "master_weight_bytes": _tensor_bytes(m for m in flat_partitions(engine) if m.data_ptr() not in param_pointers),
        "gradient_bytes": sum(p.numel() for p in params) * torch.empty((), dtype=grad_dtype).element_size(),
        "optimizer_state_bytes": _tensor_bytes(
            v for state in base.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
        ),
    }


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
