"""The one place that reaches into DeepSpeed's optimizer wrappers (ZeRO-1's
DeepSpeedZeroOptimizer, BF16_Optimizer): where each parameter's fragment of this rank's flat fp32
partition lies (what a rank owns and writes), the flat partitions of the master weights and of
the optimizer state, refreshing the model's weights from them, the per-group scalars, and the
loss scaler, in the engine-neutral terms of pangu/parallel/engine.py.

Under ZeRO-1 each param group is one flat fp32 tensor split evenly over the data-parallel ranks;
a rank's partition cuts parameters at arbitrary flat positions. DeepSpeed records, per model
parameter, the fragment this rank owns (`param._hp_mapping`: its start in the partition and in
the flattened parameter, and its length; deepspeed/utils/tensor_fragment.py).
"""

from __future__ import annotations

import torch

from pangu.config import Config
from pangu.model import declaration
from pangu.optim import registry
from pangu.parallel.engine import Fragment
from pangu.parallel.topology import Topology


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer pangu built, as DeepSpeed wraps it (its params are flat fp32 partitions)."""
    return engine.optimizer.optimizer


def flat_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 partition each param group of the base optimizer updates on this rank."""
    return [group["params"][0] for group in base_optimizer(engine).param_groups]


def fragments(engine, config: Config, topology: Topology) -> list[Fragment]:
    """This rank's fragments, in the module's parameter order (a parameter outside the rank's
    partitions has none). Buffer i is param group i's flat partition."""
    table = declaration.parameter_table(config.model)
    out = []
    for pipe_name, param in engine.module.named_parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        name = pipe_name.partition(".")[2]  # DeepSpeed's layer index, then the stage's own name
        spec = table[name]
        hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
        if name == declaration.WORD_EMBEDDING_WEIGHT and not topology.is_first_stage:
            copy = 1  # the head's copy of the tied embedding; the first stage's is read
        else:
            copy = topology.tp_rank if spec.split_dim is None else 0  # replicated across tp
        out.append(
            Fragment(
                name,
                spec.local_range(topology.tp_rank, topology.tp),
                (lp.start, lp.start + lp.numel),
                mapping.param_group_index,
                hp.start,
                copy,
            )
        )
    return out


def group_state_keys(engine, config: Config) -> list[tuple[str, ...]]:
    spec = registry.get(config.optim.name)
    return [spec.state_keys(config.optim, group["name"]) for group in base_optimizer(engine).param_groups]


