"""S3 (SoftSignSGD): the docs/reference.md formulas on every code path, the lr bound, the state,
exact resume, and identical results under DeepSpeed ZeRO stage 1."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pytest
import torch

from pangu.optim.param_groups import param_groups
from pangu.optim.s3 import S3, cube_root
from pangu.optim.schedules import apply_lr_factor
from tests.helpers import run_two_processes

PATHS = {"foreach": dict(foreach=True), "single": dict(foreach=False), "fused": dict(fused=True)}


# ---------------------------------------------------------------------------------------------
# fast cube root
# ---------------------------------------------------------------------------------------------


def test_cube_root_is_accurate_over_all_magnitudes() -> None:
    exponents = torch.linspace(-149, 127.99, 20_001, dtype=torch.float64)  # subnormals to max
    x = torch.cat([torch.exp2(exponents).float(), torch.tensor([1e-45, 1.17e-38, 1.0, 8.0, 27.0, 3.4028235e38])])
    exact = x.double().pow(1 / 3)

    def max_relative_error(root: torch.Tensor) -> float:
        return ((root.double() - exact).abs() / exact).max().item()

    error = max_relative_error(cube_root(x))
    assert error < 2**-23  # within 2 ulp of fp32
    # At least as accurate as torch's own fp32 pow (whose exponent 1/3 is rounded to fp32).
    assert error <= max_relative_error(torch.pow(x, 1 / 3))
    special = torch.tensor([0.0, float("inf")])
    assert torch.equal(cube_root(special), special)


# ---------------------------------------------------------------------------------------------
# the update bound |update| <= lr, which Adam does not have
# ---------------------------------------------------------------------------------------------


def adversarial_gradients(size: int = 64) -> list[torch.Tensor]:
    """Hundreds of tiny gradients of random sign, then a huge one."""
    generator = torch.Generator().manual_seed(0)
    tiny = [1e-6 * torch.randn(size, generator=generator) for _ in range(300)]
    return tiny + [1e3 * torch.randn(size, generator=generator).sign()]


def largest_update(
    optimizer_for: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], weight_decay: float, lr: float
) -> float:
    """Largest |coordinate| of any update over the adversarial sequence, weight decay removed."""
    param = torch.nn.Parameter(torch.zeros(64))
    optimizer = optimizer_for([param])
    largest = 0.0
    for grad in adversarial_gradients():
        before = param.detach().double().clone()
        param.grad = grad.clone()
        optimizer.step()
        update = param.detach().double() - before * (1 - lr * weight_decay)
        largest = max(largest, update.abs().max().item())
    return largest


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 2.5])
def test_every_update_coordinate_is_within_lr(p: float, nesterov: bool) -> None:
    lr, weight_decay = 1e-2, 0.1
    largest = largest_update(
        lambda params: S3(params, lr=lr, p=p, nesterov=nesterov, weight_decay=weight_decay), weight_decay, lr
    )
    assert largest <= lr * (1 + 1e-5)
    assert largest > 0.05 * lr  # the huge gradient did move the weights


def test_adam_exceeds_lr_on_the_same_gradients() -> None:
    lr = 1e-2
    largest = largest_update(lambda params: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999)), 0.0, lr)
    assert largest > 1.5 * lr


# ---------------------------------------------------------------------------------------------
# the formulas
# ---------------------------------------------------------------------------------------------


def random_problem(
    seed: int, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Two parameters (one matrix, one vector) and 5 steps of gradients, some exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 6, generator=generator), torch.randn(5, generator=generator)]
    grads = []
    for _ in range(5):
        step_grads = []
        for param in params:
            grad = torch.randn(param.shape, generator=generator) * 10 ** torch.randint(
                -3, 2, param.shape, generator=generator
            )
            grad[..., 0] = 0.0
            step_grads.append(grad)
        grads.append(step_grads)
    return [p.to(dtype) for p in params], [[g.to(dtype) for g in gs] for gs in grads]


def run_s3(
    params: list[torch.Tensor], grads: list[list[torch.Tensor]], lrs: list[float], **settings: object
) -> tuple[list[torch.nn.Parameter], S3]:
    params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = S3(params, **settings)
    for lr, step_grads in zip(lrs, grads, strict=True):
        optimizer.param_groups[0]["lr"] = lr  # as the trainer does before every step
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    return params, optimizer


def reference_s3(
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    lrs: list[float],
    *,
    beta: float,
    p: float,
    nesterov: bool,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """docs/reference.md section 2, literally, one element at a time, in Python (fp64) floats."""
    thetas = [p.double().flatten().tolist() for p in params]
    ms = [[0.0] * len(t) for t in thetas]
    ss = [[0.0] * len(t) for t in thetas]
    for lr, step_grads in zip(lrs, grads, strict=True):
        for theta, m, s, grad in zip(thetas, ms, ss, step_grads, strict=True):
            for i, g in enumerate(grad.double().flatten().tolist()):
                if maximize:
                    g = -g
                m[i] = beta * m[i] + (1 - beta) * g
                s[i] = beta * s[i] + (1 - beta) * abs(g) ** p
                if nesterov:
                    n = beta * m[i] + (1 - beta) * g
                    b = (beta * s[i] + (1 - beta) * abs(g) ** p) ** (1 / p)
                else:
                    n = m[i]
                    b = s[i] ** (1 / p)
                theta[i] = theta[i] - lr * weight_decay * theta[i]
                theta[i] = theta[i] - lr * n / (b + eps)
    return thetas, ms, ss


FORMULA_CASES = [  # (nesterov, maximize, weight_decay)
    (True, False, 0.0),
    (False, False, 0.1),
    (True, True, 0.1),
    (False, True, 0.0),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 2.5])
def test_every_path_matches_the_reference_formulas(path: str, p: float) -> None:
    lrs = [1e-2, 3e-2, 2e-2, 1e-2, 5e-3]  # the lr changes between steps
    for seed, (nesterov, maximize, weight_decay) in enumerate(FORMULA_CASES):
        params, grads = random_problem(seed)
        settings = dict(beta=0.9, p=p, nesterov=nesterov, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
        result, optimizer = run_s3(params, grads, lrs, **settings, **PATHS[path])
        thetas, ms, ss = reference_s3(params, grads, lrs, **settings)
        for param, theta, m, s in zip(result, thetas, ms, ss, strict=True):
            state = optimizer.state[param]
            for actual, expected, atol in ((param, theta, 1e-6), (state["m"], m, 1e-9), (state["s"], s, 1e-12)):
                torch.testing.assert_close(
                    actual.double().flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=atol
                )


def test_p2_without_nesterov_is_adam_with_equal_betas_and_no_bias_correction() -> None:
    beta, lr, eps = 0.9, 1e-2, 1e-8
    params, grads = random_problem(seed=7)
    result, _ = run_s3(params, grads, [lr] * len(grads), beta=beta, p=2.0, nesterov=False, eps=eps)
    for index, param in enumerate(params):
        theta, m, v = param.double().clone(), torch.zeros_like(param).double(), 0.0
        for step_grads in grads:
            g = step_grads[index].double()
            m = beta * m + (1 - beta) * g
            v = beta * v + (1 - beta) * g * g
            theta = theta - lr * m / (v.sqrt() + eps)
        torch.testing.assert_close(result[index].double(), theta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_params_are_updated_in_fp32(path: str) -> None:
    """bf16 parameters get the fp32 update rounded once to bf16, state stays fp32."""
    params, grads = random_problem(seed=3, dtype=torch.bfloat16)
    settings = dict(beta=0.9, p=3.0, nesterov=True, eps=1e-8, weight_decay=0.1)
    bf16_result, optimizer = run_s3(params, grads[:1], [1e-2], **settings, **PATHS[path])
    fp32_result, _ = run_s3(
        [p.float() for p in params], [[g.float() for g in grads[0]]], [1e-2], **settings, **PATHS[path]
    )
    for low, high in zip(bf16_result, fp32_result, strict=True):
        assert low.dtype == torch.bfloat16
        assert torch.equal(low, high.to(torch.bfloat16))
    for state in optimizer.state.values():
        assert {name: t.dtype for name, t in state.items()} == {"m": torch.float32, "s": torch.float32}


# ---------------------------------------------------------------------------------------------
# state and resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_is_exactly_two_fp32_buffers_per_parameter(dtype: torch.dtype) -> None:
    params, grads = random_problem(seed=1, dtype=dtype)
    _, optimizer = run_s3(params, grads, [1e-3] * len(grads))
    state = optimizer.state_dict()["state"]
    assert len(state) == len(params)
    for index, param in enumerate(params):
        assert set(state[index]) == {"m", "s"}
        for buffer in state[index].values():
            assert buffer.dtype == torch.float32 and buffer.shape == param.shape


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_state_dict_round_trip_continues_bitwise(path: str) -> None:
    """Stop after 3 steps, save, rebuild from the file, 3 more steps == 6 steps in one go."""
    params, grads = random_problem(seed=2)
    params.append(params[0].to(torch.bfloat16))  # torch would cast its loaded state to bf16
    grads = [step_grads + [step_grads[0].to(torch.bfloat16)] for step_grads in grads[:4]]
    grads += grads[:2]
    lrs = [1e-2, 2e-2, 3e-2, 1e-2, 5e-3, 2e-3]
    settings = dict(lr=1.0, weight_decay=0.1, **PATHS[path])

    uninterrupted, _ = run_s3(params, grads, lrs, **settings)

    halfway, optimizer = run_s3(params, grads[:3], lrs[:3], **settings)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.clone()) for p in halfway]
    optimizer = S3(resumed, **settings)
    optimizer.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for lr, step_grads in zip(lrs[3:], grads[3:], strict=True):
        optimizer.param_groups[0]["lr"] = lr
        for param, grad in zip(resumed, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()

    for expected, actual in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(expected, actual)
    for state in optimizer.state.values():
        assert all(buffer.dtype == torch.float32 for buffer in state.values())


# ---------------------------------------------------------------------------------------------
# hyperparameters and arguments
# ---------------------------------------------------------------------------------------------


def test_fused_path_compiles_once_for_all_shapes_and_learning_rates() -> None:
    from torch._dynamo.utils import counters

    def run(shapes: list[tuple[int, ...]], lr: float) -> None:
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer = S3(params, lr=lr, p=2.0, fused=True)
        optimizer.step()
        optimizer.param_groups[0]["lr"] = 0.0
        before = [p.detach().clone() for p in params]
        optimizer.step()  # lr 0: nothing may move, so the new lr was read, not a baked one
        assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))

    run([(3, 5)], lr=1e-2)  # compiles, unless an earlier test did
    graphs = counters["stats"]["unique_graphs"]
    run([(7, 2), (11,), (4, 3, 2)], lr=3e-3)
    run([(100,)], lr=0.5)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(p=0.5), "p must be"),
        (dict(beta=1.0), "beta must be"),
        (dict(beta=-0.1), "beta must be"),
        (dict(lr=-1e-3), "lr must be"),
        (dict(eps=-1.0), "eps must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(fused=True, foreach=True), "at most one"),
    ],
)
def test_invalid_arguments_are_rejected(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3([torch.nn.Parameter(torch.zeros(2))], **arguments)


def test_invalid_group_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="p must be"):
        S3([{"params": [torch.nn.Parameter(torch.zeros(2))], "p": 0.0}])


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO stage 1, data parallel over 2 gloo processes
# ---------------------------------------------------------------------------------------------

ZERO_STEPS = 3
S3_SETTINGS = dict(lr=1.0, beta=0.9, p=3.0, weight_decay=0.1)  # lr is scheduled below
BASE_LR = 3e-2


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)


def make_optimizer(model: torch.nn.Module) -> S3:
    no_decay = [name for name, param in model.named_parameters() if param.ndim == 1]
    optimizer = S3(param_groups(model.named_parameters(), weight_decay=0.1, no_decay=no_decay), **S3_SETTINGS)
    for group in optimizer.param_groups:
        group["lr"] = BASE_LR
    return optimizer


def zero1_worker(rank: int, world_size: int, port: int, result_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_model()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=config)
    for step in range(ZERO_STEPS):
        apply_lr_factor(engine.optimizer.param_groups, 1 / (step + 1))
        inputs, targets = batch(step)
        mine = slice(2 * rank, 2 * rank + 2)  # each rank reads half of the global batch
        loss = torch.nn.functional.mse_loss(engine(inputs[mine]), targets[mine])
        engine.backward(loss)
        engine.step()
    # DeepSpeed 0.19.8 links each parameter to its optimizer state right after the first
    # step of param group 0, before any lazily initialising optimizer (torch's Adam included)
    # has state for groups 1, 2, ...: their safe_get_full_optimizer_state then fails with
    # "m not found in optimizer state fragment". Linking again once every group has stepped
    # fixes it; the checkpoint code needs the same.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    params = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    states = {
        name: {key: safe_get_full_optimizer_state(p, key).clone() for key in ("m", "s")}
        for name, p in engine.module.named_parameters()
    }
    if rank == 0:
        torch.save({"params": params, "states": states}, result_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_stage1_at_dp2_matches_a_single_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    result_path = str(tmp_path / "zero1.pt")
    run_two_processes(zero1_worker, result_path)
    distributed = torch.load(result_path)

    model = tiny_model()
    optimizer = make_optimizer(model)
    for step in range(ZERO_STEPS):
        apply_lr_factor(optimizer.param_groups, 1 / (step + 1))
        inputs, targets = batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    for name, param in model.named_parameters():
        torch.testing.assert_close(distributed["params"][name], param.detach(), rtol=0, atol=1e-6)
        for key in ("m", "s"):
            torch.testing.assert_close(
                distributed["states"][name][key], optimizer.state[param][key], rtol=1e-5, atol=1e-9
            )
    assert not torch.equal(distributed["params"]["0.weight"], tiny_model()[0].weight)
