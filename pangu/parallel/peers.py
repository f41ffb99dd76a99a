"""Waiting for the other ranks: joining the job, and the collectives pangu owns.

torch's own waits are silent and deaf: `init_process_group` waits for absent ranks in C++ for the
whole timeout (parallel.timeout_minutes), printing nothing and ignoring SIGTERM and Ctrl-C, and a
gloo collective that times out ends in a traceback that names no rank. Here:

- `join` meets the other ranks through the job's store (a TCPStore: torchrun's, or one rank 0
  holds) in a Python loop that says whom it waits for ("waiting for 3 of 4 ranks at HOST:PORT"),
  honours signals, and gives up after the timeout naming the absent; only then is the process
  group made, which finds every peer at once.
- `watched(where, group)` wraps a collective pangu owns (a barrier, an object gather, the stop
  agreement): each rank first writes where it is into the store (one key per rank and group,
  overwritten: one small write). When the collective fails (gloo's timeout, or a peer's
  connection closed), those keys say which ranks never got there, and a JobError names them.
- `meet(where, group)` waits in such a loop until every rank of `group` has come, before a
  collective where ranks may wait long for a slow one (a phase of `pangu prepare`): Ctrl-C and
  SIGTERM end the wait at once, and the absent are named after the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from pangu.schema import ConfigError, PanguError

log = logging.getLogger(__name__)
REPORT_AFTER_S, REPORT_EVERY_S = 5.0, 30.0  # when a wait first says whom it waits for, then how often
MAX_POLL_S = 0.5


class JobError(PanguError):
    """The job's processes could not meet: a rank absent or gone (crashed, hung, its node lost),
    or the job's store unreachable. Exit status 1, a failure of the machinery, which a launcher
    may retry (not 2, a user's error, which it must not)."""

    exit_status = 1


@dataclass
class _Job:
    store: dist.Store  # every rank's, under the prefix "pangu"
    address: str  # where the store is, for messages
    timeout: datetime.timedelta
    timeout_key: str  # the config key that set it, for messages


# What this process counted; every rank counts alike, since collectives are entered in one order
# (and several commands may run in one process, e.g. under a probe that runs them in turn).
_joins = [0]  # rendezvous taken part in
_entered: dict[str, int] = {}  # per group name: watched collectives and meetings entered
_meetings: dict[str, int] = {}  # per group name: meetings entered
_timeout: dict = {}  # of the job joined last: its collectives' timeout and the config key that set it


def join(backend: str, timeout: datetime.timedelta, stop=None, timeout_key: str = "parallel.timeout_minutes") -> None:
    """Joins the job the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as
    torchrun sets them) and makes the default process group, whose collectives time out after
    `timeout` (set by config key `timeout_key`). `stop`: a StopRequest whose signal ends the wait
    (KeyboardInterrupt); without one, the command's own handlers do."""
    _timeout.update(value=timeout, key=timeout_key)
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(
            "RANK is set but MASTER_ADDR or MASTER_PORT is not: launch with torchrun (or launch/torchrun.sh), or "
            "set both to the address where rank 0 can hold the job's store"
        )
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    address = f"{host}:{port}"
    wait = _Wait(rank, f"the rendezvous at {address}", (timeout.total_seconds(), timeout_key), stop, logging.INFO)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent holds the store
    if rank == 0 and not agent:
        try:
            store = dist.TCPStore(
                host, port, world, is_master=True, timeout=timeout, wait_for_workers=False, multi_tenant=True
            )
        except RuntimeError as err:
            raise JobError(
                f"rank 0 cannot hold the job's store at {address} ({_first_line(err)}): set MASTER_PORT to a free port"
            ) from None
    else:
        holder = "torchrun" if agent else "rank 0"
        while not _listening(host, port):
            wait.tick(lambda: f"waiting for the job's store at {address} (held by {holder})")
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    store.set_timeout(timeout)
    # a store may outlive a process group (torchrun's agent keeps its store for every command of a
    # worker, and, unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE is set, for the restarted workers):
    # every group this process joins gets keys of its own, or a rank could read a peer's address
    # left by the previous group and talk to whatever listens there now
    _joins[0] += 1
    key = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_joins[0]}"
    shared = dist.PrefixStore("pangu/rendezvous", store)
    shared.set(f"{key}/{rank}", socket.gethostname())
    arrived = shared.add(key, 1)

    def waiting_for() -> str:
        line = f"waiting for {world - arrived} of {world} ranks at {address}"
        if rank == 0:  # one line that names them is enough
            line += f" (absent: {_names([r for r in range(world) if not shared.check([f'{key}/{r}'])])})"
        return line

    while arrived < world:
        wait.tick(waiting_for)
        arrived = shared.add(key, 0)
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"default_pg/{key}", store), rank=rank, world_size=world, timeout=timeout
    )


