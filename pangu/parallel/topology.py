"""Process layout: world = dp x pp x tp, tp fastest-varying, then dp, then pp.

megatron-core's `parallel_state` (tensor-parallel groups for its layers) and DeepSpeed's
`PipeModelDataParallelTopology` (pipeline and data groups for its engine) are both built from this
one mapping, and start-up asserts they agree on every rank's coordinates.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from pangu.config import ParallelConfig
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
    deepspeed_topology: PipeModelDataParallelTopology
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


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(parallel: ParallelConfig) -> Topology:
    """Joins (or, in a plain single process, creates) the process group and builds the layout.

    Launched by torchrun or Slurm the environment names the rank and world size; a plain
    `python -m pangu ...` is a world of one.
    """
    timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
    # gloo connects a rank to a peer when they first talk, not to every rank of every group when
    # the group is made (world-sized gloo groups would otherwise be full meshes: 2 x 2047 sockets
    # per rank at 2048 ranks)
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    if parallel.tp > 1:
        # megatron-core's column-parallel linears start the all-reduce of the input gradient and
        # then compute the weight gradient, relying on one CUDA work queue to run them in that
        # order (read before the CUDA context is made)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # DeepSpeed and megatron-core create their groups with torch's default timeout (10 minutes
    # for NCCL, less than a large checkpoint save may take): every group gets ours.
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

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    ds_topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    coords = ds_topology.get_coord(rank)
    megatron = (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    if (coords.data, coords.model, coords.pipe) != megatron:
        raise RuntimeError(
            f"rank {rank}: DeepSpeed places it at (dp, tp, pp) = "
            f"{(coords.data, coords.model, coords.pipe)} but megatron-core at {megatron}"
        )
    return Topology(
        world_size=world_size,
        rank=rank,
        dp=dp,
        tp=tp,
        pp=pp,
        dp_rank=coords.data,
        tp_rank=coords.model,
        pp_rank=coords.pipe,
        deepspeed_topology=ds_topology,
        host_group=dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"),
        data_parallel_host_group=parallel_state.get_data_parallel_group_gloo(),
    )


def _init_process_group(timeout: datetime.timedelta) -> None:
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    single = {}
    if "RANK" not in os.environ:  # a plain process: a world of one on a free local port
        # passed explicitly, not through os.environ, which child processes would inherit
        single = dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's PipelineModule reads it
    with deepspeed_prints_to_debug_log():
        deepspeed.init_distributed(
            dist_backend=backend(),
            timeout=timeout,
            auto_mpi_discovery=False,
            verbose=False,
            **single,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _DebugLog(io.TextIOBase):
    """A stdout for DeepSpeed's prints: each line goes to pangu's debug log."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                logger.debug("deepspeed: %s", line)
        return len(text)


@contextlib.contextmanager
def deepspeed_prints_to_debug_log():
    """DeepSpeed prints its pipeline partition and op builds on stdout, where pangu keeps results
    alone (`pangu evaluate > result.json`): around DeepSpeed calls, stdout goes to the debug log."""
    with contextlib.redirect_stdout(_DebugLog()):
        yield
