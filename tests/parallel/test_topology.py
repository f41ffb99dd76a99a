"""Process groups: one configurable timeout for every group (megatron-core's and DeepSpeed's
included), a gloo group for host-side objects, and a peak FLOP/s that never fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

GROUPS_PROBE = """
import torch, torch.distributed.distributed_c10d as c10d
from pangu.config import load_config
from pangu.parallel.engine import build_engine
from pangu.parallel.topology import init_distributed
for engine in ("deepspeed", "torch"):
    config = load_config(None, ["parallel.timeout_minutes=7", "model.vocab_size=300", "model.seq_length=16",
                                "train.global_batch_size=2", "train.micro_batch_size=1", f"parallel.engine={engine}"])
    topology = init_distributed(config.parallel)
    build_engine(config, topology)
groups = list(c10d._world.pg_map)
timeouts = {str(pg._get_backend(torch.device("cpu")).options._timeout) for pg in groups}
print(len(groups), sorted(timeouts), topology.host_group is not None)
"""


def test_every_process_group_gets_the_configured_timeout():
    """megatron-core's tensor/pipeline groups, DeepSpeed's data/pipe/model groups and the torch
    engine's DeviceMesh are created with torch's default timeout unless told otherwise;
    parallel.timeout_minutes reaches all."""
    result = subprocess.run(
        [sys.executable, "-c", GROUPS_PROBE], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert int(line.split()[0]) > 5  # the default group, megatron-core's and DeepSpeed's groups
    assert "['0:07:00']" in line and line.endswith("True")


def test_the_measured_peak_is_a_positive_rate():
    import torch

    from pangu.pretrain.metrics import measure_peak_flops, peak_flops_per_device

    assert measure_peak_flops(torch.device("cpu"), torch.float32, 128, trials=2, seconds=0.02) > 1e6
    assert peak_flops_per_device(123.0, torch.device("cpu")) == 123.0


SOCKETS_PROBE = """
import os, torch.distributed as dist
from pangu.config import load_config
from pangu.parallel.topology import init_distributed
topology = init_distributed(load_config(None, ["parallel.tp=2"]).parallel)
extra = dist.new_group(backend="gloo")  # as the checkpoint writer's group
for group in (topology.host_group, extra):
    box = [dist.get_rank()]
    dist.broadcast_object_list(box, src=0, group=group)
def is_socket(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket")
    except OSError:
        return False
sockets = [sum(map(is_socket, os.listdir("/proc/self/fd")))]
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, sockets[0], group=topology.host_group)
if dist.get_rank() == 0:
    print("SOCKETS", max(gathered), flush=True)
dist.destroy_process_group()
os._exit(0)  # no interpreter teardown after gloo (see pangu.cli.entry)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_gloo_groups_connect_only_to_the_peers_they_talk_to(tmp_path):
    """World-sized gloo groups connect every pair of ranks when made (2 x 2047 sockets per rank at
    2048 ranks); pangu has gloo connect lazily, on a pair's first message."""
    script = tmp_path / "sockets.py"
    script.write_text(SOCKETS_PROBE)
    counts = {}
    for lazy in ("default", "0"):
        env = subprocess_env()
        env["OMP_NUM_THREADS"] = "1"
        if lazy == "0":
            env["TORCH_GLOO_LAZY_INIT"] = "0"
        else:
            env.pop("TORCH_GLOO_LAZY_INIT", None)
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        counts[lazy] = int(result.stdout.split("SOCKETS")[1].split()[0])
    assert counts["default"] < counts["0"], counts
