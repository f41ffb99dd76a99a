"""How the ranks and worker processes of `prepare` work together.

`Group` is what prepare needs of the ranks: their number, this one's, and `gather` (every rank's
value on every rank; a barrier too). A plain process is `Alone`; under torchrun
`pangu/commands/prepare.py` passes a gloo group, so that this package imports no torch.
`together` runs a step on every rank and turns a DataError on any rank into the same DataError
on all of them. `Workers` is a rank's pool of worker processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from pangu.data import DataError
from pangu.data.pieces import Job, init_worker

T = TypeVar("T")


class Group(Protocol):
    """The ranks preparing together. `gather(value)` returns every rank's value, in rank order,
    on every rank (a barrier too)."""

    rank: int
    world_size: int

    def gather(self, value: Any) -> list[Any]: ...


class Alone:
    rank, world_size = 0, 1

    def gather(self, value: Any) -> list[Any]:
        return [value]


def together(group: Group, step: Callable[[], T]) -> list[Any]:
    """Run `step` on every rank, then meet: a DataError on any rank is raised on every rank (the
    first one's message), so that no rank waits for another that gave up. Returns each rank's result."""
    try:
        outcome: tuple[str, Any] = ("ok", step())
    except DataError as err:
        outcome = ("error", f"{err}" if group.world_size == 1 else f"rank {group.rank}: {err}")
    outcomes = group.gather(outcome)
    errors = [message for status, message in outcomes if status == "error"]
    if errors:
        raise DataError(errors[0])
    return [value for _, value in outcomes]


def num_proc(num_proc: int) -> int:
    """Worker processes for this rank: data.num_proc, or (0) its share of the node's cores; never
    more than the cores, since each worker holds a tokenizer and a dictionary (~100 MB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if num_proc > cores:
        warnings.warn(f"data.num_proc = {num_proc} is more than the {cores} cores here: using {cores}", stacklevel=2)
        return cores
    return num_proc or share


def _init_pool_worker(job: Job) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, workers must not each
    # print a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(job)


class Workers:
    """`num_proc` spawned worker processes (each runs `init_worker(job)` once), or, for one, this
    process itself. Spawned rather than forked: a rank holding a gloo group must not fork."""

    def __init__(self, num_proc: int, job: Job, tasks: int) -> None:
        self.size = max(1, min(num_proc, tasks))
        self.pool = None
        if self.size == 1:
            init_worker(job)
        else:
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(self.size, initializer=_init_pool_worker, initargs=(job,))

    def map(self, function: Callable[[Any], T], tasks: list[Any]) -> Iterator[T]:
        if self.pool is None:
            return map(function, tasks)
        return self.pool.imap_unordered(function, tasks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