@contextlib.contextmanager
def watched(where: str, group: dist.ProcessGroup | None = None):
    """Around a collective pangu owns, on every rank of `group`: when it fails (a timeout, a peer
    gone), a JobError names the ranks that never reached `where`, instead of gloo's traceback."""
    job, name, count = _enter(where, group)
    try:
        yield
    except RuntimeError as err:
        if not (isinstance(err, dist.DistError) or "gloo" in str(err)):
            raise
        raise JobError(_who_failed(job, name, count, where, group, err)) from None


def meet(where: str, group: dist.ProcessGroup | None = None) -> None:
    """Waits until every rank of `group` has come to `where` (each rank calls it there), in a loop
    that a signal ends (KeyboardInterrupt, from the command's handlers), says at debug level whom
    it waits for, and after the timeout raises a JobError naming the absent."""
    job, name, count = _enter(where, group)
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    key = f"meet/{name}"
    arrived = job.store.add(key, 1)
    _meetings[name] = _meetings.get(name, 0) + 1
    target = _meetings[name] * len(ranks)
    wait = _Wait(dist.get_rank(), where, (job.timeout.total_seconds(), job.timeout_key), None, logging.DEBUG)
    while arrived < target:
        wait.tick(lambda: f"waiting for {_names(_behind(job, name, count, ranks))} at {where}")
        arrived = job.store.add(key, 0)


class _Wait:
    """A Python loop waiting for other ranks: each `tick` sleeps a little (a signal's handler runs
    meanwhile), ends the wait when `stop` was asked, says now and then whom it waits for, and
    raises a JobError saying so after `limit` (seconds, and the config key that set them)."""

    def __init__(self, rank: int, where: str, limit: tuple[float, str], stop, level: int):
        self.rank, self.where, self.limit, self.stop, self.level = rank, where, limit, stop, level
        self.start = time.monotonic()
        self.next_report = self.start + REPORT_AFTER_S
        self.delay = 0.001

    def tick(self, waiting_for: Callable[[], str]) -> None:
        if self.stop is not None and self.stop.requested:
            raise KeyboardInterrupt(f"{self.stop.signal_name} at {self.where}, before any work")
        now = time.monotonic()
        seconds, key = self.limit
        if now - self.start >= seconds:
            raise JobError(
                f"rank {self.rank} gave up {waiting_for()} after {key} = {seconds / 60:g}: is every rank running, and "
                f"can it reach this one? Look at the other ranks' logs, then start the job again"
            )
        if now >= self.next_report:
            log.log(self.level, "rank %d: %s (%.0f s)", self.rank, waiting_for(), now - self.start)
            self.next_report = now + REPORT_EVERY_S
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, MAX_POLL_S)


def _job() -> _Job:
    """The store every rank of the default group shares (whoever made the group), its address and timeout."""
    store = dist.PrefixStore("pangu", c10d._get_default_store())
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}" if "MASTER_PORT" in os.environ else "here"
    timeout = _timeout.get("value", c10d.default_pg_timeout)
    return _Job(store, where, timeout, _timeout.get("key", "parallel.timeout_minutes"))


def _enter(where: str, group: dist.ProcessGroup | None) -> tuple[_Job, str, int]:
    """Notes in the store that this rank entered its next collective on `group`, at `where`."""
    job = _job()
    name = (group or dist.group.WORLD).group_name
    count = _entered[name] = _entered.get(name, 0) + 1
    job.store.set(f"at/{name}/{dist.get_rank()}", f"{count} {where}")
    return job, name, count


def _behind(job: _Job, name: str, count: int, ranks: list[int]) -> list[int]:
    """The ranks of the group that have not entered its `count`-th collective."""
    behind = []
    for rank in ranks:
        key = f"at/{name}/{rank}"
        position = job.store.get(key).decode() if job.store.check([key]) else "0 "
        if int(position.split(" ", 1)[0]) < count:
            behind.append(rank)
    return behind


def _who_failed(job: _Job, name: str, count: int, where: str, group, err: RuntimeError) -> str:
    """What a failed collective at `where` says: who never came (read from the store)."""
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    try:
        behind = _behind(job, name, count, ranks)
    except RuntimeError:
        return (
            f"the job's store at {job.address} stopped answering during {where} (the process holding it, rank 0 or "
            f"torchrun's agent, is gone): look at its log, then start the job again"
        )
    if not behind:
        return (
            f"a rank went away during {where} ({_first_line(err)}): look at the other ranks' logs, then start the job "
            f"again"
        )
    late = "Timed out" in str(err)
    return (
        f"{_names(behind)} {'did not reach' if late else 'went away before'} {where}"
        + (f" within {job.timeout_key} = {job.timeout.total_seconds() / 60:g}" if late else "")
        + f": look at {'its' if len(behind) == 1 else 'their'} log (a crash, a hang, a lost node), then start the "
        f"job again"
    )


def _names(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) != 1 else ''} {shown}"


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port (asked in Python: torch's own client
    prints a C++ stack for every failed try)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
