"""train.sdc_check (docs/sdc.md): silent data corruption found where S3 makes it cheap to see.

- The update bound. In exact arithmetic no coordinate of an S3 update moves by more than lr (plus
  decay). The optimizer checks that inside its step (pangu/optim/s3.py: UpdateBound) and holds the
  coordinates that break it; here, after the step, one all-reduce of each rank's largest
  |update| / lr tells every rank whether any coordinate anywhere broke it, and in that rare step
  every rank names its own: the parameter and element (from the engine's fragments), the rank
  and its host.
- Fingerprints. The weights ranks hold identically (`Engine.replicas`) are checksummed: the sum
  of their bits read as integers, which any single flipped bit changes and which, being exact
  integer arithmetic, is the same number for the same bytes on any device in any order. Each
  group of replicas gathers its checksums (one small all-gather), and a rank whose checksum
  differs from the majority's is named with the parameter (with two replicas, both are named).
"""

from __future__ import annotations

import math
import socket
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pangu.config import SdcCheckConfig
from pangu.optim.s3 import BoundRecord, UpdateBound, held_coordinates
from pangu.parallel.engine import Engine, Fragment, Replicas
from pangu.parallel.topology import Topology, device

# integer types of each float width: a checksum reads a tensor's bytes as integers of its width
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Findings:
    """What train.sdc_check found after one step, the same on every rank."""

    update_ratio: float | None = None  # the largest |update| / lr over every rank; None: nothing checked
    violations: list[dict] = field(default_factory=list)  # per rank and tensor: coordinates above the bound
    disagreements: list[dict] = field(default_factory=list)  # per parameter: replicas whose checksums differ

    def __bool__(self) -> bool:
        return bool(self.violations or self.disagreements)

    def describe(self) -> str:
        """The findings in one line, for the warning or the error the trainer prints."""
        said = [
            f"the S3 update of {v['parameter']} at element {v['element']} on rank {v['rank']} ({v['host']}) was "
            f"above its bound of lr ({v['coordinates']} coordinate(s) of that tensor; the largest: "
            f"{v['ratio']:.3g} x lr)"
            for v in self.violations
        ]
        said += [
            f"{d['parameter']} differs on "
            + ", ".join(f"rank {rank} ({host})" for rank, host in zip(d["ranks"], d["hosts"], strict=True))
            + (
                " from the other replicas"
                if d["majority"]
                else ", replicas of each other with no majority to tell which is right"
            )
            + f" (ranks {', '.join(map(str, d['replicas']))})"
            for d in self.disagreements
        ]
        return "; ".join(said)


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's elements read as integers of their width, in int64 (0-d, on its device)."""
    flat = tensor.detach().contiguous().view(-1)
    return flat.view(_BITS[flat.element_size()]).sum(dtype=torch.int64)


def odd_ones_out(values: list[int]) -> tuple[list[int], bool]:
    """The positions whose value differs from a strict majority's, and whether there is one
    (without, every position: which values are right cannot be told; two that differ: both)."""
    counts = Counter(values).most_common()
    if len(counts) == 1:
        return [], True
    majority = counts[0][1] > len(values) / 2
    if not majority:
        return list(range(len(values))), False
    return [i for i, value in enumerate(values) if value != counts[0][0]], True


def element_of(fragment: Fragment, offset: int) -> list[int]:
    """The coordinates in the full tensor of element `offset` of a fragment's stored elements."""
    index = fragment.flat[0] + offset
    shape = [stop - start for start, stop in fragment.box]
    coordinates = []
    for size in reversed(shape):
        index, position = divmod(index, size)
        coordinates.append(position)
    return [start + position for (start, _), position in zip(fragment.box, reversed(coordinates), strict=True)]


