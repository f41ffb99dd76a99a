"""Run under torchrun by tests/parallel/test_parallel.py: trains with pangu's Trainer under one layout and
records everything the tests compare, so each layout is launched once.

    torchrun --standalone --nproc-per-node W tests/probes/parallel_probe.py RESULT.json --config C --set k=v ...

Recorded (rank 0 writes RESULT.json): per step loss and grad norm; the per-rank memory report
and peak memory; whether every tensor-parallel-replicated parameter, and every transformer
block's input, is bitwise equal across the tp ranks; the final checkpoint's path (the tests read
weights and optimizer state from it, layout-independently).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from pangu.config import load_config
from pangu.model import layout
from pangu.model.pangu_alpha import TransformerLayer
from pangu.pretrain.trainer import Trainer

TP_GROUP: list = []  # this rank's tensor-parallel group


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (the torch engine's parameters), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def differs_across_tp(tensor: torch.Tensor) -> bool:
    """True if this tensor is not bitwise identical on every rank of the tensor-parallel group."""
    group = TP_GROUP[0]
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return any(not torch.equal(gathered[0], other) for other in gathered[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    trainer = Trainer(load_config(args.config, args.overrides))
    topology = trainer.topology
    for p in range(topology.pp):  # every rank makes every group (new_group is collective)
        for d in range(topology.dp):
            ranks = [topology.rank_of(d, t, p) for t in range(topology.tp)]
            group = dist.new_group(ranks)
            if topology.rank in ranks:
                TP_GROUP.append(group)

    block_inputs: list[torch.Tensor] = []
    for module in (m for stage in trainer.engine.stages for m in stage.modules()):
        if isinstance(module, TransformerLayer):
            module.register_forward_pre_hook(lambda _, inputs: block_inputs.append(inputs[0].detach().clone()))

    steps = []
    while trainer.step < (trainer.config.train.stop_at or trainer.config.train.steps):
        block_inputs.clear()
        record = trainer.train_step()
        steps.append(
            {
                "step": record["step"],
                "loss": record["loss"],
                "grad_norm": record["grad_norm"],
                "skipped": record["skipped"],
                **{k: v for k, v in record.items() if k.startswith("si_")},
            }
        )
    table = layout.parameter_table(trainer.config.model)
    replicated_differ = [
        name
        for stage in trainer.engine.stages
        for name, param in stage.named_parameters()
        if table[name].split_dim is None and differs_across_tp(local(param.data))
    ]
    inputs_differ = sum(differs_across_tp(x) for x in block_inputs)
    checkpoint = trainer.save()
    memory = [None] * trainer.topology.world_size
    dist.all_gather_object(memory, dict(trainer.memory, peak_memory_bytes=record["peak_memory_bytes"]))
    flags = torch.tensor([len(replicated_differ), inputs_differ], dtype=torch.int64)
    dist.all_reduce(flags)
    if trainer.topology.rank == 0:
        result = {
            "steps": steps,
            "micro_batches": trainer.batches.micro_batches,
            "memory": memory,
            "checkpoint": str(checkpoint),
            "replicated_params_differing_across_tp": int(flags[0]),
            "block_inputs_differing_across_tp": int(flags[1]),
            "block_inputs_checked": len(block_inputs),
            "loss_scale": trainer.engine.loss_scale_state().get("scale"),
        }
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()  # gloo groups left open can abort the exit


if __name__ == "__main__":
    main()
