"""What many tests share: paths, the tiny model's settings, running `pangu` in fresh processes
(one process, torchrun, or spawned workers) and reading back what a run recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pangu.checkpoint.store import TensorReader
from pangu.checkpoint.training import latest_checkpoint
from pangu.parallel.topology import free_port

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")
PROBES = REPO / "tests" / "probes"
TASK_DATA = REPO / "tests" / "evaluation" / "tasks"
RELEASE = REPO / "pangu" / "assets" / "pangu-alpha"  # the PanGu-α release files pangu ships
STEPS = 6  # the tiny run's length


def tiny_overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    """`pangu pretrain` arguments for the tiny test model on `corpus`, writing to `out`."""
    settings = [
        f"data.prepared_dir={corpus}",
        f"train.output_dir={out}",
        "model.num_layers=3",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.vocab_size=600",
        "model.seq_length=32",
        "model.dropout=0.1",
        f"train.steps={STEPS}",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.log_interval=1",
        "train.eval_interval=3",
        "train.eval_batches=1",
        "optim.lr=0.003",
        "optim.warmup_steps=4",
        "optim.grad_clip=1.0",
        *extra,
    ]
    return ["--config", TINY_CONFIG] + [arg for setting in settings for arg in ("--set", setting)]


def prepare_tiny_corpus(root: Path) -> Path:
    """The tests' corpus under root/prepared: 1500 People's Daily paragraphs, a 600-piece BPE."""
    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.data.sources import people_daily_file

    lines = people_daily_file().read_text(encoding="utf-8").splitlines()[:1500]
    texts = ["".join(token.rsplit("/", 1)[0] for token in line.split()) for line in lines if line.strip()]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    overrides = [
        f"data.sources=[{{kind: jsonl, path: {root / 'docs.jsonl'}}}]",
        "data.tokenizer.kind=train",
        "data.tokenizer.vocab_size=600",
        f"data.prepared_dir={root / 'prepared'}",
        "data.valid_fraction=0.05",
    ]
    prepare(load_config(None, overrides), progress=False)
    return root / "prepared"


def subprocess_env() -> dict[str, str]:
    """One thread per process, and the repository importable (for `tests.` modules)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_pretrain(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """`pangu pretrain` in a fresh process; `prelude` is Python run first (to inject a crash)."""
    code = f"{prelude}\nimport sys\nfrom pangu.cli import entry\nentry(['pretrain', *sys.argv[1:]])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )


def torchrun(script: Path | str, args: list[str], nproc: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC SCRIPT ARGS` (gloo on the CPU)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def torchrun_pangu(args: list[str], nproc: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC -m pangu ARGS` (gloo on the CPU)."""
    return torchrun("-m", ["pangu", *args], nproc, timeout)


def losses(out: Path) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad norm)} of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "loss" in r}


def stored_tensors(run_dir: Path) -> dict[tuple[str, str], torch.Tensor]:
    """{(parameter, state key): full tensor} of a run's newest checkpoint."""
    reader = TensorReader(latest_checkpoint(run_dir) / "tensors")
    return {(name, key): reader.read(name, key) for name in reader.names() for key in reader.keys(name)}


def run_two_processes(worker: Callable[..., None], *arguments: object, timeout_s: float = 120) -> None:
    """Start worker(rank, 2, free_port, *arguments) in 2 spawned processes; fail if one fails or hangs."""
    context = mp.start_processes(worker, args=(2, free_port(), *arguments), nprocs=2, join=False, start_method="spawn")
    deadline = timeout_s
    while not context.join(timeout=1):
        deadline -= 1
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout_s} s")


def structurally_intact_checkpoint(directory: Path, step: int) -> Path:
    """A checkpoint at `directory` whose structure start-up accepts (a valid manifest of a tiny model,
    its one tensor file of the size the manifest lists) but that holds no pieces."""
    from pangu.checkpoint import format as fmt
    from pangu.config import ModelConfig

    model = ModelConfig(num_layers=2, hidden_size=8, num_heads=2, vocab_size=128, seq_length=8)
    size = fmt.declared_elements(model) * 4
    (directory / "tensors").mkdir(parents=True)
    (directory / "tensors" / "rank00000.bin").write_bytes(bytes(size))
    files = {"tensors/rank00000.bin": fmt.FileRecord(bytes=size)}
    layout = fmt.Layout(dp=1, tp=1, pp=1)
    fmt.write_manifest(directory, fmt.Manifest(kind="weights", step=step, model=model, layout=layout, files=files))
    return directory


class DeviceTensor(torch.Tensor):
    """Stands for a GPU tensor in a CPU test: memory that is not the host's to read a file into
    (`.numpy()` and `np.asarray` are refused, as they are for a CUDA tensor)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise RuntimeError("a device tensor is not host memory")
        return super().__torch_function__(func, types, args, kwargs or {})
