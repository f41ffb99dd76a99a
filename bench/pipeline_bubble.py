"""The pipeline bubble of each schedule pangu's torch engine runs, measured with stages whose compute
is a fixed sleep, beside the schedule's theoretical bubble.

Each of p processes (gloo on the CPU, one thread each) builds the pipeline stages pangu's engine
gives its rank (`pangu.parallel.stages.stages_of_rank`) and runs `torch.distributed.pipelining`'s
schedule over m micro-batches: 1F1B (Schedule1F1B), interleaved 1F1B (ScheduleInterleaved1F1B),
interleaved zero bubble (ScheduleInterleavedZeroBubble) and ZBV (ScheduleZBVZeroBubble), the last
three with v = 2 stages per rank. A stage's forward sleeps F / v, its backward B / v, of which the
weight-gradient part (what the zero-bubble schedules defer to their W actions) is W / v: a rank's
compute per micro-batch is F + B whatever the schedule. Sleeps make the figures deterministic on a
noisy machine; the tensors stages send each other are tiny, so communication is small beside them.
Its cost, with the schedule's own work, shows twice: in a run with every sleep 0 (`no-sleep ms`, a
step's time then), and in the measured step beside the replayed one (`ideal ms`, below): each
action costs its wake-up, p2p and Python (~1-2 ms on 2 busy cores), and the zero-bubble schedules
run three actions per micro-batch and stage where the others run two (`actions`, per rank).

For every case, after a warm-up step, each repeat measures per rank the time actually slept (busy)
and the step's window from the first rank's start to the last rank's end (one monotonic clock for
all processes); idle fraction = 1 - mean busy / window, the median over repeats. Beside it:
- theory: the bubble the schedule's paper gives, as a fraction of the step,
    1F1B                 (p - 1)(F + B) / step, i.e. (p - 1) / (m + p - 1), for any F and B
    interleaved 1F1B     (p - 1)(F + B) / v / step, i.e. (p - 1) / (v m + p - 1)
    interleaved ZB       (p - 1)(f + i - w) with chunk times f = F/v, i = (B - W)/v, w = W/v: ZB-H1's
                         (p - 1)(T_F + T_B - T_W) (Qi et al. 2024, sec. 2.1; torch: "ZB1P")
    ZBV                  (p - 1) f when f = i = w and m >= 2p - 1, else none: ZB-V (sec. 6; torch's
                         docstring) leaves no idle time inside its parallelogram, whose ranks start
                         f apart; the paper overlaps that offset with the neighbouring steps
                         (optimizer post-validation), a synchronous step (torch's, pangu's: the
                         gradient norm is all-reduced before the optimizer steps) idles through it
  where step = m (F + B) + bubble;
- simulated: the same schedule replayed from the actions each rank actually ran, in its order, with
  the nominal sleeps and no communication (`ideal ms`: its step): the bubble of torch's schedule as
  implemented (torch runs a first stage's whole backward in its W actions, and ZBV's order is built
  for m >= 2p - 1).

    python bench/pipeline_bubble.py [--ranks 2 4] [--microbatches 4 8] [--schedules ...] \\
        [--forward-ms 40] [--backward-ms 80] [--weight-ms 40] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage

from pangu.config import ParallelConfig
from pangu.files import write_json_atomic
from pangu.parallel.native.engine import SCHEDULES  # what parallel.schedule names, as the engine runs it
from pangu.parallel.stages import stages_of_rank
from pangu.parallel.topology import free_port

VIRTUAL_STAGES = {"1f1b": 1, "interleaved_1f1b": 2, "zero_bubble": 2, "zbv": 2}
WIDTH = 8  # elements of the activation one micro-batch sends between stages


@dataclass(frozen=True)
class Sleeps:
    """Seconds of compute per micro-batch: forward, the whole backward, and the backward's
    weight-gradient part (the input-gradient part is the rest)."""

    forward: float
    backward: float
    weight: float

    @property
    def input_grad(self) -> float:
        return self.backward - self.weight

    def split(self, parts: int) -> Sleeps:
        return Sleeps(self.forward / parts, self.backward / parts, self.weight / parts)


# --- the sleeping stage -----------------------------------------------------------------------


class Clock:
    """Sleeps a rank's compute and keeps the books: the time actually slept, and for each schedule
    action the stages ran (recorded by `record_actions`) the nominal sleep it contained."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.actions: list[list] = []  # [stage, kind ("F", "B", "I" or "W"), micro-batch, nominal s]

    def sleep(self, seconds: float) -> None:
        self.actions[-1][3] += seconds
        if seconds > 0:
            start = time.monotonic()
            time.sleep(seconds)
            self.busy += time.monotonic() - start


