"""(dp, tp, pp) is a deployment choice: every layout trains the same model as one process.

Each layout is launched once (tests/probes/parallel_probe.py under torchrun, gloo on the CPU) and the
tests compare what the runs recorded: losses, gradient norms (clipping set low so that it fires),
final weights and optimizer state read from pangu's layout-independent checkpoints.
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
from tests.helpers import PROBES, REPO, TINY_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
STEPS = 5
LR = 3e-3
PROBE = PROBES / "parallel_probe.py"


def settings(corpus: Path, out: Path, tp: int, pp: int, *extra: str) -> list[str]:
    values = [
        f"data.prepared_dir={corpus}",
        f"train.output_dir={out}",
        "model.num_layers=3",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.ffn_hidden_size=128",
        "model.vocab_size=600",
        "model.seq_length=32",
        "model.dropout=0.0",
        f"train.steps={STEPS}",
        "train.micro_batch_size=1",
        "train.global_batch_size=8",
        f"optim.lr={LR}",
        "optim.warmup_steps=2",
        "optim.grad_clip=0.3",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        *extra,
    ]
    return ["--config", TINY_CONFIG] + [arg for value in values for arg in ("--set", value)]


def probe(corpus: Path, out: Path, layout: tuple[int, int, int], *extra: str) -> dict:
    dp, tp, pp = layout
    result_file = out / "probe.json"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={dp * tp * pp}",
        str(PROBE),
        str(result_file),
        *settings(corpus, out, tp, pp, *extra),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"layout {layout} failed:\n{done.stderr[-4000:]}"
    return json.loads(result_file.read_text())


@pytest.fixture(scope="session")
def layout_runs(tiny_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    runs = {layout: probe(tiny_corpus, root / "x".join(map(str, layout)), layout) for layout in LAYOUTS}
    # dropout: hidden dropout only (attention probabilities are split over heads under tp)
    hidden = ("model.dropout=0.1", "model.attention_dropout=0.0")
    runs["dropout-111"] = probe(tiny_corpus, root / "dropout-111", (1, 1, 1), *hidden)
    runs["dropout-222"] = probe(tiny_corpus, root / "dropout-222", (2, 2, 2), *hidden)
    # every dropout, recomputed or not, at (2, 2, 2)
    for mode in ("none", "full", "selective"):
        runs[f"dropout-{mode}"] = probe(
            tiny_corpus, root / f"dropout-{mode}", (2, 2, 2), "model.dropout=0.1", f"parallel.recompute={mode}"
        )
    return runs


def tensors(run: dict) -> dict[tuple[str, str], torch.Tensor]:
    reader = TensorReader(Path(run["checkpoint"]) / "tensors")
    return {(name, key): reader.read(name, key) for name in reader.names() for key in reader.keys(name)}


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_layout_trains_like_one_process(layout_runs, layout, single_process):
    reference, run = layout_runs[(1, 1, 1)], layout_runs[layout]
    assert any(s["grad_norm"] > 0.3 for s in reference["steps"]), "clipping must fire for the test to mean much"
    for ours, theirs in zip(run["steps"], reference["steps"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), ours
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), ours
    expected, got = tensors(reference), tensors(run)
    assert got.keys() == expected.keys()
    initial = tensors_at_init()
    for (name, key), value in expected.items():
        if key != "weight":
            continue
        if name.endswith("attention.key.bias"):
            # its true gradient is zero (softmax ignores it), so a sign-like optimizer moves it by
            # amplified rounding noise that differs per layout: check only the bound of lr per step
            assert (got[(name, key)] - initial[name]).abs().max() <= LR * STEPS
            continue
        torch.testing.assert_close(got[(name, key)], value, atol=1e-2 * LR, rtol=0, msg=name)


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
    reference, run = layout_runs[(1, 1, 1)], layout_runs[(1, 1, 2)]
    assert run["micro_batches"] == 8
    for ours, theirs in zip(run["steps"], reference["steps"]):
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), ours


def test_zero1_halves_optimizer_state_at_dp2(layout_runs):
    one = layout_runs[(1, 1, 1)]["memory"][0]["optimizer_state_bytes"]
    two = [m["optimizer_state_bytes"] for m in layout_runs[(2, 1, 1)]["memory"]]
    assert all(abs(b - one / 2) <= 64 for b in two), (one, two)  # ZeRO pads partitions by a few bytes


def test_tensor_parallel_replicas_stay_identical(layout_runs):
    for layout in [(1, 2, 1), (2, 2, 2), "dropout-full", "dropout-selective"]:
        run = layout_runs[layout]
        assert run["replicated_params_differing_across_tp"] == 0, layout
        assert run["block_inputs_differing_across_tp"] == 0 and run["block_inputs_checked"] > 0, layout


# ---------------------------------------------------------------------------------------------
# Resume across layouts


@pytest.fixture(scope="session")
def cross_layout_runs(tiny_corpus, tmp_path_factory) -> dict:
    """Saved at (2,2,2) after step 2, resumed at (1,2,1) and at (4,1,2)."""
    import shutil

    root = tmp_path_factory.mktemp("cross")
    probe(tiny_corpus, root / "saved", (2, 2, 2), "train.stop_at=2")
    runs = {}
    for layout in [(1, 2, 1), (4, 1, 2)]:
        out = root / "x".join(map(str, layout))
        shutil.copytree(root / "saved" / "checkpoints", out / "checkpoints")
        runs[layout] = probe(tiny_corpus, out, layout)
    return runs


@pytest.mark.parametrize("layout", [(1, 2, 1), (4, 1, 2)], ids=str)
def test_resume_under_another_layout(cross_layout_runs, layout_runs, layout):
    reference = {s["step"]: s for s in layout_runs[(1, 1, 1)]["steps"]}
    resumed = cross_layout_runs[layout]["steps"]
    assert [s["step"] for s in resumed] == list(range(3, STEPS + 1))
    for step in resumed:
        assert step["loss"] == pytest.approx(reference[step["step"]]["loss"], rel=1e-5), step
        assert step["grad_norm"] == pytest.approx(reference[step["step"]]["grad_norm"], rel=1e-5), step


# ---------------------------------------------------------------------------------------------
# Dropout and recomputation


def test_dropout_masks_do_not_depend_on_the_layout(layout_runs):
    """Each layer's dropout is seeded by (seed, step, micro-batch of the global batch, layer), so
    (2, 2, 2) draws the masks one process draws. Seeded per rank instead, every pipeline stage
    would repeat the first stage's masks and data-parallel ranks would share theirs."""
    reference, run = layout_runs["dropout-111"], layout_runs["dropout-222"]
    assert [s["loss"] for s in reference["steps"]] != [s["loss"] for s in layout_runs[(1, 1, 1)]["steps"]]
    for ours, theirs in zip(run["steps"], reference["steps"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), ours
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), ours


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_replays_dropout_masks(layout_runs, mode):
    """Recomputation draws the masks the first forward drew (attention dropout on the tp rank's
    own stream included): losses and gradient norms bitwise those of no recomputation."""
    plain, replayed = layout_runs["dropout-none"], layout_runs[f"dropout-{mode}"]
    assert [s["loss"] for s in replayed["steps"]] == [s["loss"] for s in plain["steps"]]
    assert [s["grad_norm"] for s in replayed["steps"]] == [s["grad_norm"] for s in plain["steps"]]
    assert replayed["replicated_params_differing_across_tp"] == 0
    assert replayed["block_inputs_differing_across_tp"] == 0


