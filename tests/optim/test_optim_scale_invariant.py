"""ScaleInvariantSGD (SGD + weight decay + relative clip on the scale-invariant group, S3 or
AdamW elsewhere) and the param_groups helper that builds its groups."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable

import pytest
import torch

from pangu.optim.param_groups import param_groups
from pangu.optim.s3 import S3
from pangu.optim.scale_invariant import ScaleInvariantSGD
from tests.helpers import run_two_processes

LR, WEIGHT_DECAY = 0.1, 0.01


def trunk_and_head(seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.nn.Parameter]:
    """Two scale-invariant tensors (the trunk) and one ordinary one (the head)."""
    generator = torch.Generator().manual_seed(seed)
    trunk = [
        torch.nn.Parameter(torch.randn(4, 5, generator=generator)),
        torch.nn.Parameter(torch.randn(6, generator=generator)),
    ]
    head = torch.nn.Parameter(torch.randn(3, 4, generator=generator))
    return trunk, head


def si_optimizer(trunk: list[torch.nn.Parameter], head: torch.nn.Parameter, **settings: object) -> ScaleInvariantSGD:
    groups = [{"params": trunk, "scale_invariant": True}, {"params": [head]}]
    return ScaleInvariantSGD(groups, **{"lr": LR, "weight_decay": WEIGHT_DECAY, **settings})


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().square().sum().item() for t in tensors))


def applied_gradients(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[torch.Tensor]:
    """g such that after = (1 - lr wd) before - lr g, solved in fp64."""
    return [((1 - LR * WEIGHT_DECAY) * b.double() - a.double()) / LR for b, a in zip(before, after, strict=True)]


def threshold(weights: list[torch.Tensor], clip_c: float = 4.0) -> float:
    return math.sqrt(clip_c) * math.sqrt(2 * WEIGHT_DECAY / LR) * global_norm(weights)


# ---------------------------------------------------------------------------------------------
# the scale-invariant group
# ---------------------------------------------------------------------------------------------


def test_clip_fires_on_a_large_gradient_and_leaves_exactly_the_threshold_norm() -> None:
    trunk, head = trunk_and_head()
    grads = [100 * torch.randn_like(p) for p in trunk]
    before = [p.detach().clone() for p in trunk]
    thr, grad_norm = threshold(before), global_norm(grads)
    assert grad_norm > thr
    optimizer = si_optimizer(trunk, head)
    for param, grad in zip(trunk, grads, strict=True):
        param.grad = grad
    optimizer.step()

    applied = applied_gradients(before, [p.detach() for p in trunk])
    assert global_norm(applied) == pytest.approx(thr, rel=1e-5)
    for used, grad in zip(applied, grads, strict=True):  # same direction, scaled by thr / ||g||
        torch.testing.assert_close(used, grad.double() * thr / grad_norm, rtol=1e-4, atol=1e-5)
    assert optimizer.clip_events == 1
    assert optimizer.last_clip_ratio == pytest.approx(thr / grad_norm, rel=1e-6)
    assert optimizer.last_weight_norm == pytest.approx(global_norm(before), rel=1e-6)
    assert optimizer.last_grad_norm == pytest.approx(grad_norm, rel=1e-6)


@pytest.mark.parametrize("gradient_scale, clip_c", [(0.01, 4.0), (100.0, 0.0)])
def test_unclipped_step_is_exactly_sgd_with_decoupled_weight_decay(gradient_scale: float, clip_c: float) -> None:
    """A small gradient is never clipped, and clip_c=0 turns clipping off for any gradient."""
    trunk, head = trunk_and_head()
    generator = torch.Generator().manual_seed(1)
    grads = [gradient_scale * torch.randn(p.shape, generator=generator) for p in trunk]
    before = [p.detach().clone() for p in trunk]
    optimizer = si_optimizer(trunk, head, clip_c=clip_c)
    for param, grad in zip(trunk, grads, strict=True):
        param.grad = grad
    optimizer.step()

    for param, x, g in zip(trunk, before, grads, strict=True):
        expected = (1 - LR * WEIGHT_DECAY) * x.double() - LR * g.double()
        # exact up to the float32 rounding of the two terms (a few ulp of the larger one)
        rounding = 2.0**-22 * ((1 - LR * WEIGHT_DECAY) * x.double().abs() + LR * g.double().abs())
        assert bool(((param.detach().double() - expected).abs() <= rounding).all())
    assert optimizer.clip_events == 0
    assert optimizer.last_clip_ratio == 1.0


def run_steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def test_other_groups_are_updated_by_s3_exactly_as_the_s3_optimizer() -> None:
    trunk, head = trunk_and_head()
    alone = torch.nn.Parameter(head.detach().clone())
    settings = dict(beta=0.9, p=3.0, nesterov=True, eps=1e-8)
    run_steps(si_optimizer(trunk, head, **settings), [*trunk, head], steps=4)
    run_steps(
        S3([alone], lr=LR, weight_decay=WEIGHT_DECAY, **settings), [*trunk, alone], steps=4
    )  # same gradient stream
    assert torch.equal(head, alone)


def test_other_groups_with_adamw_match_torch_adamw() -> None:
    trunk, head = trunk_and_head()
    alone = torch.nn.Parameter(head.detach().clone())
    run_steps(si_optimizer(trunk, head, other="adamw", betas=(0.9, 0.95), eps=1e-8), [*trunk, head], steps=4)
    adamw = torch.optim.AdamW([alone], lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.95), eps=1e-8)
    run_steps(adamw, [*trunk, alone], steps=4)
    torch.testing.assert_close(head.detach(), alone.detach(), rtol=1e-6, atol=1e-7)


def test_stepping_one_group_at_a_time_like_deepspeed_gives_the_same_result() -> None:
    """ZeRO-1 swaps param_groups for a one-group list and calls step() once per group."""
    trunk, head = trunk_and_head()
    trunk_copy = [torch.nn.Parameter(p.detach().clone()) for p in trunk]
    head_copy = torch.nn.Parameter(head.detach().clone())
    together = si_optimizer(trunk, head)
    one_by_one = si_optimizer(trunk_copy, head_copy)
    for step in range(3):
        scale = 100.0 if step == 1 else 0.1  # the clip fires on step 1 only
        for params in ([*trunk, head], [*trunk_copy, head_copy]):
            generator = torch.Generator().manual_seed(step)
            for param in params:
                param.grad = scale * torch.randn(param.shape, generator=generator)
        together.step()
        all_groups = one_by_one.param_groups
        for group in all_groups:
            one_by_one.param_groups = [group]
            one_by_one.step()
        one_by_one.param_groups = all_groups
    for expected, actual in zip([*trunk, head], [*trunk_copy, head_copy], strict=True):
        assert torch.equal(expected, actual)
    assert together.clip_events == one_by_one.clip_events == 1
    assert [g["step"] for g in one_by_one.param_groups] == [3, 3]


@pytest.mark.parametrize("other", ["s3", "adamw"])
def test_state_dict_round_trip_continues_bitwise(other: str) -> None:
    trunk, head = trunk_and_head()
    uninterrupted = si_optimizer(trunk, head, other=other)
    run_steps(uninterrupted, [*trunk, head], steps=5)

    trunk_2, head_2 = trunk_and_head()
    first_half = si_optimizer(trunk_2, head_2, other=other)
    generator_seed = 1
    run_steps(first_half, [*trunk_2, head_2], steps=2, seed=generator_seed)
    buffer = io.BytesIO()
    torch.save(first_half.state_dict(), buffer)
    resumed = si_optimizer(trunk_2, head_2, other=other)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    # Continue the same gradient stream: regenerate it and skip the 2 steps already taken.
    generator = torch.Generator().manual_seed(generator_seed)
    params = [*trunk_2, head_2]
    for step in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        if step < 2:
            continue
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        resumed.step()

    for expected, actual in zip([*trunk, head], params, strict=True):
        assert torch.equal(expected, actual)
    assert [g["step"] for g in resumed.param_groups] == [5, 5]


@pytest.mark.parametrize(
    "groups, settings, message",
    [
        ([{"scale_invariant": True}, {"scale_invariant": True}], {}, "only one group"),
        ([{"scale_invariant": True, "weight_decay": 0.0}], {}, "needs weight_decay > 0"),
        ([{}], {"other": "sgd"}, "other must be"),
        ([{}], {"clip_c": -1.0}, "clip_c must be"),
        ([{"p": 0.5}], {}, "p must be"),
        ([{}], {"other": "adamw", "betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_invalid_settings_are_rejected(groups: list[dict], settings: dict, message: str) -> None:
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], **g} for g in groups]
    with pytest.raises(ValueError, match=message):
        ScaleInvariantSGD(groups, **{"lr": LR, "weight_decay": WEIGHT_DECAY, **settings})


# ---------------------------------------------------------------------------------------------
# global norms across processes
# ---------------------------------------------------------------------------------------------


ZERO_STEPS = 3


def si_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def si_model_optimizer(model: torch.nn.Module) -> ScaleInvariantSGD:
    """The first layer is the scale-invariant trunk, the last one the head (trained by S3)."""
    groups = param_groups(
        model.named_parameters(),
        weight_decay=0.1,
        no_decay=["2.bias"],
        scale_invariant={"0.weight"},
        scale_invariant_lr=LR,
        scale_invariant_weight_decay=WEIGHT_DECAY,
    )
    return ScaleInvariantSGD(groups, lr=1e-2, weight_decay=0.1)


def loss_at(step: int, model: Callable[[torch.Tensor], torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    inputs, targets = torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)
    scale = 10.0 if step == 1 else 1.0  # a gradient spike on step 1: the clip fires there only
    return scale * torch.nn.functional.mse_loss(model(inputs[rows]), targets[rows])


def zero1_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    """ZeRO-1 gives each rank half of the flat trunk: the norms need the all-reduce."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = si_model()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=si_model_optimizer(model), config=config)
    trunk_partition = optimizer.optimizer.param_groups[-1]["params"][0]
    norms = []
    for step in range(ZERO_STEPS):
        engine.backward(loss_at(step, engine, rows=slice(2 * rank, 2 * rank + 2)))
        engine.step()
        norms.append((optimizer.optimizer.last_weight_norm, optimizer.optimizer.last_grad_norm))
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "norms": norms,
            "clip_events": optimizer.optimizer.clip_events,
            "trunk_partition_numel": trunk_partition.numel(),
        },
        os.path.join(result_dir, f"rank{rank}.pt"),
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_stage1_at_dp2_matches_a_single_process(tmp_path, monkeypatch) -> None:
    """The trunk's norms are global (SUM over ranks), so ZeRO-1 at dp=2 changes nothing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_two_processes(zero1_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    model = si_model()
    optimizer = si_model_optimizer(model)
    norms = []
    for step in range(ZERO_STEPS):
        optimizer.zero_grad()
        loss_at(step, model).backward()
        optimizer.step()
        norms.append((optimizer.last_weight_norm, optimizer.last_grad_norm))
    assert optimizer.clip_events == 1

    for result in ranks:
        assert result["trunk_partition_numel"] == model[0].weight.numel() // 2
        assert result["norms"] == [pytest.approx(pair, rel=1e-6) for pair in norms]
        assert result["clip_events"] == 1
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["params"][name], param.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# param_groups
# ---------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.layernorm = torch.nn.LayerNorm(4)
        self.dense = torch.nn.Linear(4, 4)
        self.final_norm_scale = torch.nn.Parameter(torch.ones(1, 4))  # 2-D, but a norm
        self.frozen = torch.nn.Parameter(torch.ones(4, 4), requires_grad=False)


def names_by_group(groups: list[dict], model: torch.nn.Module) -> dict[str, list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


NO_DECAY = ["final_norm_scale", "layernorm.weight", "layernorm.bias", "dense.bias"]


def test_no_decay_parameters_get_no_weight_decay() -> None:
    model = Block()
    groups = param_groups(model.named_parameters(), weight_decay=0.1, no_decay=NO_DECAY)
    assert names_by_group(groups, model) == {
        "decay": ["embedding.weight", "dense.weight"],
        "no_decay": ["final_norm_scale", "layernorm.weight", "layernorm.bias", "dense.bias"],
    }
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert not any(g.get("scale_invariant") for g in groups)


def test_scale_invariant_parameters_get_their_own_group_with_weight_decay() -> None:
    model = Block()
    groups = param_groups(
        model.named_parameters(),
        weight_decay=0.1,
        no_decay=NO_DECAY,
        scale_invariant={"dense.weight", "dense.bias"},
        scale_invariant_lr=8e-4,
        scale_invariant_weight_decay=1e-2,
    )
    assert names_by_group(groups, model) == {
        "decay": ["embedding.weight"],
        "no_decay": ["final_norm_scale", "layernorm.weight", "layernorm.bias"],
        "scale_invariant": ["dense.weight", "dense.bias"],
    }
    trunk = groups[-1]
    assert trunk["scale_invariant"] is True
    assert (trunk["lr"], trunk["weight_decay"]) == (8e-4, 1e-2)
    ScaleInvariantSGD(groups, lr=1e-3, weight_decay=0.1)  # accepted as they are


def test_empty_groups_are_left_out_and_unknown_names_rejected() -> None:
    model = torch.nn.Linear(3, 3, bias=False)
    groups = param_groups(model.named_parameters(), weight_decay=0.1, no_decay=[])
    assert [g["name"] for g in groups] == ["decay"]
    with pytest.raises(ValueError, match="weihgt"):
        param_groups(model.named_parameters(), 0.1, no_decay=[], scale_invariant={"weihgt"})
    with pytest.raises(ValueError, match="bais"):
        param_groups(model.named_parameters(), 0.1, no_decay=["bais"])
