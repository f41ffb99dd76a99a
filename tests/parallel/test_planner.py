"""The auto-parallel planner (pangu/parallel/planner.py): its memory model of the DeepSpeed engine
against the tensors of real engines, its layout enumeration and its command line (the torch
engine's model: test_planner_torch.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest

from pangu.config import load_config
from pangu.model import declaration
from pangu.model.sizes import flops_per_token, forward_flops_per_token, parameter_count
from pangu.optim.param_groups import GROUP_ORDER
from pangu.parallel import memory_model, planner, stages
from pangu.parallel.memory_model import Kernels
from pangu.parallel.planner import GiB, Layout
from pangu.schema import ConfigError, parse_bytes
from tests.helpers import PROBES, REPO

PROBE = PROBES / "memory_probe.py"
ROOT = REPO
WORLD = 4
SMALL = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.ffn_hidden_size=256",
    "model.vocab_size=600",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=16",
    "train.steps=2",
    "optim.warmup_steps=1",
]
TINY = "configs/tiny.yaml"
# (name, overrides): layouts (dp, tp, pp) of WORLD ranks, every precision, every recompute mode,
# dropout, and sgd_si (no optimizer state for the scale-invariant trunk); SMALL, or the quickstart's
# model when the name starts with TINY
CASES = [
    (
        f"{TINY} bf16 (2,2,1) selective",
        ["parallel.tp=2", "train.precision=bf16", "parallel.recompute=selective", "train.micro_batch_size=2"],
    ),
    ("fp32 (2,2,1)", ["parallel.tp=2", "parallel.pp=1"]),
    ("bf16 (2,1,2)", ["parallel.tp=1", "parallel.pp=2", "train.precision=bf16"]),
    (
        "bf16 (1,2,2) recompute full",
        ["parallel.tp=2", "parallel.pp=2", "train.precision=bf16", "parallel.recompute=full"],
    ),
    (
        "fp32 (1,2,2) recompute selective, dropout",
        ["parallel.tp=2", "parallel.pp=2", "parallel.recompute=selective", "model.dropout=0.1"],
    ),
    ("fp16 (4,1,1)", ["train.precision=fp16"]),
    (
        "sgd_si (2,1,2)",
        ["parallel.pp=2", "model.scale_invariant=true", "model.final_layernorm=after", "optim.name=sgd_si"],
    ),
]
EXACT = ("parameters", "gradients", "master_weights", "optimizer_state")


def case(name: str, overrides: list[str]) -> dict:
    overrides = ["parallel.engine=deepspeed", *overrides]  # the engine whose buffers the probe measures
    if name.startswith(TINY):
        return {"name": name, "config": str(ROOT / TINY), "overrides": overrides}
    return {"name": name, "config": None, "overrides": [*SMALL, *overrides]}


def case_config(name: str, overrides: list[str]):
    spec = case(name, overrides)
    return load_config(spec["config"], spec["overrides"])


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("memory") / "measured.json"
    cases = [case(name, overrides) for name, overrides in CASES]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        str(PROBE),
        str(out),
        json.dumps(cases),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def predicted(config, rank: dict) -> memory_model.StageMemory:
    dp, tp, pp = rank["layout"]
    mbs = config.train.micro_batch_size
    layout = Layout(
        dp, tp, pp, config.parallel.recompute, mbs, config.train.global_batch_size // (dp * mbs), "deepspeed"
    )
    return memory_model.stage_memory(config, layout, rank["stage"], Kernels.cpu())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name,overrides", CASES, ids=[name for name, _ in CASES])
def test_memory_model_matches_the_engine(measured, name, overrides):
    """Parameters, gradients, fp32 master and optimizer state: exact, on every rank. Activations
    (saved-tensor hooks): one micro-batch's forward and the peak of a real 1F1B step within 20%."""
    config = case_config(name, overrides)
    for rank in measured[name]:
        model = predicted(config, rank)
        where = f"{name}, rank {rank['rank']} (stage {rank['stage']})"
        for key in EXACT:
            assert rank["tensors"][key] == getattr(model, key), f"{where}: {key}"
        forward_error = rank["saved_forward"] / model.activations_per_micro_batch - 1
        peak_error = rank["saved_peak"] / model.saved_activations - 1
        assert abs(forward_error) < 0.2, (
            f"{where}: one forward saves {rank['saved_forward']} B, model {model.activations_per_micro_batch} B"
        )
        assert abs(peak_error) < 0.2, f"{where}: peak {rank['saved_peak']} B, model {model.saved_activations} B"
        print(f"{where}: activations forward {forward_error:+.2%}, step peak {peak_error:+.2%}")


