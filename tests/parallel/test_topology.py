"""Process groups: one configurable timeout for every group (megatron-core's and DeepSpeed's
included), a gloo group for host-side objects, and a peak FLOP/s that never fails."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import subprocess_env

GROUPS_PROBE = """
import torch, torch.distributed.distributed_c10d as c10d
from pangu.config import load_config
from pangu.parallel.engine import build_engine
from pangu.parallel.tensor_parallel import seed_rng_streams
from pangu.parallel.topology import init_distributed
config = load_config(None, ["parallel.timeout_minutes=7", "model.vocab_size=300", "model.seq_length=16",
                            "train.global_batch_size=2", "train.micro_batch_size=1"])
topology = init_distributed(config.parallel)
seed_rng_streams(0)
build_engine(config, topology)
groups = list(c10d._world.pg_map)
timeouts = {str(pg._get_backend(torch.device("cpu")).options._timeout) for pg in groups}
print(len(groups), sorted(timeouts), topology.host_group is not None)
"""


def test_every_process_group_gets_the_configured_timeout():
    """megatron-core's tensor/pipeline groups and DeepSpeed's data/pipe/model groups are created
    with torch's default timeout unless told otherwise; parallel.timeout_minutes reaches all."""
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
