"""One row of the device check, in a process of its own (scripts/gpu_check.py starts it).

    python scripts/gpu_rows.py --row ROW_JSON --result FILE [--cpu-smoke]

What a row's `run` names: "peak" (the matmul rate, MFU's denominator), "optimizer" (one step of
fused S3 and fused AdamW), "pangu" (pangu's engine on the row's config), "plain" (the plain loop
of bench/throughput.py on the same config), "pytest" (the gpu-marked tests of a file). Every
training row, both sides, uses TRAINING's settings and the same random samples; --cpu-smoke
swaps in SMOKE's tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from pangu.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
# Every training row, both sides: one GPU, no dropout (the plain loop has none; FlexAttention
# neither), 2 micro-batches of 8 sequences of 1024 tokens per step, bf16.
TRAINING = (
    "parallel.tp=1",
    "parallel.pp=1",
    "model.dropout=0.0",
    "train.micro_batch_size=8",
    "train.global_batch_size=16",
    "train.precision=bf16",
    "train.steps=1000",
    "optim.warmup_steps=1",
)
# --cpu-smoke: every training row on this tiny model instead, in fp32
SMOKE = (
    "model.num_layers=3",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.seq_length=64",
    "model.vocab_size=1000",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.precision=fp32",
)
WARMUP_STEPS, MEASURED_STEPS = 2, 5
PAD_ID, EOD_ID = 6, 9  # of the random samples: no padding, a separator every ~200 tokens
OPTIMIZERS_COMPARED = ("AdamW fused", "S3 fused p=2", "S3 fused p=3")
HANG = "PANGU_GPU_CHECK_HANG"  # tests only: the row of this name hangs (a stand-in for a stuck kernel)


def main() -> int:
    """Measures one row (given as JSON by scripts/gpu_check.py) and writes its result; a
    measurement may save a partial result first, which a row killed later keeps."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", required=True, help="the row, as gpu_check.py's Row in JSON")
    parser.add_argument("--result", required=True, help="the JSON file to write the result to")
    parser.add_argument("--cpu-smoke", action="store_true", help="on the CPU with a tiny model")
    args = parser.parse_args()
    row, result_file = SimpleNamespace(**json.loads(args.row)), Path(args.result)
    from pangu.cli import configure_output

    configure_output(0)  # before DeepSpeed and megatron-core are imported: their notices stay out
    if os.environ.get(HANG) == row.name:
        print(f"{row.name}: hanging, as {HANG} asks", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device in this row's process")
    result = MEASUREMENTS[row.run](row, args.cpu_smoke, lambda partial: write_json_atomic(result_file, partial))
    write_json_atomic(result_file, result)
    return 1 if result.get("failed") else 0


def _from_bench(name: str):
    """A module of bench/ (not a package), in a row's process only."""
    import importlib

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module(name)


def _device(smoke: bool):
    import torch

    return torch.device("cpu") if smoke else torch.device("cuda", 0)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(row, smoke: bool, save) -> dict:
    """The matmul rate this device reaches (bf16 8192^3 on a GPU), and the vendor's figure."""
    import torch

    from pangu.pretrain.metrics import known_peak, measure_peak_flops

    device = _device(smoke)
    if smoke:
        name, dtype, size, memory = "CPU", torch.float32, 512, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        name, dtype, size = torch.cuda.get_device_name(device), torch.bfloat16, 8192
        memory = torch.cuda.get_device_properties(device).total_memory
    return {
        "device": name,
        "torch": torch.__version__,
        "memory GiB": memory / 2**30,
        "dtype": str(dtype).removeprefix("torch."),
        "measured FLOP/s": measure_peak_flops(device, dtype, size),
        "vendor FLOP/s": None if smoke else known_peak(name),
    }


def measure_optimizer(row, smoke: bool, save) -> dict:
    """ms per optimizer step on one flat fp32 tensor of 350M elements (what ZeRO-1 hands pangu's
    optimizer for the 350M model), each optimizer with its own state, steps interleaved."""
    bench = _from_bench("optimizer_step").bench
    elements = 1_000_000 if smoke else 350_000_000
    repeats, warmup = (3, 1) if smoke else (20, 3)
    medians = bench([(elements,)], repeats, warmup, _device(smoke), names=OPTIMIZERS_COMPARED)
    return {"elements": elements, "ms/step": medians}


def measure_training(row, smoke: bool, save) -> dict:
    """Step times of pangu's engine or the plain loop on the row's config: the same random
    samples, WARMUP_STEPS untimed, the median of MEASURED_STEPS; then one profiled step."""
    import torch

    from pangu.model.sizes import flops_per_token, parameter_count

    device = _device(smoke)
    config = row_config(row, smoke)
    recompute, why = choose_recompute(config, device)
    config = row_config(row, smoke, f"parallel.recompute={recompute}")
    steps = WARMUP_STEPS + MEASURED_STEPS + row.profile
    samples = random_samples(config, steps)
    step = TRAINING_STEPS[row.run](config, device, samples)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for index in range(WARMUP_STEPS + MEASURED_STEPS):
        _synchronize(device)
        start = time.perf_counter()
        step(index)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak_memory = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process's peak resident memory
    )
    median = statistics.median(seconds[WARMUP_STEPS:])
    tokens = config.train.global_batch_size * config.model.seq_length
    result = {
        "device": device.type,
        "parameters": parameter_count(config.model),
        "micro-batch": config.train.micro_batch_size,
        "global batch": config.train.global_batch_size,
        "sequence": config.model.seq_length,
        "precision": config.train.precision,
        "recompute": recompute,
        "recompute why": why,
        "warm-up steps": WARMUP_STEPS,
        "step seconds": seconds,
        "tokens/s": tokens / median,
        "flops/token": flops_per_token(config.model),
        "peak memory GiB": peak_memory / 2**30,
    }
    if row.profile:
        save(result)  # the throughput stays if profiling fails
        result.update(profile_step(step, steps - 1, device))
    return result


