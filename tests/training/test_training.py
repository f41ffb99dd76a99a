"""Training end to end, one process: exact resume, crash-safe checkpoints, learning, using a model."""

from __future__ import annotations

import json

import pytest
import torch

import pangu
from pangu.checkpoint.training import latest_checkpoint
from tests.helpers import STEPS, TINY_CONFIG, losses, run_pretrain, stored_tensors, tiny_overrides

pytestmark = [pytest.mark.slow]


def test_resume_is_exact(tiny_corpus, straight_run, tmp_path):
    """Stopped at N/3 and 2N/3 (inside the warmup, with dropout, a shuffled sampler and four
    micro-batches per step), resumed each time: bitwise the same losses, weights and optimizer state."""
    out = tmp_path / "stopped"
    for stop_at in (STEPS // 3, 2 * STEPS // 3, 0):
        result = run_pretrain(tiny_overrides(tiny_corpus, out, f"train.stop_at={stop_at}"))
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out) == losses(straight_run)
    resumed, straight = stored_tensors(out), stored_tensors(straight_run)
    assert resumed.keys() == straight.keys()
    assert {key for _, key in straight} == {"weight", "m", "s"}
    for key, tensor in straight.items():
        assert torch.equal(resumed[key], tensor), key


@pytest.mark.parametrize(
    "crash_in, resumes_from",
    [("publish", 2), ("publish_latest", 4)],
    ids=["before the directory is renamed into place", "before latest moves"],
)
def test_a_crash_while_publishing_loses_nothing(tiny_corpus, straight_run, tmp_path, crash_in, resumes_from):
    """Killed before checkpoint 4 is complete: the run resumes from 2; killed after it is complete
    but before `latest` names it: from 4 (found from the directory). Either way, the losses are
    those of an uninterrupted run."""
    out = tmp_path / "crashed"
    crash = (
        "import os\nfrom pangu.checkpoint import format as checkpoint\n"
        f"original = checkpoint.{crash_in}\n"
        "def crash_at_step_4(root, name):\n"
        "    if str(name).endswith('step_00000004'):\n"
        "        os._exit(17)\n"
        "    original(root, name)\n"
        f"checkpoint.{crash_in} = crash_at_step_4\n"
    )
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2"), prelude=crash)
    assert result.returncode == 17
    assert latest_checkpoint(out).name == f"step_{resumes_from:08d}"
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed (checkpoint {out}/checkpoints/step_{resumes_from:08d}" in result.stderr
    run = losses(out)
    assert {step: run[step] for step in range(resumes_from + 1, STEPS + 1)} == {
        step: losses(straight_run)[step] for step in range(resumes_from + 1, STEPS + 1)
    }
    assert latest_checkpoint(out).name == f"step_{STEPS:08d}"


def test_corrupt_checkpoint_is_refused(tiny_corpus, straight_run, tmp_path):
    """A flipped byte passes the start-up check (structure: files and sizes, no byte read) and is
    caught by the reader of the piece it is in, which names the file."""
    import shutil

    from pangu.checkpoint.store import CheckpointError

    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    checkpoint = latest_checkpoint(copy)
    index = json.loads((checkpoint / "tensors" / "index.json").read_text())["pieces"]
    weight = next(p for p in index if p["key"] == "weight")
    with open(checkpoint / "tensors" / weight["file"], "r+b") as f:
        f.seek(weight["offset"] + 100)
        f.write(b"\xff\xff\xff\xff")
    assert latest_checkpoint(copy) == checkpoint
    with pytest.raises(CheckpointError, match=f"{weight['file']} is corrupt.*checksum"):
        pangu.load(copy)
    result = run_pretrain(tiny_overrides(tiny_corpus, copy, f"train.steps={STEPS + 1}"))
    assert result.returncode == 2 and "does not match its checksum" in result.stderr
    assert "no intact checkpoint to resume from" in result.stderr


def test_loaded_model_reproduces_validation_loss(tiny_corpus, straight_run):
    """pangu.load gives the trained network: its loss on the first validation batch equals the
    one the trainer logged (same samples, no dropout in evaluation)."""
    import numpy as np

    from pangu.config import load_config
    from pangu.data.dataset import make_batch
    from pangu.data.prepare import load_prepared
    from pangu.evaluation.inference import token_losses

    model, tokenizer = pangu.load(straight_run)
    assert tokenizer is not None and tokenizer.vocab_size == 600
    config = load_config(TINY_CONFIG, tiny_overrides(tiny_corpus, straight_run)[3::2])
    valid, meta = load_prepared(tiny_corpus, "valid", 32)
    samples = np.stack([valid[i % len(valid)] for i in range(8)])
    batch = make_batch(samples, pad_id=meta["pad_id"], eod_id=meta["eod_id"], eod_reset=False)
    loss_sum = float((token_losses(model, batch) * torch.from_numpy(batch["loss_mask"])).sum())
    tokens = int(batch["loss_mask"].sum())
    logged = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in logged if r.get("step") == STEPS and "val_loss" in r][0]
    assert loss_sum / tokens == pytest.approx(val_loss, rel=1e-5)
    assert config.train.steps == STEPS


