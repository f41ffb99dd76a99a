"""What a run reports: metrics.jsonl (one JSON object per logged step), TensorBoard events beside
it, and a live progress line with tokens/s, MFU and ETA. Only global rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from pangu.config import Config
from pangu.files import write_atomic
from pangu.schema import ConfigError

logger = logging.getLogger(__name__)

# Dense bf16 peaks of common accelerators, FLOP/s per device (vendor figures); any other device's
# peak is measured at start-up.
KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "V100": 125e12}


def known_peak(device_name: str) -> float | None:
    return next((peak for key, peak in KNOWN_PEAKS.items() if key in device_name), None)


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype, size: int, trials: int = 5, seconds: float = 0.1
) -> float:
    """Matmul FLOP/s this process reaches on `device`: the peak MFU is relative to where no vendor
    figure is known. The best of several short trials, since other processes on a shared machine
    slow some down."""
    generator = torch.Generator(device).manual_seed(0)  # not the global RNG: dropout streams must not move
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def peak_flops_per_device(configured: float, device: torch.device) -> float:
    """train.peak_flops if set; else the vendor bf16 peak of a known GPU; else a measured matmul
    peak (bf16 on a GPU, fp32 on the CPU)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return known_peak(torch.cuda.get_device_name(device)) or measure_peak_flops(device, torch.bfloat16, 8192)
    return measure_peak_flops(device, torch.float32, 1024)


def total_peak_flops(configured: float, device: torch.device, group: dist.ProcessGroup | None = None) -> float:
    """Sum over all ranks (measured concurrently on CPU, so it reflects shared cores). `group` is
    a gloo group: the sum is a host tensor."""
    peak = torch.tensor([peak_flops_per_device(configured, device)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, group=group)
    return float(peak.item())


class MetricsLogger:
    """metrics.jsonl, TensorBoard and the progress line of a run (rank 0 writes; `enabled` is
    False elsewhere). A run that starts at `start_step` (a resume) or goes back to an earlier step
    (a rollback) first supersedes what was logged after it, so every step appears once: the
    later lines of metrics.jsonl are dropped (the file is rewritten atomically) and TensorBoard
    purges its events from that step on."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, config: Config):
        self.enabled = enabled
        self.total_steps = total_steps
        self.output_dir = output_dir
        self._jsonl = self._tensorboard = None
        self._wandb = WandbRun(config, output_dir) if enabled and config.train.wandb.project else None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
        self.restart_at(start_step)
        if enabled:
            self._tensorboard.add_text("config", f"```\n{config.dump()}\n```", global_step=start_step)

    def restart_at(self, step: int) -> None:
        """Continue logging from `step`: what was logged after it is superseded."""
        self.start_step = step
        self.start_time = time.perf_counter()
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        path = self.output_dir / "metrics.jsonl"
        if path.is_file():
            kept = [
                line
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if _step_of(line) <= step
            ]
            write_atomic(path, "".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, record["step"])
        self._progress(record)

    def event(self, step: int, kind: str, **details) -> None:
        """Something that happened (checkpoint, resume, skipped step): also in metrics.jsonl."""
        self.log_raw({"step": step, "event": kind, **details})
        if self.enabled:
            said = ", ".join(
                f"{key} {round(value, 3) if isinstance(value, float) else value}"
                for key, value in details.items()
                if key != "per_rank"
            )
            logger.info("step %d: %s%s", step, kind, f" ({said})" if said else "")

    def log_raw(self, record: dict) -> None:
        if self.enabled:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def _progress(self, record: dict) -> None:
        step = record["step"]
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")
        parts += [
            f"{key.removeprefix('task/')} {value:.4g}" for key, value in record.items() if key.startswith("task/")
        ]
        parts += [
            f"lr {record['lr']:.2e}",
            f"gnorm {record['grad_norm']:.3f}",
            f"{record['tokens_per_sec']:,.0f} tok/s",
            f"mfu {100 * record['mfu']:.1f}%",
            f"eta {_duration(eta)}",
        ]
        logger.info(" | ".join(parts))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()
            self._jsonl = self._tensorboard = None

    def finish(self) -> None:
        """At the end of the run (or its stop): everything written and closed."""
        self.close()
        if self._wandb is not None:
            self._wandb.finish()


class WandbRun:
    """The run's Weights & Biases run: the config at the start, then every logged scalar. Its id is
    kept in OUTPUT_DIR/wandb_run_id, so a resumed run continues it (W&B drops steps it has seen
    already: those redone after a crash or a rollback appear once, from the first attempt)."""

    ID_FILE = "wandb_run_id"

    def __init__(self, config: Config, output_dir: Path):
        import wandb

        settings = config.train.wandb
        id_file = output_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or output_dir.resolve().name,
            mode=settings.mode,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            config=config.to_dict(),
            settings=wandb.Settings(silent=True),
        )
        id_file.write_text(run_id)
        logger.info("W&B run %s (%s)", run_id, settings.mode)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self) -> None:
        self.run.finish()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a damaged line (a crash while writing it) sorts last,
    so that superseding drops it."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, each training step once (the last record of a step wins,
    as in a file written before superseding existed); damaged lines are skipped with a warning."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {path.parent} a pangu run directory?")
    records, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            damaged += line.strip() != ""
            continue
        records.append(record)
    if damaged:
        logger.warning("%s: skipped %d damaged line(s)", path, damaged)
    last = {r["step"]: i for i, r in enumerate(records) if "loss" in r}
    return [r for i, r in enumerate(records) if "loss" not in r or last[r["step"]] == i]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def peak_memory_bytes() -> int:
    """Peak memory of this rank so far: device memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
