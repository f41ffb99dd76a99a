"""`pangu prepare`: clean, tokenize and shard the corpus of data.sources.

Launched by torchrun (or `launch/prepare.sbatch` under Slurm), the ranks prepare together: they
meet over a gloo group (barriers and small messages) and share the work directory for the rest.
"""

from __future__ import annotations

import json
import os

from pangu.commands.common import add_config_arguments
from pangu.config import load_config


def add_parser(commands) -> None:
    parser = commands.add_parser("prepare", help="clean, tokenize and shard the corpus of data.sources")
    add_config_arguments(parser)


class GlooGroup:
    """The ranks of this torchrun job, over gloo (CPU only: prepare needs no accelerator). They meet
    as training's ranks do (pangu.parallel.peers): a rank that waits for others (at the start, or
    for a slower rank at the end of a phase) says whom it waits for, a signal ends the wait at
    once, and the absent are named after data.timeout_minutes."""

    def __init__(self, timeout_minutes: float) -> None:
        import datetime

        import torch.distributed as dist

        from pangu.parallel import peers

        self._dist, self._peers = dist, peers
        peers.join("gloo", datetime.timedelta(minutes=timeout_minutes), timeout_key="data.timeout_minutes")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._phases = 0

    def gather(self, value):
        self._phases += 1
        where = f"step {self._phases} of prepare's exchanges"
        self._peers.meet(where)
        values = [None] * self.world_size
        with self._peers.watched(where):
            self._dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        self._dist.destroy_process_group()


def run(args) -> int:
    from pangu.data.prepare import prepare

    config = load_config(args.config, args.overrides)
    group = GlooGroup(config.data.timeout_minutes) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    try:
        report = prepare(config, group=group)
    finally:
        if group is not None:
            group.close()
    if group is None or group.rank == 0:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0