def test_cli_evaluate_generate_plot_export(tiny_corpus, straight_run, capsys, tmp_path):
    from pangu.cli import main

    args = tiny_overrides(tiny_corpus, straight_run)
    assert main(["evaluate", *args, "--checkpoint", str(straight_run), "--baseline", "--max-samples", "16"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") :])  # DeepSpeed may print a build line before it
    assert result["samples"] == 16 and result["val_ppl"] > 1 and result["unigram_ppl"] > 1
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(straight_run),
                "--prompt",
                "中国",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0.8",
                "--top-k",
                "10",
                "--top-p",
                "0.9",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("中国")
    assert main(["plot", str(straight_run)]) == 0
    assert (straight_run / "curves.png").stat().st_size > 1000
    assert main(["generate", "--checkpoint", str(straight_run / "nope"), "--prompt", "x"]) == 2
    assert "not a pangu checkpoint" in capsys.readouterr().err
    assert main(["convert", "export-hf", str(straight_run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt_pangu"
    assert main(["convert", "import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    exported, reimported = pangu.load(straight_run)[0], pangu.load(tmp_path / "back")[0]
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reimported(ids), exported(ids))


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGINT"])
def test_a_stop_signal_checkpoints_and_resumes_exactly(tiny_corpus, straight_run, tmp_path, signal_name):
    """SIGUSR1 (Slurm's preemption warning) or Ctrl-C during step 3: the run finishes the step,
    checkpoints, exits 0 without a traceback; the next run resumes, supersedes what the stopped
    run logged after the checkpoint, and reaches the same losses as the uninterrupted run."""
    out = tmp_path / "stopped"
    signal_in_step_3 = (
        "import os, signal\nfrom pangu.pretrain.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "def train_step(self):\n"
        "    if self.step == 2:\n"
        f"        os.kill(os.getpid(), signal.{signal_name})\n"
        "    return step(self)\n"
        "Trainer.train_step = train_step\n"
    )
    result = run_pretrain(tiny_overrides(tiny_corpus, out), prelude=signal_in_step_3)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "event": "preempted", "signal": signal_name} in events
    assert latest_checkpoint(out).name == "step_00000003"
    with open(out / "metrics.jsonl", "a") as f:  # as if the stopped run had logged past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 99.0, "grad_norm": 0.0}) + "\n" + '{"step": 5, "lo')
    result = run_pretrain(tiny_overrides(tiny_corpus, out))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [
        step for step, record in zip(steps, (out / "metrics.jsonl").read_text().splitlines()) if '"loss"' in record
    ]
    assert logged == sorted(set(logged))  # every step once
    assert losses(out) == losses(straight_run)


def test_a_second_ctrl_c_stops_at_once(tiny_corpus, straight_run, tmp_path):
    """Ctrl-C twice: the run stops without its checkpoint, in one line, and leaves the last one."""
    out = tmp_path / "interrupted"
    twice_in_step_3 = (
        "import os, signal\nfrom pangu.pretrain.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "def train_step(self):\n"
        "    if self.step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return step(self)\n"
        "Trainer.train_step = train_step\n"
    )
    result = run_pretrain(tiny_overrides(tiny_corpus, out, "train.save_interval=2"), prelude=twice_in_step_3)
    assert result.returncode == 130
    assert "pangu pretrain: interrupted" in result.stderr and "Traceback" not in result.stderr
    assert latest_checkpoint(out).name == "step_00000002"


def test_fused_s3_trains_like_foreach(tiny_corpus, straight_run, tmp_path):
    """optim.fused = true (one compiled kernel per ZeRO partition) follows the default foreach
    path step for step: the updates agree to float rounding (the cube root to ~1 ulp)."""
    from pangu.config import load_config
    from pangu.optim.registry import build_optimizer

    weight = [("blocks.0.mlp.dense_h_to_4h.weight", torch.nn.Parameter(torch.ones(2, 2)))]
    for name in ("s3", "adamw"):
        optim = load_config(None, [f"optim.name={name}", "optim.fused=true"]).optim
        optimizer = build_optimizer(optim, weight, no_decay=[])
        assert optimizer.defaults["fused"] is True, name
    out = tmp_path / "fused"
    done = run_pretrain(tiny_overrides(tiny_corpus, out, "optim.fused=true"))
    assert done.returncode == 0, done.stderr[-3000:]
    fused, foreach = losses(out), losses(straight_run)
    assert fused.keys() == foreach.keys()
    for step in foreach:
        assert fused[step] == pytest.approx(foreach[step], rel=1e-4), step


def test_compiled_layers_train_like_eager(tiny_corpus, tmp_path):
    """train.compile = true (each transformer layer through torch.compile inside the pipeline
    engine) follows the eager run step for step, to float rounding (no dropout: compiled and
    eager dropout draw differently), with the selective recomputation and EOD reset paths."""
    settings = [
        "model.dropout=0.0",
        "train.steps=3",
        "optim.warmup_steps=1",
        "parallel.recompute=selective",
        "data.eod_reset=true",
    ]
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        done = run_pretrain(tiny_overrides(tiny_corpus, out, *settings, f"train.compile={str(compiled).lower()}"))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[compiled] = losses(out)
    assert runs[True].keys() == runs[False].keys() == {1, 2, 3}
    for step, (loss, grad_norm) in runs[False].items():
        assert runs[True][step][0] == pytest.approx(loss, rel=1e-5), step
        assert runs[True][step][1] == pytest.approx(grad_norm, rel=1e-4), step


def test_weights_and_biases_offline_continues_the_same_run(tiny_corpus, tmp_path):
    """train.wandb in offline mode: the run logs to W&B; stopped and resumed, it continues the same
    W&B run (same id), with the config recorded."""
    out = tmp_path / "wandb"
    settings = [
        "train.wandb.project=pangu-test",
        "train.wandb.mode=offline",
        "train.eval_interval=0",
        "train.steps=3",
        "optim.warmup_steps=1",
    ]
    for stop_at in (2, 0):
        done = run_pretrain(tiny_overrides(tiny_corpus, out, *settings, f"train.stop_at={stop_at}"))
        assert done.returncode == 0, done.stderr[-3000:]
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    records = [(r / f"run-{run_id}.wandb").read_bytes() for r in runs]
    assert all(b"pangu-test" in data and b"grad_norm" in data for data in records)  # config, then metrics