@pytest.mark.slow
@pytest.mark.distributed
def test_zero1_partitions_only_the_optimizer_side(measured):
    """At dp = 4 each rank keeps a quarter of the fp32 master and optimizer state, all of the rest."""
    ranks = measured["fp16 (4,1,1)"]
    numel = ranks[0]["tensors"]["parameters"] // 2
    masters = {r["tensors"]["master_weights"] for r in ranks}
    assert len(masters) == 1  # equal shares, padded to 2 x dp elements per parameter group
    assert 4 * numel <= masters.pop() * len(ranks) <= 4 * (numel + len(GROUP_ORDER) * 2 * len(ranks))
    assert all(r["tensors"]["optimizer_state"] == 2 * r["tensors"]["master_weights"] for r in ranks)
    assert all(r["tensors"]["gradients"] == ranks[0]["tensors"]["parameters"] for r in ranks)


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/2.6b.yaml", "configs/13b.yaml", "configs/200b.yaml"])
@pytest.mark.parametrize("scale_invariant", [False, True])
def test_pipeline_layers_hold_the_whole_model(path, scale_invariant):
    """The planner's layer list (what each stage holds) adds up to the model's parameters (the
    tied head counted once, the vocabulary padding not) and to its FLOPs per token."""
    extra = ["model.scale_invariant=true", "model.final_layernorm=after"] if scale_invariant else []
    config = load_config(ROOT / path, extra)
    model = config.model
    layers = memory_model.pipeline_layers(config, 1)
    padding = (model.padded_vocab_size - model.vocab_size) * model.hidden_size
    assert sum(layer.numel for layer in layers if layer.kind != "head") - padding == parameter_count(model)
    forward = sum(forward_flops_per_token(model, layer) for layer in declaration.layers(model))
    assert 3 * forward == flops_per_token(model)


def test_stage_partition_is_deepspeeds():
    from deepspeed.runtime.utils import partition_balanced

    rng = random.Random(0)
    for _ in range(200):
        weights = [rng.choice([1, 5, 100, 1000]) for _ in range(rng.randint(1, 30))]
        parts = rng.randint(1, 12)
        assert stages._partition_balanced(weights, parts) == partition_balanced(weights, parts), (weights, parts)


def test_layouts_divide_the_devices_the_model_and_the_batch():
    config = case_config("small", [])
    layouts = planner.enumerate_layouts(config, 8)
    assert layouts
    for lay in layouts:
        assert lay.dp * lay.tp * lay.pp == 8
        assert lay.dp * lay.micro_batch_size * lay.micro_batches == config.train.global_batch_size
        assert config.model.num_heads % lay.tp == 0 and lay.pp * lay.virtual_stages <= config.model.num_layers
        # the printed overrides make a valid config that trains with this layout
        tuned = load_config(None, [*SMALL, *lay.overrides()])
        assert planner.Layout.of_config(tuned, 8) == lay
    assert {(lay.tp, lay.pp) for lay in layouts} >= {(1, 1), (2, 2), (4, 1), (1, 4), (2, 4)}
    torch = {(lay.schedule, lay.virtual_stages, lay.sequence_parallel) for lay in layouts if lay.engine == "torch"}
    assert torch >= {("1f1b", 1, False), ("1f1b", 1, True), ("interleaved_1f1b", 2, True), ("zero_bubble", 2, False)}
    assert {lay.schedule for lay in layouts if lay.engine == "deepspeed"} == {"1f1b"}
    # torch's 1F1B needs as many micro-batches as stages: at pp = 4 and dp = 2 that is mbs <= 2
    assert not [
        lay for lay in layouts if lay.engine == "torch" and lay.schedule == "1f1b" and lay.micro_batches < lay.pp
    ]


