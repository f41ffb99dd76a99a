"""(dp, tp, pp) and the engine are deployment choices: every layout trains the same model as one
process, on either engine, with any schedule, sequence parallelism and recomputation.

The runs are made once per test session (tests/parallel/layout_matrix.py: one torchrun launch per
world size, every case of that size in it) and the tests compare what they recorded: losses,
gradient norms (clipping set low so that it fires), final weights and optimizer state read from
pangu's layout-independent checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pangu.checkpoint.store import TensorReader
from tests.helpers import REPO, TINY_CONFIG
from tests.parallel.layout_matrix import ENGINES, LAYOUTS, LR, STEPS, name, settings

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def tensors(run: dict) -> dict[tuple[str, str], torch.Tensor]:
    reader = TensorReader(Path(run["checkpoint"]) / "tensors")
    return {(name, key): reader.read(name, key) for name in reader.names() for key in reader.keys(name)}


def assert_same_curve(run: dict, reference: dict, rel: float = 1e-5) -> None:
    assert len(run["steps"]) == len(reference["steps"])
    for ours, theirs in zip(run["steps"], reference["steps"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=rel), ours
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=rel), ours


LAYOUT_CASES = [f"{engine}-{name(layout)}" for engine in ENGINES for layout in LAYOUTS][1:]


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_every_layout_and_engine_trains_like_one_process(layout_runs, case, single_process):
    reference, run = layout_runs["deepspeed-111"], layout_runs[case]
    assert any(s["grad_norm"] > 0.3 for s in reference["steps"]), "clipping must fire for the test to mean much"
    assert_same_curve(run, reference)
    expected, got = tensors(reference), tensors(run)
    assert got.keys() == expected.keys()
    initial = tensors_at_init()
    for (param, key), value in expected.items():
        if key != "weight":
            continue
        if param.endswith("attention.key.bias"):
            # its true gradient is zero (softmax ignores it), so a sign-like optimizer moves it by
            # amplified rounding noise that differs per layout: check only the bound of lr per step
            assert (got[(param, key)] - initial[param]).abs().max() <= LR * STEPS
            continue
        torch.testing.assert_close(got[(param, key)], value, atol=1e-2 * LR, rtol=0, msg=param)


@pytest.mark.parametrize(
    "case",
    [
        "torch-interleaved_1f1b-112",
        "torch-zero_bubble-112",
        "torch-zbv-112",
        "torch-interleaved_1f1b-222",
    ],
)
def test_every_schedule_trains_like_one_process(layout_runs, case):
    """Two stages per pipeline rank (interleaved 1F1B, interleaved zero bubble, ZBV's V)."""
    assert_same_curve(layout_runs[case], layout_runs["deepspeed-111-5"])


@pytest.mark.parametrize("case", ["torch-sp-121", "torch-sp-222", "torch-sp-full-222"])
def test_sequence_parallelism_trains_like_one_process(layout_runs, case):
    run = layout_runs[case]
    assert_same_curve(run, layout_runs["deepspeed-111"])
    assert run["replicated_params_differing_across_tp"] == 0  # LayerNorms' gradients summed over tp
    # the residual stream is split over the sequence: each tp rank holds its own slice
    assert run["block_inputs_checked"] > 0 and run["block_inputs_differing_across_tp"] > 0


_INIT: dict[str, torch.Tensor] = {}


def tensors_at_init() -> dict[str, torch.Tensor]:
    """Initial weights (layout-independent by construction): rebuilt from the seed."""
    if not _INIT:
        from pangu.config import load_config
        from pangu.model.init import initialize_parameters
        from pangu.model.pangu_alpha import PanguAlpha

        config = load_config(TINY_CONFIG, settings(Path("."), Path("."), 1, 1)[3::2])
        model = PanguAlpha(config.model)
        initialize_parameters(model.named_parameters(), config.model, config.train.seed)
        _INIT.update({name: p.detach().clone() for name, p in model.named_parameters()})
    return _INIT


def test_pipeline_with_gradient_accumulation_scales_gradients_once(layout_runs):
    """DeepSpeed before 0.19.3 divided the gradient by the accumulation steps again at every
    pipeline stage boundary (deepspeedai/DeepSpeed#8152): at pp = 2 with 8 micro-batches the first
    stage's gradients came out 8 times too small. pyproject.toml requires a DeepSpeed with the
    fix; this run (pp = 2, 8 micro-batches per step) must see one process's gradient norms."""
    run = layout_runs["deepspeed-112"]
    assert run["micro_batches"] == 8
    assert_same_curve(run, layout_runs["deepspeed-111"])


def test_optimizer_state_is_sharded_over_data_parallel_ranks(layout_runs):
    """ZeRO-1 (DeepSpeed) and FSDP2 (torch) at dp = 2: each rank holds half the optimizer state."""
    one = layout_runs["deepspeed-111"]["memory"][0]["optimizer_state_bytes"]
    for engine in ENGINES:
        two = [m["optimizer_state_bytes"] for m in layout_runs[f"{engine}-211"]["memory"]]
        assert all(abs(b - one / 2) <= 0.02 * one for b in two), (engine, one, two)  # padding: a few elements


@pytest.mark.parametrize("engine", ENGINES)
def test_tensor_parallel_replicas_stay_identical(layout_runs, engine):
    for case in [f"{engine}-121", f"{engine}-222", f"{engine}-dropout-full"]:
        run = layout_runs[case]
        assert run["replicated_params_differing_across_tp"] == 0, case
        assert run["block_inputs_differing_across_tp"] == 0 and run["block_inputs_checked"] > 0, case


# ---------------------------------------------------------------------------------------------
# Resume across layouts and engines


@pytest.mark.parametrize(
    "case",
    ["deepspeed-121-from-deepspeed", "torch-412-from-deepspeed", "deepspeed-121-from-torch", "torch-412-from-torch"],
)
def test_resume_under_another_layout_and_engine(layout_runs, case):
    """A checkpoint written at (2, 2, 2) after step 2, by either engine, resumed under another
    layout by either engine, continues the one-process curve."""
    reference = {s["step"]: s for s in layout_runs["deepspeed-111"]["steps"]}
    resumed = layout_runs[case]["steps"]
    assert [s["step"] for s in resumed] == list(range(3, STEPS + 1))
    for step in resumed:
        assert step["loss"] == pytest.approx(reference[step["step"]]["loss"], rel=1e-5), step
        assert step["grad_norm"] == pytest.approx(reference[step["step"]]["grad_norm"], rel=1e-5), step


# ---------------------------------------------------------------------------------------------
# Dropout and recomputation


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_masks_do_not_depend_on_the_layout(layout_runs, engine):
    """Each layer's dropout is seeded by (seed, step, micro-batch of the global batch, layer), so
    (2, 2, 2) draws the masks one process draws. Seeded per rank instead, every pipeline stage
    would repeat the first stage's masks and data-parallel ranks would share theirs."""
    reference = layout_runs["deepspeed-hidden-dropout-111"]
    assert [s["loss"] for s in reference["steps"]] != [s["loss"] for s in layout_runs["deepspeed-111"]["steps"]]
    for case in [f"{engine}-hidden-dropout-111", f"{engine}-hidden-dropout-222"]:
        assert_same_curve(layout_runs[case], reference)


@pytest.mark.parametrize("case", ["deepspeed-dropout-full", "deepspeed-dropout-selective", "torch-dropout-full"])
def test_recompute_replays_dropout_masks(layout_runs, case):
    """Recomputation draws the masks the first forward drew (attention dropout on the tp rank's
    own stream included): losses and gradient norms bitwise those of no recomputation."""
    plain = layout_runs[case.rsplit("-", 1)[0] + "-none"]
    replayed = layout_runs[case]
    assert [s["loss"] for s in replayed["steps"]] == [s["loss"] for s in plain["steps"]]
    assert [s["grad_norm"] for s in replayed["steps"]] == [s["grad_norm"] for s in plain["steps"]]


# ---------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_tracks_fp32(layout_runs, engine):
    fp32, bf16 = layout_runs[f"{engine}-fp32-20"], layout_runs[f"{engine}-bf16-20"]
    assert bf16["memory"][0]["parameter_bytes"] * 2 == fp32["memory"][0]["parameter_bytes"]
    for a, b in zip(fp32["steps"], bf16["steps"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.01), (a, b)  # bf16 keeps ~3 significant digits
    assert bf16["steps"][-1]["loss"] < bf16["steps"][0]["loss"] - 0.3  # and it learns
    # bf16 gradients are accumulated and reduced over data-parallel ranks in fp32: the first
    # step's gradient norm at dp = 2 is one process's (reduced in bf16 it differs at ~1e-3)
    dp2 = layout_runs[f"{engine}-bf16-211"]
    assert dp2["steps"][0]["grad_norm"] == pytest.approx(bf16["steps"][0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_fp16_overflow_skips_the_step(layout_runs, engine, single_process):
    """The original recipe starts the dynamic loss scale at 2^32: the first gradients overflow in
    fp16, so the engine skips the update and halves the scale. The weights must be untouched."""
    run = layout_runs[f"{engine}-fp16-overflow"]
    assert run["steps"][0]["skipped"] is True
    assert run["loss_scale"] == 2.0**31
    initial = tensors_at_init()
    for (param, key), value in tensors(run).items():
        if key == "weight":  # the fp32 master weights are the initial ones (rounded through fp16 by DeepSpeed)
            assert torch.equal(value, initial[param].half().float()) or torch.equal(value, initial[param]), param


@pytest.mark.parametrize("engine", ENGINES)
def test_fp16_loss_scaler_survives_resume(layout_runs, engine):
    straight, first, rest = (layout_runs[f"{engine}-fp16-{part}"] for part in ("straight", "stopped", "resumed"))
    assert any(s["skipped"] for s in straight["steps"]) and not all(s["skipped"] for s in straight["steps"])
    # the dynamic scale had moved by the stop (a resume that lost it would start again from 2^20)
    assert first["loss_scale_state"] != {"scale": 2.0**20, "good_steps": 0}
    assert first["steps"] + rest["steps"] == straight["steps"]
    assert rest["loss_scale_state"] == straight["loss_scale_state"]


# ---------------------------------------------------------------------------------------------
# Multi-node launch


def test_two_node_rendezvous(tiny_corpus, layout_runs, tmp_path):
    """Two torchrun agents on this machine act as two nodes (c10d rendezvous, one process each):
    the job is data-parallel across them and trains exactly like the (2,1,1) run."""
    from pangu.parallel.topology import free_port

    port = free_port()
    launcher = REPO / "launch" / "torchrun.sh"
    env = dict(
        os.environ,
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{port}",
        RDZV_ID="pangu-test",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    args = settings(tiny_corpus, tmp_path / "run", 1, 1, "train.log_interval=1")
    nodes = [
        subprocess.Popen(
            ["bash", str(launcher), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    expected = [s["loss"] for s in layout_runs["deepspeed-211"]["steps"]]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert "(dp, tp, pp) = (2, 1, 1)" in "".join(outputs)


# ---------------------------------------------------------------------------------------------
# Scale-invariant SGD under parallelism


@pytest.mark.parametrize("engine", ENGINES)
def test_relative_clip_uses_the_same_global_norms_at_every_layout(layout_runs, engine):
    one, eight = layout_runs["deepspeed-si-111"], layout_runs[f"{engine}-si-222"]
    assert one["steps"][-1]["si_clip_events"] > 0  # C this small makes the clip fire
    for a, b in zip(one["steps"], eight["steps"]):
        for key in ("loss", "si_weight_norm", "si_grad_norm", "si_clip_ratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
        assert b["si_clip_events"] == a["si_clip_events"]