def partitions(engine, config: Config, weights_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per param group, this rank's flat fp32 tensors: {"weight": the master weights, state key:
    that optimizer state} (the state must exist: link_optimizer_state)."""
    base = base_optimizer(engine)
    out = []
    for keys, flat in zip(group_state_keys(engine, config), flat_partitions(engine)):
        tensors = {"weight": flat.detach()}
        if not weights_only:
            tensors.update({key: base.state[flat][key] for key in keys})
        out.append(tensors)
    return out


def before_optimizer_step(engine, hook) -> None:
    """Runs `hook()` at the start of every optimizer step of the engine: the only place where
    ZeRO changes the fp32 master weights and the optimizer state (gradients are reduced into
    buffers of their own), so a copy of them may run until then."""
    wrapper = engine.optimizer
    hooks = wrapper.__dict__.get("_pangu_step_hooks")
    if hooks is None:
        hooks = wrapper._pangu_step_hooks = []
        step = wrapper.step

        def step_after_hooks(*args, **kwargs):
            for run in hooks:
                run()
            return step(*args, **kwargs)

        wrapper.step = step_after_hooks
    hooks.append(hook)


def zero_uncovered(engine, config: Config, topology: Topology) -> None:
    """Zeroes the optimizer state of partition elements no parameter owns (ZeRO's alignment
    padding), after a checkpoint has filled every fragment of state created without zeros."""
    covered: dict[int, list[tuple[int, int]]] = {}
    for fragment in fragments(engine, config, topology):
        covered.setdefault(fragment.buffer, []).append((fragment.start, fragment.start + fragment.numel))
    for group, part in enumerate(partitions(engine, config)):
        end = 0
        gaps = []
        for start, stop in sorted(covered.get(group, [])) + [(part["weight"].numel(),) * 2]:
            if start > end:
                gaps.append((end, start))
            end = max(end, stop)
        for key, tensor in part.items():
            if key != "weight":
                for start, stop in gaps:
                    tensor[start:stop].zero_()


def refresh_model_weights(engine) -> None:
    """The model's (possibly half-precision) weights from the fp32 master partitions: each rank
    rounds its partition and the partitions are all-gathered over the data-parallel group, as
    after every optimizer step."""
    engine.optimizer.update_lp_params()


def link_optimizer_state(engine, config: Config, zeros: bool = True) -> None:
    """Lets DeepSpeed map each parameter to its fragment of the flat optimizer state. Before the
    first step the optimizer has no state: it is created (zeros, and the spec's initial scalars;
    without `zeros` uninitialised, for a checkpoint to fill: then `zero_uncovered`) so that it
    can be set. DeepSpeed links lazily, once, at its first step, before the optimizer has created
    its state, so the link is redone here."""
    spec = registry.get(config.optim.name)
    base = base_optimizer(engine)
    create = torch.zeros_like if zeros else torch.empty_like
    for keys, flat in zip(group_state_keys(engine, config), flat_partitions(engine)):
        if not base.state[flat]:
            state = {key: create(flat, dtype=torch.float32) for key in keys}
            # on the partition's device, as torch's fused optimizers need their step counts
            state.update(
                {
                    key: torch.tensor(value, dtype=torch.float32, device=flat.device)
                    for key, value in spec.scalar_state.items()
                }
            )
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
            base.state[flat][key] = torch.tensor(value, dtype=torch.float32, device=flat.device)
        group.update(values["group"])


def loss_scale_state(engine) -> dict:
    """DeepSpeed's dynamic loss scaler as {"scale", "good_steps"}: the steps since the last
    overflow (it doubles the scale when that count reaches a multiple of the window)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return {}
    return {"scale": float(scaler.cur_scale), "good_steps": int(scaler.cur_iter - scaler.last_overflow_iter - 1)}


def restore_loss_scale(engine, state: dict) -> None:
    """From {"scale", "good_steps"}, or a checkpoint written before the engine interface (which
    stored DeepSpeed's own fields)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return
    if "cur_iter" in state:  # format of older checkpoints: DeepSpeed's attributes
        state = {"scale": state["cur_scale"], "good_steps": int(state["cur_iter"] - state["last_overflow_iter"] - 1)}
    if "scale" not in state:  # written without fp16: the scale starts afresh
        return
    scaler.cur_scale = state["scale"]
    scaler.last_overflow_iter = -1
    scaler.cur_iter = state["good_steps"]


def memory_report(engine) -> dict[str, int]:
    """Bytes this rank holds for the model: parameters (as trained, e.g. bf16), the ZeRO-1 fp32
    master partitions, gradients (one buffer per parameter in the accumulation dtype) and the
    optimizer state (this rank's partition). Measured from the tensors, not from a formula."""
    params = list(engine.module.parameters())
    base = base_optimizer(engine)
    param_pointers = {p.data_ptr() for p in params}
    grad_dtype = torch.float32 if engine.bfloat16_enabled() else params[0].dtype
    return {
        "parameter_bytes": tensor_bytes(params),
        "master_weight_bytes": tensor_bytes(m for m in flat_partitions(engine) if m.data_ptr() not in param_pointers),
        "gradient_bytes": sum(p.numel() for p in params) * torch.empty((), dtype=grad_dtype).element_size(),
        "optimizer_state_bytes": tensor_bytes(
            v for state in base.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
        ),
    }


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
