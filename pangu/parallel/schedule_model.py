"""The torch engine's pipeline schedules as the planner models them, in pure Python (`pangu plan`
imports no torch): the order in which each pipeline rank runs its actions, replicated from
torch.distributed.pipelining (torch 2.13: Schedule1F1B, ScheduleInterleaved1F1B,
ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble; tests/parallel/test_planner.py compares the
orders with torch's own), and what follows from that order:

- memory: the micro-batches whose activations a rank holds at once, per stage it holds. A forward
  (F) adds one; a full backward (B) frees it; the zero-bubble schedules split the backward into an
  input-gradient action (I), after which torch keeps the whole graph and the gradients of the
  intermediate values that the weight-gradient action (W) starts from, and W, which frees them;
- time: the idle fraction of a synchronous step (every rank waits for the slowest before the
  optimizer steps), from the formulas of docs/pipeline.md where they hold, and otherwise from a
  replay of every rank's actions, each as soon as what it needs has finished.

Stage s of the schedule's order is held by the rank pangu/parallel/stages.py names; "local stage"
k of a rank is the k-th of `stages_of_rank`.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

from pangu.config import ParallelConfig
from pangu.parallel.stages import stages_of_rank

SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble", "zbv")
FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = "F", "B", "I", "W"  # torch's action kinds

Action = tuple[int, str, int]  # (stage index, kind, micro-batch)


def runs(schedule: str, pp: int, virtual: int, microbatches: int) -> bool:
    """Whether torch builds `schedule` for these sizes: Schedule1F1B needs at least as many
    micro-batches as stages; the interleaved schedules run rounds of max(1, m // pp) and need m to
    divide into them; ZBV holds exactly two stages per rank."""
    if schedule == "1f1b":
        return virtual == 1 and microbatches >= pp
    if schedule == "zbv":
        return virtual == 2
    rounds = max(1, microbatches // pp)
    return virtual >= 2 and microbatches % rounds == 0


def rank_actions(schedule: str, pp: int, virtual: int, microbatches: int, rank: int) -> list[Action]:
    """The compute actions pipeline rank `rank` runs in one step, in order."""
    if schedule == "1f1b":
        return _one_f_one_b(pp, microbatches, rank)
    if schedule == "zbv":
        return _zbv(pp, microbatches, rank)
    return _interleaved(pp, virtual, microbatches, rank, zero_bubble=schedule == "zero_bubble")


def _one_f_one_b(pp: int, m: int, rank: int) -> list[Action]:
    """Schedule1F1B: min(m, pp - rank) forwards, then one backward and one forward in turn."""
    warmup = min(m, pp - rank)
    actions = [(rank, FORWARD, j) for j in range(warmup)]
    for j in range(m):
        actions.append((rank, BACKWARD, j))
        if warmup + j < m:
            actions.append((rank, FORWARD, warmup + j))
    return actions


def _interleaved(pp: int, v: int, m: int, rank: int, zero_bubble: bool) -> list[Action]:
    """torch's _get_1f1b_rank_ops: warm-up forwards, then a forward and a backward in turn, then the
    remaining backwards; forwards run rounds of `per_round` micro-batches through the local stages
    in order, backwards through them in reverse. Zero bubble: backwards are input-gradient
    actions, and from the rank-th one on each is followed by the oldest pending weight action."""
    rounds = max(1, m // pp)
    per_round = m // rounds
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (pp - 1 - rank), m * v)
    counts: dict[tuple[int, str], int] = defaultdict(int)
    actions: list[Action] = []

    def add(stage: int, kind: str) -> None:
        actions.append((stage, kind, counts[stage, kind]))
        counts[stage, kind] += 1

    def forward_stage(op: int) -> int:
        return (op // per_round) % v * pp + rank

    def backward_stage(op: int) -> int:
        return (v - 1 - (op - warmup) // per_round % v) * pp + rank

    backwards: list[int] = []
    weights = 0
    for op in range(m * v + warmup):
        if op < m * v:
            add(forward_stage(op), FORWARD)
        if op >= warmup:
            add(backward_stage(op), INPUT_GRAD if zero_bubble else BACKWARD)
            backwards.append(op)
            if zero_bubble and op - warmup >= rank:
                add(backward_stage(backwards[weights]), WEIGHT_GRAD)
                weights += 1
    while zero_bubble and weights < len(backwards):
        add(backward_stage(backwards[weights]), WEIGHT_GRAD)
        weights += 1
    return actions


def _zbv(pp: int, m: int, rank: int) -> list[Action]:
    """ScheduleZBVZeroBubble: built for max(2 pp - 1, m) micro-batches, the actions of the missing
    ones dropped."""
    n = max(2 * pp - 1, m)
    first, second = rank, 2 * pp - 1 - rank
    counts: dict[tuple[int, str], int] = defaultdict(int)
    actions: list[Action] = []

    def add(stage: int, kind: str, index: int | None = None) -> None:
        index = counts[stage, kind] if index is None else index
        actions.append((stage, kind, index))
        counts[stage, kind] = index + 1

    for _ in range(2 * (pp - rank) - 1):
        add(first, FORWARD)
    for _ in range(rank):
        add(second, FORWARD)
        add(first, FORWARD)
    for _ in range(pp - rank):
        add(second, FORWARD)
        add(second, INPUT_GRAD)
        add(second, WEIGHT_GRAD)
    while counts[second, FORWARD] < counts[first, FORWARD] or counts[first, FORWARD] < n:
        if counts[first, FORWARD] < n:
            add(first, FORWARD)
        add(first, INPUT_GRAD)
        add(first, WEIGHT_GRAD)
        add(second, FORWARD)
        add(second, INPUT_GRAD)
        add(second, WEIGHT_GRAD)
    for _ in range(rank):
        add(first, INPUT_GRAD)
        add(second, INPUT_GRAD)
    for _ in range(pp - rank):
        add(first, INPUT_GRAD)
        add(first, WEIGHT_GRAD)
    while counts[second, WEIGHT_GRAD] < counts[second, INPUT_GRAD]:
        add(second, WEIGHT_GRAD)
    while counts[first, WEIGHT_GRAD] < counts[first, INPUT_GRAD]:
        add(first, WEIGHT_GRAD)
    return [action for action in actions if action[2] < m]


# ---------------------------------------------------------------------------------------------
# Memory: what a rank holds at once


@lru_cache(maxsize=4096)
def in_flight(
    schedule: str, pp: int, virtual: int, microbatches: int, rank: int
) -> tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """The moments that can hold a rank's peak: (held, pending, done) per local stage, where
    `held` counts micro-batches whose forward has run and whose graph is kept (until B or W),
    `pending` those between their I and W actions (their intermediate gradients are kept), and
    `done` those past their W, of whose graph torch 2.13 keeps the part W did not run (the nodes
    on no parameter's path, which I ran with retain_graph) until the step ends. torch's first
    stage runs its whole backward in W and keeps neither. Only moments that no other moment
    exceeds in every count are listed."""
    parallel = ParallelConfig(engine="torch", pp=pp, schedule=schedule, virtual_stages=virtual)
    local = {stage: k for k, stage in enumerate(stages_of_rank(parallel, rank))}
    n = len(local)
    held, pending, done = [0] * n, [0] * n, [0] * n
    # `done` only grows: of the moments with the same held and pending counts the last exceeds
    # or equals the others in every count
    latest: dict[tuple[int, ...], tuple[int, ...]] = {}
    actions = rank_actions(schedule, pp, virtual, microbatches, rank)
    for position, (stage, kind, _) in enumerate(actions):
        k = local[stage]
        if kind == FORWARD:
            held[k] += 1
        elif kind == BACKWARD:
            held[k] -= 1
        elif kind == INPUT_GRAD:
            pending[k] += stage > 0
        else:
            held[k] -= 1
            pending[k] -= stage > 0
            done[k] += stage > 0
        # B and W only free, but for what W leaves: the moments after F and I, and the last
        if kind in (FORWARD, INPUT_GRAD) or position == len(actions) - 1:
            latest[tuple(held) + tuple(pending)] = tuple(done)
    # most first: a moment can only be exceeded in every count by one listed before it
    frontier: list[tuple[int, ...]] = []
    for x in sorted((key + value for key, value in latest.items()), key=sum, reverse=True):
        if not any(all(a <= b for a, b in zip(x, y)) for y in frontier):
            frontier.append(x)
    return tuple(sorted((x[:n], x[n : 2 * n], x[2 * n :]) for x in frontier))


# ---------------------------------------------------------------------------------------------
# Time: the bubble


def replay(
    schedule: str, pp: int, virtual: int, microbatches: int, forward: float, input_grad: float, weight: float
) -> tuple[float, float]:
    """(idle fraction, step time) of a step in which every rank runs its actions in order, each as
    soon as what it needs has finished (a forward: the previous stage's forward; a backward or
    input-gradient action: the next stage's, or on the last stage its own forward; a weight action:
    its own input-gradient action), with the given times per stage and micro-batch and no
    communication. torch's first stage computes nothing in I and its whole backward in W."""
    stages = pp * virtual
    orders = [rank_actions(schedule, pp, virtual, microbatches, rank) for rank in range(pp)]

    def seconds(stage: int, kind: str) -> float:
        if kind == FORWARD:
            return forward
        if kind == BACKWARD:
            return input_grad + weight
        if kind == INPUT_GRAD:
            return input_grad if stage > 0 else 0.0
        return weight if stage > 0 else input_grad + weight

    finished: dict[tuple, float] = {}
    free = [0.0] * pp
    position = [0] * pp
    while True:
        progressed = False
        for rank, actions in enumerate(orders):
            while position[rank] < len(actions):
                stage, kind, mb = actions[position[rank]]
                if kind == FORWARD:
                    need = (FORWARD, stage - 1, mb) if stage > 0 else None
                elif kind == WEIGHT_GRAD:
                    need = ("grad", stage, mb)
                else:
                    need = ("grad", stage + 1, mb) if stage < stages - 1 else (FORWARD, stage, mb)
                if need is not None and need not in finished:
                    break
                free[rank] = max(free[rank], finished.get(need, 0.0)) + seconds(stage, kind)
                finished[("grad" if kind in (BACKWARD, INPUT_GRAD) else kind, stage, mb)] = free[rank]
                position[rank] += 1
                progressed = True
        if not progressed:
            break
    if any(position[rank] < len(actions) for rank, actions in enumerate(orders)):
        raise RuntimeError(f"{schedule} at pp={pp}, v={virtual}, m={microbatches} cannot run in order")
    step = max(free)
    busy = microbatches * virtual * (forward + input_grad + weight)
    return 1 - busy / step, step


@lru_cache(maxsize=4096)
def bubble_fraction(schedule: str, pp: int, virtual: int, microbatches: int) -> float:
    """The idle fraction of a step with every stage equally costly and a stage's backward twice
    its forward, half of it the weight gradient (f = i = w per stage): the formulas of
    docs/pipeline.md (1F1BACKWARD (p-1)/(m+p-1); interleaved 1F1BACKWARD (p-1)/(v m+p-1); interleaved zero
    bubble (p-1) f over m v 3f, i.e. (p-1)/(3 v m+p-1); ZBV the same with v = 2 when m >= 2p - 1),
    and the replay where no formula holds (fewer micro-batches than 2p - 1 and not a multiple of
    p; ZBV's order is built for 2p - 1)."""
    p, v, m = pp, virtual, microbatches
    if p == 1:
        return 0.0
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    full_rounds = m % p == 0 or m >= 2 * p - 1  # otherwise torch's rounds leave extra gaps
    if schedule == "interleaved_1f1b" and full_rounds:
        return (p - 1) / (v * m + p - 1)
    if schedule == "zero_bubble" and full_rounds:
        return (p - 1) / (3 * v * m + p - 1)
    if schedule == "zbv" and m >= 2 * p - 1:
        return (p - 1) / (6 * m + p - 1)
    return replay(schedule, p, v, m, 1.0, 1.0, 1.0)[0]
