"""Stopping on a signal, with every rank at the same point.

SIGUSR1 (Slurm's warning before preemption or the time limit), SIGTERM and SIGINT (Ctrl-C) ask a
run to stop. A rank cannot simply leave: its peers would wait for it in the next collective. So a
`StopRequest` only notes the signal, and the places that can take minutes (a training step, each
validation batch, each call of task scoring, the rendezvous) ask `agreed(group)`: an all-reduce
of the flag, so that every rank sees a stop at the same call, and stops there together (the
trainer then checkpoints the step it finished; `pangu evaluate` ends as after Ctrl-C). A second
Ctrl-C stops at once (KeyboardInterrupt, which `pangu` reports in one line).

One request serves a process: the newest is `StopRequest.current()`, which the rendezvous and the
engine's task scoring consult; without one (pangu used as a library) nothing is checked.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from pangu.parallel import peers

log = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """Every rank agreed to stop here, at a signal's request (raised by `StopRequest.check`)."""


class StopRequest:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    _current: StopRequest | None = None

    def __init__(self):
        self.signal_name: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._receive)
        StopRequest._current = self

    @classmethod
    def current(cls) -> StopRequest | None:
        return cls._current

    def _receive(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: stopping at the next point where every rank can (Ctrl-C again to stop at once)")
        elif first:
            log.info("%s: stopping at the next point where every rank can", self.signal_name)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signal_name is not None

    def agreed(self, group: dist.ProcessGroup, where: str) -> bool:
        """Whether any rank of `group` received a stop signal (every rank gets the same answer;
        every rank must call). `where` names the point, should a rank never arrive."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        with peers.watched(where, group):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def check(self, group: dist.ProcessGroup, where: str) -> None:
        """Raises Stopped on every rank of `group` when any of them received a stop signal."""
        if self.agreed(group, where):
            raise Stopped(f"{self.signal_name or 'a signal to another rank'}, during {where}")