class SdcCheck:
    """train.sdc_check on one rank: `after_step` after every optimizer step, on every rank."""

    def __init__(self, config: SdcCheckConfig, engine: Engine, topology: Topology, bounded: bool):
        """bounded: the optimizer checks the bound (S3, or sgd_si's S3 groups)."""
        self.engine, self.topology = engine, topology
        self.bound = None
        if bounded:
            self.bound = engine.optimizer.update_bound = UpdateBound(config.tolerance)
        self.hosts: list[str] = [""] * topology.world_size  # every rank's, to name where a finding was
        dist.all_gather_object(self.hosts, socket.gethostname(), group=topology.host_group)
        self.rollbacks = 0

    def after_step(self, fingerprint: bool) -> Findings:
        """The bound's verdict on the step just taken and, with `fingerprint`, the replicas'."""
        findings = Findings()
        if self.bound is not None:
            findings.update_ratio, findings.violations = self._update_bound()
        if fingerprint:
            findings.disagreements = self._fingerprints()
        return findings

    # -- the update bound -------------------------------------------------------------------

    def _update_bound(self) -> tuple[float | None, list[dict]]:
        records = self.bound.take()
        largest = torch.full((1,), -math.inf, device=device())  # a rank without S3 tensors, or a skipped step
        if records:
            largest = torch.stack([r.largest for r in records]).max().reshape(1).nan_to_num(nan=math.inf).to(largest)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        ratio = float(largest)
        if ratio <= self.bound.limit:
            return (None if ratio == -math.inf else ratio), []
        mine = [self._name(r) for r in records if not r.largest <= self.bound.limit]
        gathered: list[list[dict]] = [[] for _ in range(self.topology.world_size)]
        dist.all_gather_object(gathered, mine, group=self.topology.host_group)
        return ratio, [v for rank in gathered for v in rank]

    def _name(self, record: BoundRecord) -> dict:
        """A violation in terms a user reads: the parameter and element of the first coordinate
        held, and how many were."""
        buffers = self.engine.checkpoint_buffers(weights_only=True)
        buffer = next(i for i, b in enumerate(buffers) if b["weight"].data_ptr() == record.param.data_ptr())
        fragments = [f for f in self.engine.fragments() if f.buffer == buffer]
        held = held_coordinates(record)
        # without a mark (a kernel that lost the sign of -0.0) the tensor is all that can be named
        names = sorted({f.name for f in fragments})
        parameter = names[0] if len(names) == 1 else f"one of the {len(names)} parameters of buffer {buffer}"
        element: list[int] = []
        if len(held):
            parameter = f"(padding of buffer {buffer})"  # ZeRO's alignment padding belongs to no parameter
            for fragment in fragments:
                if fragment.start <= int(held[0]) < fragment.start + fragment.numel:
                    parameter, element = fragment.name, element_of(fragment, int(held[0]) - fragment.start)
                    break
        return {
            "parameter": parameter,
            "element": element,
            "rank": self.topology.rank,
            "host": self.hosts[self.topology.rank],
            "ratio": float(record.largest.nan_to_num(nan=math.inf)),
            "coordinates": len(held),
        }

    # -- fingerprints -----------------------------------------------------------------------

    def _fingerprints(self) -> list[dict]:
        """Every group of replicas compares its checksums; every rank learns every disagreement."""
        mine = []
        for replicas in self.engine.replicas():
            mine += self._disagreements(replicas)
        found = torch.tensor([len(mine)], device=device())
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if not found.item():  # the usual case: one integer, not every rank's list
            return []
        gathered: list[list[dict]] = [[] for _ in range(self.topology.world_size)]
        dist.all_gather_object(gathered, mine, group=self.topology.host_group)
        return [d for rank in gathered for d in rank]

    def _disagreements(self, replicas: Replicas) -> list[dict]:
        """This group's disagreements, reported by its first rank only (every member sees the same)."""
        ranks = dist.get_process_group_ranks(replicas.group)
        if len(ranks) < 2 or not replicas.named:
            return []
        sums = torch.stack([checksum(tensor) for _, tensor in replicas.named])
        gathered = [torch.empty_like(sums) for _ in ranks]
        dist.all_gather(gathered, sums, group=replicas.group)
        if self.topology.rank != ranks[0]:
            return []
        table = torch.stack(gathered).cpu().tolist()  # [rank in the group][parameter]
        out = []
        for index, (name, _) in enumerate(replicas.named):
            odd, majority = odd_ones_out([row[index] for row in table])
            if odd:
                named = [ranks[i] for i in odd]
                hosts = [self.hosts[rank] for rank in named]
                out.append({"parameter": name, "ranks": named, "hosts": hosts, "replicas": ranks, "majority": majority})
        return out
