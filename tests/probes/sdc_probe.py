"""Run under torchrun (or alone) by tests/training/test_sdc.py: `pangu pretrain` with faults
injected into one rank, as silent data corruption would leave them.

    torchrun --standalone --nproc-per-node W tests/probes/sdc_probe.py FAULTS.json PRETRAIN-ARGS...

FAULTS.json lists {"kind", "step", "rank"}:
- "state": before optimizer step `step`, bit `bit` (default 30: a value below 2 becomes ~2^128
  times larger; 31: the sign) of one element of the optimizer state `key` ("m" or "s"), in the
  middle of the largest fragment this rank owns;
- "weight": after step `step`, bit 0 (the last bit of the mantissa) of the first element of the
  largest weight this rank holds as a replica of other ranks'.
Each injection appends {"kind", "step", "rank", "parameter", "element"} (the element in the full
tensor; the state's only) to FAULTS.json's sibling `injected.jsonl`, which the tests compare with
what the run reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pangu.cli import main
from pangu.parallel.sdc import element_of
from pangu.pretrain.trainer import Trainer


def flip(tensor: torch.Tensor, index: int, bit: int) -> None:
    """XOR one bit of a float32 element, in place (bit 31, the sign, is int32's negative bit)."""
    tensor.view(torch.int32)[index] ^= 1 << bit if bit < 31 else -(1 << 31)


def inject(trainer: Trainer, fault: dict, record: Path) -> None:
    engine = trainer.engine
    if fault["kind"] == "state":
        fragment = max((f for f in engine.fragments() if f.copy == 0), key=lambda f: f.numel)
        index = fragment.numel // 2
        flip(fragment.view(engine.checkpoint_buffers(), fault["key"]), index, fault.get("bit", 30))
        found = {"parameter": fragment.name, "element": element_of(fragment, index)}
    else:
        name, weight = max(engine.replicas()[0].named, key=lambda named: named[1].numel())
        flip(weight.view(-1), 0, 0)
        found = {"parameter": name}
    with open(record, "a") as f:
        f.write(json.dumps({**fault, **found}) + "\n")


def main_with_faults(faults_file: str, arguments: list[str]) -> int:
    faults = json.loads(Path(faults_file).read_text())
    record = Path(faults_file).with_name("injected.jsonl")
    train_step = Trainer.train_step

    def train_step_with_faults(self: Trainer) -> dict:
        mine = [f for f in faults if f["rank"] == self.topology.rank and not f.get("done")]
        for fault in mine:
            if fault["kind"] == "state" and self.step + 1 == fault["step"]:
                inject(self, fault, record)
                fault["done"] = True  # once: not again when a rollback replays the step
        result = train_step(self)
        for fault in mine:
            if fault["kind"] == "weight" and self.step == fault["step"]:
                inject(self, fault, record)
                fault["done"] = True
        return result

    Trainer.train_step = train_step_with_faults
    return main(["pretrain", *arguments])


if __name__ == "__main__":
    sys.exit(main_with_faults(sys.argv[1], sys.argv[2:]))