def test_more_memory_never_fits_fewer_layouts_and_recompute_saves_activations():
    config = load_config(ROOT / "configs/2.6b.yaml", [])
    fits = [len(planner.plan(config, planner.Hardware(64, size * GiB))) for size in (8, 16, 80)]
    assert fits[0] <= fits[1] <= fits[2] and fits[2] > 0
    for engine in planner.ENGINES:
        layout = Layout(8, 8, 1, "none", 8, 8, engine)
        activations = {
            mode: memory_model.estimate_memory(config, dataclasses.replace(layout, recompute=mode)).activations
            for mode in planner.RECOMPUTE_MODES
        }
        assert activations["full"] < activations["selective"] <= activations["none"], engine
        no_flash = memory_model.estimate_memory(config, layout, Kernels(flash_attention=False))
        assert no_flash.activations > memory_model.estimate_memory(config, layout).activations


def test_a_short_plan_is_the_head_of_the_whole_plan():
    """The memory is estimated in order of step time: the fastest few are those of the whole list."""
    config = load_config(ROOT / "configs/2.6b.yaml", [])
    hardware = planner.Hardware(64, 24 * GiB)
    whole = planner.plan(config, hardware)
    assert planner.plan(config, hardware, limit=5) == whole[:5]
    times = [lay.step_time.total for lay in whole]
    assert times == sorted(times) and all(lay.memory.peak <= hardware.usable_memory for lay in whole)


def run_plan(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pangu.cli", "plan", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


@pytest.mark.parametrize("gpus", [2**61 - 1, 2**40, 10**30, 509], ids=["a huge prime", "2^40", "10^30", "a prime"])
def test_plan_answers_within_seconds_for_any_device_count(gpus):
    """The layouts are found from the divisors of the heads, layers and batch, never by counting
    to the device count."""
    done = run_plan("--config", "configs/2.6b.yaml", "--gpus", str(gpus), "--gpu-memory", "80GiB", timeout=30)
    assert done.returncode == 1 and f"no layout of {gpus} devices divides the model" in done.stderr


def test_plan_for_pangu_2_6b_on_its_512_devices():
    done = run_plan("--config", "configs/2.6b.yaml", "--gpus", "512", "--gpu-memory", "32GiB", "--top", "3")
    assert done.returncode == 0, done.stderr
    assert "2.63B parameters" in done.stdout
    assert "the config's own layout (torch dp=64 tp=8 pp=1" in done.stdout
    lines = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("  #")]
    assert len(lines) == 3
    for line in lines:  # each is one --set with every value a layout needs, making a valid config
        assert line.startswith("--set parallel.engine=")
        config = load_config(ROOT / "configs/2.6b.yaml", line.removeprefix("--set ").split())
        assert planner.Layout.of_config(config, 512) is not None
    listed = run_plan("--config", "configs/2.6b.yaml", "--gpus", "512", "--gpu-memory", "32GiB", "--json")
    plan = json.loads(listed.stdout)
    assert plan["parameters"] == parameter_count(load_config(ROOT / "configs/2.6b.yaml", []).model)
    times = [lay["step_time"]["total"] for lay in plan["layouts"]]
    assert times == sorted(times)
    assert all(lay["memory"]["peak"] <= plan["usable_memory_bytes"] for lay in plan["layouts"])
    assert {lay["engine"] for lay in plan["layouts"]} == {"torch", "deepspeed"}


def test_plan_says_when_nothing_fits_and_rejects_bad_input():
    done = run_plan("--config", "configs/200b.yaml", "--gpus", "8", "--gpu-memory", "80GiB")
    assert done.returncode == 1
    assert "none of the" in done.stderr and "GiB per device" in done.stderr
    bad_size = run_plan("--config", "configs/tiny.yaml", "--gpus", "8", "--gpu-memory", "eighty")
    assert bad_size.returncode == 2 and "is not a size" in bad_size.stderr
    no_memory = run_plan("--config", "configs/tiny.yaml", "--gpus", "8", "--gpu-memory", "0")
    assert no_memory.returncode == 2 and "--gpu-memory = 0 bytes is not allowed" in no_memory.stderr
    with pytest.raises(ConfigError, match="--gpus"):
        planner.plan(load_config(ROOT / "configs/tiny.yaml", []), planner.Hardware(0, 80 * GiB))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("80GiB", 80 * GiB),
        ("32GB", 32 * 10**9),
        ("1.5TiB", int(1.5 * 2**40)),
        ("81920MiB", 80 * GiB),
        ("1000", 1000),
        ("80G", 80 * 10**9),
        ("8e10", 8 * 10**10),
        ("500 MB", 500 * 10**6),
    ],
)
def test_memory_sizes(text, expected):
    assert parse_bytes(text) == expected