class _ActivationSleep(torch.autograd.Function):
    """Identity; its forward sleeps the forward time, its backward the input-gradient time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clock: Clock, sleeps: Sleeps) -> torch.Tensor:
        ctx.clock, ctx.sleeps = clock, sleeps
        clock.sleep(sleeps.forward)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.clock.sleep(ctx.sleeps.input_grad)
        return grad, None, None


class _WeightSleep(torch.autograd.Function):
    """Identity on a weight; its backward (the weight's own gradient) sleeps the weight time."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, clock: Clock, sleeps: Sleeps) -> torch.Tensor:
        ctx.clock, ctx.sleeps = clock, sleeps
        return weight.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.clock.sleep(ctx.sleeps.weight)
        return grad, None, None


class SleepingStage(nn.Module):
    """output = sleep(input x weight). The weight joins at the input, so the input-gradient sleep
    lies between the output and the weight, as the activation gradients of a stage of several layers
    do: torch's zero-bubble backward (pipelining/_backward.py) runs it in `stage_backward_input` and
    leaves only the weight's own sleep to `stage_backward_weight`; a full backward runs both."""

    def __init__(self, clock: Clock, sleeps: Sleeps):
        super().__init__()
        self.clock, self.sleeps = clock, sleeps
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _WeightSleep.apply(self.weight, self.clock, self.sleeps)
        return _ActivationSleep.apply(x * weight, self.clock, self.sleeps)


def record_actions(stage: PipelineStage, clock: Clock) -> None:
    """Log each action the schedule runs on `stage` (forward, full or input backward, weight backward)
    with its micro-batch, by wrapping the three methods every torch schedule calls."""
    forward, backward, backward_weight = (
        stage.forward_one_chunk,
        stage.backward_one_chunk,
        stage.backward_weight_one_chunk,
    )

    def logged(kind: str, microbatch: int) -> None:
        clock.actions.append([stage.stage_index, kind, microbatch, 0.0])

    def forward_one_chunk(microbatch, *args, **kwargs):
        logged("F", microbatch)
        return forward(microbatch, *args, **kwargs)

    def backward_one_chunk(microbatch, *args, full_backward: bool = True, **kwargs):
        logged("B" if full_backward else "I", microbatch)
        return backward(microbatch, *args, full_backward=full_backward, **kwargs)

    def backward_weight_one_chunk(microbatch, *args, **kwargs):
        logged("W", microbatch)
        return backward_weight(microbatch, *args, **kwargs)

    stage.forward_one_chunk = forward_one_chunk
    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


# --- one process -------------------------------------------------------------------------------


def run_case(rank: int, pp: int, schedule: str, microbatches: int, sleeps: Sleeps, repeats: int) -> dict:
    """One rank's measurements of `repeats` steps of `schedule` (after a warm-up step)."""
    virtual = VIRTUAL_STAGES[schedule]
    parallel = ParallelConfig(engine="torch", pp=pp, schedule=schedule, virtual_stages=virtual)
    parallel.validate()
    indices = stages_of_rank(parallel, rank)
    num_stages = pp * virtual
    clock = Clock()
    # static shapes: the first step then runs no shape-inference forward (torch.distributed.pipelining)
    activation = torch.empty(1, WIDTH, device="meta", requires_grad=True)
    stages = []
    for index in indices:
        stage = PipelineStage(
            SleepingStage(clock, sleeps.split(virtual)),
            index,
            num_stages,
            torch.device("cpu"),
            input_args=(activation,),
            output_args=(activation,),
        )
        record_actions(stage, clock)
        stages.append(stage)
    runner = SCHEDULES[schedule](stages[0] if virtual == 1 else stages, microbatches, loss_fn=F.mse_loss)
    batch = torch.zeros(microbatches, WIDTH)
    inputs = (batch,) if 0 in indices else ()
    target = batch if num_stages - 1 in indices else None

    steps = []
    for repeat in range(repeats + 1):
        clock.busy, clock.actions = 0.0, []
        for stage in stages:
            stage.submod.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.monotonic()
        runner.step(*inputs, target=target)
        end = time.monotonic()
        if repeat > 0:  # the first step also agrees on the stages' metadata
            steps.append({"start": start, "end": end, "busy": clock.busy})
    return {"schedule": schedule, "microbatches": microbatches, "steps": steps, "actions": clock.actions}


def worker(rank: int, world: int, port: int, cases: list, sleeps: Sleeps, repeats: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {
        label: [run_case(rank, world, schedule, m, case_sleeps, repeats) for schedule, m in cases]
        for label, case_sleeps in (("sleeping", sleeps), ("no_sleep", Sleeps(0.0, 0.0, 0.0)))
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# --- theory, replay and the table ------------------------------------------------------------------


def theoretical_bubble(schedule: str, pp: int, microbatches: int, sleeps: Sleeps) -> float | None:
    """The idle fraction of a step the schedule's paper gives (module docstring), None where it gives none."""
    v = VIRTUAL_STAGES[schedule]
    chunk = sleeps.split(v)
    if schedule == "1f1b":
        bubble = (pp - 1) * (sleeps.forward + sleeps.backward)
    elif schedule == "interleaved_1f1b":
        bubble = (pp - 1) * (chunk.forward + chunk.backward)
    elif schedule == "zero_bubble":
        bubble = (pp - 1) * max(chunk.forward + chunk.input_grad - chunk.weight, 0.0)
    else:  # zbv
        balanced = abs(chunk.forward - chunk.input_grad) < 1e-12 and abs(chunk.forward - chunk.weight) < 1e-12
        if not (balanced and microbatches >= 2 * pp - 1):
            return None
        bubble = (pp - 1) * chunk.forward
    return bubble / (microbatches * (sleeps.forward + sleeps.backward) + bubble)


def replay(actions_by_rank: list[list], num_stages: int) -> tuple[float, float]:
    """(idle fraction, seconds) of a step in which each rank runs its actions [stage, kind,
    micro-batch, seconds] in their order, each as soon as what it needs has finished: a forward needs
    the previous stage's forward, a full or input backward the next stage's (the last stage: its own
    forward), a weight backward the stage's input backward. No communication time."""

    def needs(stage: int, kind: str, microbatch: int) -> tuple | None:
        if kind == "F":
            return ("F", stage - 1, microbatch) if stage > 0 else None
        if kind == "W":
            return ("grad", stage, microbatch)
        return ("grad", stage + 1, microbatch) if stage < num_stages - 1 else ("F", stage, microbatch)

    finished: dict[tuple, float] = {}
    free = [0.0] * len(actions_by_rank)
    position = [0] * len(actions_by_rank)
    while any(position[r] < len(actions) for r, actions in enumerate(actions_by_rank)):
        progressed = False
        for rank, actions in enumerate(actions_by_rank):
            while position[rank] < len(actions):
                stage, kind, microbatch, seconds = actions[position[rank]]
                need = needs(stage, kind, microbatch)
                if need is not None and need not in finished:
                    break
                free[rank] = max(free[rank], finished.get(need, 0.0)) + seconds
                finished[("grad" if kind in ("B", "I") else kind, stage, microbatch)] = free[rank]
                position[rank] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"the recorded actions cannot run in order: stuck at {position} of {actions_by_rank}")
    busy = [sum(action[3] for action in actions) for actions in actions_by_rank]
    return 1 - statistics.mean(busy) / max(free), max(free)


@dataclass
class Row:
    schedule: str
    pp: int
    microbatches: int
    virtual_stages: int
    actions: int  # compute actions per rank and step (the most of any rank)
    ideal_ms: float  # the replayed step: the sleeps and the schedule's order alone
    step_ms: float  # measured, median
    no_sleep_ms: float  # the same step with every sleep 0: communication and the schedule's own work
    theory: float | None  # idle fractions of the step
    simulated: float
    measured: float


def step_figures(per_rank: list[dict]) -> tuple[float, float]:
    """(median idle fraction, median step seconds) of one case's repeats, from every rank's records."""
    idle, windows = [], []
    for repeat in zip(*(rank["steps"] for rank in per_rank)):
        window = max(step["end"] for step in repeat) - min(step["start"] for step in repeat)
        idle.append(1 - statistics.mean(step["busy"] for step in repeat) / window)
        windows.append(window)
    return statistics.median(idle), statistics.median(windows)


def measure(pp: int, cases: list[tuple[str, int]], sleeps: Sleeps, repeats: int) -> list[Row]:
    """Run `cases` [(schedule, micro-batches)] on `pp` spawned processes; one Row per case."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned processes inherit it
    with tempfile.TemporaryDirectory(prefix="pipeline-bubble-") as out_dir:
        mp.start_processes(
            worker, args=(pp, free_port(), cases, sleeps, repeats, out_dir), nprocs=pp, start_method="spawn"
        )
        ranks = [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(pp)]
    rows = []
    for index, (schedule, microbatches) in enumerate(cases):
        sleeping = [rank["sleeping"][index] for rank in ranks]
        measured, step = step_figures(sleeping)
        _, no_sleep = step_figures([rank["no_sleep"][index] for rank in ranks])
        virtual = VIRTUAL_STAGES[schedule]
        actions = [rank["actions"] for rank in sleeping]
        simulated, ideal = replay(actions, pp * virtual)
        rows.append(
            Row(
                schedule=schedule,
                pp=pp,
                microbatches=microbatches,
                virtual_stages=virtual,
                actions=max(len(rank_actions) for rank_actions in actions),
                ideal_ms=1000 * ideal,
                step_ms=1000 * step,
                no_sleep_ms=1000 * no_sleep,
                theory=theoretical_bubble(schedule, pp, microbatches, sleeps),
                simulated=simulated,
                measured=measured,
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:.2f}" if base else "-"

    lines = [
        f"{'schedule':<17} {'p':>2} {'m':>2} {'v':>2} {'actions':>7} | {'ideal ms':>8} {'step ms':>8} "
        f"{'no-sleep ms':>11} | {'theory':>7} {'simulated':>9} {'measured':>8} | {'meas/theory':>11} {'meas/sim':>8}"
    ]
    for row in rows:
        theory = f"{row.theory:.1%}" if row.theory is not None else "-"
        lines.append(
            f"{row.schedule:<17} {row.pp:>2} {row.microbatches:>2} {row.virtual_stages:>2} {row.actions:>7} | "
            f"{row.ideal_ms:>8.1f} {row.step_ms:>8.1f} {row.no_sleep_ms:>11.1f} | "
            f"{theory:>7} {row.simulated:>9.1%} {row.measured:>8.1%} | "
            f"{ratio(row.measured, row.theory):>11} {ratio(row.measured, row.simulated):>8}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="pipeline ranks p")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8], help="micro-batches m per step")
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--forward-ms", type=float, default=40.0, help="a rank's forward per micro-batch, F")
    parser.add_argument("--backward-ms", type=float, default=80.0, help="a rank's whole backward, B")
    parser.add_argument("--weight-ms", type=float, default=40.0, help="the weight-gradient part of B, W")
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per case (after one warm-up)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the rows here")
    args = parser.parse_args()
    for pp in args.ranks:
        for m in args.microbatches:
            if pp < 2 or m % pp:
                parser.error(f"p = {pp}, m = {m}: the schedules need p >= 2 and m a multiple of p")
    if not (args.forward_ms >= 0 and args.backward_ms >= args.weight_ms >= 0):
        parser.error("--forward-ms, --backward-ms and --weight-ms need F >= 0 and B >= W >= 0")
    if args.repeats < 1:
        parser.error("--repeats needs at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: the directory {args.json.parent} does not exist")

    sleeps = Sleeps(args.forward_ms / 1000, args.backward_ms / 1000, args.weight_ms / 1000)
    print(
        f"stage compute per rank and micro-batch: F {args.forward_ms:g} ms, B {args.backward_ms:g} ms "
        f"(W {args.weight_ms:g} ms of it); v = 2 stages per rank for the interleaved schedules and ZBV",
        flush=True,
    )
    rows = []
    for pp in args.ranks:
        cases = [(schedule, m) for schedule in args.schedules for m in args.microbatches]
        rows += measure(pp, cases, sleeps, args.repeats)
    print(format_table(rows))
    if args.json is not None:
        settings = {"forward_ms": args.forward_ms, "backward_ms": args.backward_ms, "weight_ms": args.weight_ms}
        write_json_atomic(args.json, {**settings, "repeats": args.repeats, "rows": [asdict(row) for row in rows]})


if __name__ == "__main__":
    main()
