"""What only a GPU can show (run by scripts/gpu_check.sh on a GPU machine; skipped on the CPU,
where tests/training and tests/model cover the same logic): the trainer on NCCL, fp32 losses on
the GPU equal to the CPU's, bf16 learning, checkpoint and exact resume on the GPU, generation with
the KV cache. The corpus is $PANGU_GPU_CORPUS when set (a prepared directory carried to the
machine, see docs/gpu.md), else the tests' tiny corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import losses, run_pretrain, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]
FP32 = ["model.dropout=0.0", "train.steps=5", "optim.warmup_steps=1", "train.eval_interval=0"]


@pytest.fixture(scope="module")
def corpus(request) -> Path:
    carried = os.environ.get("PANGU_GPU_CORPUS")
    return Path(carried) if carried else request.getfixturevalue("tiny_corpus")


def test_trainer_on_nccl_matches_the_cpu(corpus, tmp_path):
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    done = run_pretrain(tiny_overrides(corpus, gpu, *FP32))
    assert done.returncode == 0, done.stderr[-3000:]
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        done = run_pretrain(tiny_overrides(corpus, cpu, *FP32))
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert done.returncode == 0, done.stderr[-3000:]
    on_gpu, on_cpu = losses(gpu), losses(cpu)
    assert on_gpu.keys() == on_cpu.keys() == set(range(1, 6))
    for step, (loss, _) in on_cpu.items():
        assert on_gpu[step][0] == pytest.approx(loss, rel=1e-4), step


def test_bf16_learns(corpus, tmp_path):
    out = tmp_path / "bf16"
    done = run_pretrain(tiny_overrides(corpus, out, "train.precision=bf16", "train.steps=40", "optim.lr=0.01"))
    assert done.returncode == 0, done.stderr[-3000:]
    run = losses(out)
    assert run[40][0] < run[1][0] - 1.0


def test_checkpoint_and_exact_resume_on_the_gpu(corpus, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_pretrain(tiny_overrides(corpus, straight, *FP32)).returncode == 0
    for stop_at in (3, 0):
        done = run_pretrain(tiny_overrides(corpus, stopped, *FP32, f"train.stop_at={stop_at}"))
        assert done.returncode == 0, done.stderr[-3000:]
    resumed, reference = losses(stopped), losses(straight)
    assert resumed.keys() == reference.keys()
    for step, (loss, grad_norm) in reference.items():  # GPU kernels may add in another order: not bitwise
        assert resumed[step][0] == pytest.approx(loss, rel=1e-6) and resumed[step][1] == pytest.approx(
            grad_norm, rel=1e-5
        )


def test_generation_with_the_kv_cache_equals_recomputing(corpus):
    from pangu.config import ModelConfig
    from pangu.evaluation.inference import generate, generate_ids
    from pangu.model.init import initialize_parameters
    from pangu.model.pangu_alpha import PanguAlpha

    config = ModelConfig(num_layers=3, hidden_size=64, num_heads=4, vocab_size=600, seq_length=64, dropout=0.0)
    model = PanguAlpha(config)
    initialize_parameters(model.named_parameters(), config, seed=3)
    model = model.cuda().eval()
    prompt = [5, 17, 42, 8, 99]
    cached = generate_ids(model, prompt, max_new_tokens=20)

    def recompute(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids], device="cuda"))[0, -1]

    assert cached == generate(recompute, prompt, seq_length=64, max_new_tokens=20, device="cuda")
    assert len(cached) == 20
