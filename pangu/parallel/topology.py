"""Process layout: world = dp x pp x tp, tp fastest-varying, then dp, then pp.

This module joins the process group and says where this rank sits; it knows no engine. Each
engine builds its own groups from the same mapping (the DeepSpeed engine: megatron-core's
parallel state and DeepSpeed's topology, checked to agree; the torch engine: a DeviceMesh of
shape (pp, dp, tp)). Host-side groups (gloo) for Python objects and counts are made here.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from pangu.config import ParallelConfig
from pangu.parallel import peers
from pangu.parallel.stop import StopRequest
from pangu.schema import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    dp: int
    tp: int
    pp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    host_group: dist.ProcessGroup  # gloo, every rank: for Python objects and host tensors
    data_parallel_host_group: dist.ProcessGroup  # gloo, this rank's data-parallel group: host tensors

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def layout(self) -> str:
        return f"(dp, tp, pp) = ({self.dp}, {self.tp}, {self.pp})"

    def rank_of(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        """The global rank at these coordinates (tp fastest, then dp, then pp)."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(parallel: ParallelConfig) -> Topology:
    """Joins (or, in a plain single process, creates) the process group and places this rank.

    Launched by torchrun or Slurm the environment names the rank and world size; a plain
    `python -m pangu ...` is a world of one.
    """
    timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
    # gloo connects a rank to a peer when they first talk, not to every rank of every group when
    # the group is made (world-sized gloo groups would otherwise be full meshes: 2 x 2047 sockets
    # per rank at 2048 ranks)
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    if parallel.tp > 1 and parallel.engine == "deepspeed":
        # megatron-core's column-parallel linears start the all-reduce of the input gradient and
        # then compute the weight gradient, relying on one CUDA work queue to run them in that
        # order (read before the CUDA context is made)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # DeepSpeed, megatron-core and DeviceMesh create their groups with torch's default timeout
    # (10 minutes for NCCL, less than a large checkpoint save may take): every group gets ours.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        _init_process_group(timeout)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    tp, pp = parallel.tp, parallel.pp
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}: "
            f"launch a multiple of {tp * pp} processes, or change parallel.tp / parallel.pp"
        )
    dp = world_size // (tp * pp)
    tp_rank, dp_rank, pp_rank = rank % tp, rank // tp % dp, rank // (tp * dp)
    host = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    # every rank makes every data-parallel group (new_group is collective), and keeps its own
    data_parallel = None
    for p in range(pp):
        for t in range(tp):
            ranks = [(p * dp + d) * tp + t for d in range(dp)]
            group = dist.new_group(ranks, backend="gloo") if dp < world_size else host
            if rank in ranks:
                data_parallel = group
    return Topology(
        world_size=world_size,
        rank=rank,
        dp=dp,
        tp=tp,
        pp=pp,
        dp_rank=dp_rank,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        host_group=host,
        data_parallel_host_group=data_parallel,
    )


def _init_process_group(timeout: datetime.timedelta) -> None:
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "RANK" not in os.environ:  # a plain process: a world of one on a free local port
        # passed explicitly, not through os.environ, which child processes would inherit
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's PipelineModule reads it
        dist.init_process_group(
            backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timeout
        )
    else:  # launched: meet the other ranks in a loop that says whom it waits for and honours signals
        peers.join(backend(), timeout, StopRequest.current())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _DebugLog(io.TextIOBase):
    """A stdout for a dependency's prints: each line goes to pangu's debug log."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                logger.debug("%s", line)
        return len(text)


@contextlib.contextmanager
def prints_to_debug_log():
    """DeepSpeed prints its pipeline partition and op builds on stdout, where pangu keeps results
    alone (`pangu evaluate > result.json`): around such calls, stdout goes to the debug log."""
    with contextlib.redirect_stdout(_DebugLog()):
        yield