# ---------------------------------------------------------------------------------------------
# Precision


def test_bf16_tracks_fp32(tiny_corpus, tmp_path):
    steps = ["train.steps=20", "optim.warmup_steps=5"]
    fp32 = probe(tiny_corpus, tmp_path / "fp32", (1, 1, 1), *steps)
    bf16 = probe(tiny_corpus, tmp_path / "bf16", (1, 1, 1), *steps, "train.precision=bf16")
    assert bf16["memory"][0]["parameter_bytes"] * 2 == fp32["memory"][0]["parameter_bytes"]
    for a, b in zip(fp32["steps"], bf16["steps"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.01), (a, b)  # bf16 keeps ~3 significant digits
    assert bf16["steps"][-1]["loss"] < bf16["steps"][0]["loss"] - 0.3  # and it learns
    # bf16 gradients are accumulated and reduced over data-parallel ranks in fp32: the first
    # step's gradient norm at dp = 2 is one process's (reduced in bf16 it differs at ~1e-3)
    dp2 = probe(tiny_corpus, tmp_path / "bf16-dp2", (2, 1, 1), "train.steps=2", "train.precision=bf16")
    assert dp2["steps"][0]["grad_norm"] == pytest.approx(bf16["steps"][0]["grad_norm"], rel=1e-5)


def test_fp16_overflow_skips_the_step(tiny_corpus, tmp_path, single_process):
    """The original recipe starts the dynamic loss scale at 2^32: the first gradients overflow in
    fp16, so DeepSpeed skips the update and halves the scale. The weights must be untouched."""
    run = probe(
        tiny_corpus, tmp_path / "fp16", (1, 1, 1), "train.precision=fp16", "train.steps=1", "optim.warmup_steps=0"
    )
    assert run["steps"][0]["skipped"] is True
    assert run["loss_scale"] == 2.0**31
    initial = tensors_at_init()
    for (name, key), value in tensors(run).items():
        if key == "weight":  # DeepSpeed builds the fp32 master weights from the fp16 module
            assert torch.equal(value, initial[name].half().float()), name


def test_fp16_loss_scaler_survives_resume(tiny_corpus, tmp_path):
    fp16 = ["train.precision=fp16", "train.initial_loss_scale_power=20", "train.loss_scale_window=2", "train.steps=6"]
    straight = probe(tiny_corpus, tmp_path / "straight", (1, 1, 1), *fp16)
    first = probe(tiny_corpus, tmp_path / "stopped", (1, 1, 1), *fp16, "train.stop_at=3")
    rest = probe(tiny_corpus, tmp_path / "stopped", (1, 1, 1), *fp16)
    assert any(s["skipped"] for s in straight["steps"]) and not all(s["skipped"] for s in straight["steps"])
    assert first["loss_scale"] != straight["loss_scale"]  # the scale moved after step 3
    assert first["steps"] + rest["steps"] == straight["steps"]
    assert rest["loss_scale"] == straight["loss_scale"]


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
    expected = [s["loss"] for s in layout_runs[(2, 1, 1)]["steps"]]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert "(dp, tp, pp) = (2, 1, 1)" in "".join(outputs)


# ---------------------------------------------------------------------------------------------
# Scale-invariant SGD under parallelism


def test_relative_clip_uses_the_same_global_norms_at_every_layout(tiny_corpus, tmp_path):
    recipe = [
        "model.scale_invariant=true",
        "model.final_layernorm=after",
        "optim.name=sgd_si",
        "optim.si_lr=0.05",
        "optim.si_weight_decay=0.1",
        "optim.si_clip_c=1e-4",
    ]
    one = probe(tiny_corpus, tmp_path / "one", (1, 1, 1), *recipe)
    eight = probe(tiny_corpus, tmp_path / "eight", (2, 2, 2), *recipe)
    assert one["steps"][-1]["si_clip_events"] > 0  # C this small makes the clip fire
    for a, b in zip(one["steps"], eight["steps"]):
        for key in ("loss", "si_weight_norm", "si_grad_norm", "si_clip_ratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
        assert b["si_clip_events"] == a["si_clip_events"]