def row_config(row, smoke: bool, *extra: str):
    from pangu.config import load_config

    path = REPO / "configs" / f"{'tiny' if smoke else row.target}.yaml"
    return load_config(path, [*TRAINING, *(SMOKE if smoke else ()), *row.overrides, *extra])


def choose_recompute(config, device) -> tuple[str, str]:
    """The row's recomputation, and why: none when pangu's memory model says the step fits this
    device without it, else full. Both sides of a comparison get the same answer."""
    import torch

    from pangu.parallel.memory_model import Kernels, estimate_memory
    from pangu.parallel.planner import Hardware, Layout

    train = config.train
    layout = Layout(1, 1, 1, "none", train.micro_batch_size, train.global_batch_size // train.micro_batch_size)
    if device.type == "cuda":
        memory, kernels = torch.cuda.get_device_properties(device).total_memory, Kernels()
    else:
        memory, kernels = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), Kernels.cpu()
    usable = Hardware(gpus=1, gpu_memory_bytes=memory).usable_memory
    peak = estimate_memory(config, layout, kernels).peak
    said = f"memory model: {peak / 2**30:.1f} GiB without recomputation, {usable / 2**30:.1f} GiB usable"
    return ("none", said) if peak <= usable else ("full", said)


def random_samples(config, steps: int) -> list:
    """Global batches [B, seq + 1] of random tokens with a separator every ~200 tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (config.train.global_batch_size, config.model.seq_length + 1)
    batches = []
    for _ in range(steps):
        samples = torch.randint(10, config.model.vocab_size, shape, generator=generator)
        samples[torch.rand(shape, generator=generator) < 1 / 200] = EOD_ID
        batches.append(samples.numpy())
    return batches


def pangu_training(config, device, samples: list):
    """step(i): pangu's training step on global batch `samples[i]`, as the trainer takes it (the
    learning rate, the micro-batches, the tokens of the global batch, the engine's train_step).
    The one place the check builds and steps pangu's engine: another engine is a config override
    in ROWS (parallel.engine), not another function."""
    import torch

    from pangu.data.dataset import make_batch
    from pangu.parallel.engine import MicroBatch, build_engine
    from pangu.parallel.topology import init_distributed
    from pangu.pretrain.trainer import set_learning_rate

    topology = init_distributed(config.parallel)
    torch.manual_seed(config.train.seed)
    engine = build_engine(config, topology)
    micro = config.train.micro_batch_size

    def step(index: int) -> None:
        set_learning_rate(engine, config, index)
        batch = samples[index]
        engine.dropout_seeds.start_step(index, list(range(len(batch) // micro)))
        tokens = int((batch[:, :-1] != PAD_ID).sum())
        micro_batches = [
            MicroBatch.from_batch(
                make_batch(batch[start : start + micro], pad_id=PAD_ID, eod_id=EOD_ID, eod_reset=config.data.eod_reset)
            )
            for start in range(0, len(batch), micro)
        ]
        engine.train_step(micro_batches, tokens)

    return step


def plain_training(config, device, samples: list):
    """step(i): the plain loop of bench/throughput.py on `samples[i]`, compiled when the row's
    train.compile is, in bf16 autocast when its precision is bf16, with the row's recomputation."""
    import torch

    PlainLoop = _from_bench("throughput").PlainLoop
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    loop = PlainLoop(
        config,
        lambda index: samples[index],
        pad_id=PAD_ID,
        eod_id=EOD_ID,
        compile=config.train.compile,
        device=device,
        dtype=dtype,
        recompute=config.parallel.recompute,
    )
    return lambda index: loop.train_step()


def profile_step(step, index: int, device) -> dict:
    """One more step under torch.profiler: the 15 ops with the most self CUDA time (self CPU time
    on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        step(index)
        _synchronize(device)
        wall = time.perf_counter() - start
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)[:15]
    ops = [
        {
            "op": event.key,
            "calls": event.count,
            "self device ms": event.self_device_time_total / 1e3,
            "device total ms": event.device_time_total / 1e3,
            "self CPU ms": event.self_cpu_time_total / 1e3,
        }
        for event in top
    ]
    return {"profiled step ms": wall * 1e3, "profile": ops}


def run_test(row, smoke: bool, save) -> dict:
    """The gpu-marked tests of `row.target` through pytest in this process: each test's outcome,
    seconds and message, saved as each test ends (a row timed out keeps the tests it finished)."""
    import pytest

    tests: list[dict] = []

    class Outcomes:
        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or report.outcome != "passed":
                message = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext
                lines = message.strip().splitlines()
                outcome = {"test": report.nodeid.rpartition("::")[2], "outcome": report.outcome}
                tests.append(
                    {**outcome, "seconds": round(report.duration, 1), "message": lines[-1][:300] if lines else ""}
                )
                save({"tests": tests})

    code = pytest.main([row.target, "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"], plugins=[Outcomes()])
    return {"exit": int(code), "tests": tests, "failed": int(code) != 0}


MEASUREMENTS = {
    "peak": measure_peak,
    "optimizer": measure_optimizer,
    "pangu": measure_training,
    "plain": measure_training,
    "pytest": run_test,
}
TRAINING_STEPS = {"pangu": pangu_training, "plain": plain_training}


if __name__ == "__main__":
    sys.exit(main())
