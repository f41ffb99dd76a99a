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
from megatron.core import parallel_state

from pangu.config import load_config
from pangu.model.pangu_alpha import TransformerLayer
from pangu.pretrain.trainer import Trainer


def differs_across_tp(tensor: torch.Tensor) -> bool:
    """True if this tensor is not bitwise identical on every rank of the tensor-parallel group."""
    group = parallel_state.get_tensor_model_parallel_group()
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

    block_inputs: list[torch.Tensor] = []
    for module in trainer.engine.module.modules():
        if isinstance(module, TransformerLayer):
            module.register_forward_pre_hook(lambda _, inputs: block_inputs.append(inputs[0][0].detach().clone()))

    steps = []
    while trainer.step < (trainer.config.train.stop_at or trainer.config.train.steps):
        block_inputs.clear()
        record = trainer.train_step()
        steps.append(
            {
                "step": record["step"],
                "loss": record["loss"],
                "grad_norm": record["grad_norm"],
                "skipped": bool(trainer.engine.was_step_applied() is False),
                **{k: v for k, v in record.items() if k.startswith("si_")},
            }
        )
    replicated_differ = [
        name
        for pipe_name, name in trainer.names.items()
        if not getattr(dict(trainer.engine.module.named_parameters())[pipe_name], "tensor_model_parallel", False)
        and differs_across_tp(dict(trainer.engine.module.named_parameters())[pipe_name].data)
    ]
    inputs_differ = sum(differs_across_tp(x) for x in block_inputs)
    checkpoint = trainer.save()
    memory = [None] * trainer.topology.world_size
    dist.all_gather_object(memory, dict(trainer.memory, peak_memory_bytes=record["peak_memory_bytes"]))
    flags = torch.tensor([len(replicated_differ), inputs_differ], dtype=torch.int64)
    dist.all_reduce(flags)
    scaler = getattr(trainer.engine.optimizer, "loss_scaler", None)
    if trainer.topology.rank == 0:
        result = {
            "steps": steps,
            "micro_batches": trainer.batches.micro_batches,
            "memory": memory,
            "checkpoint": str(checkpoint),
            "replicated_params_differing_across_tp": int(flags[0]),
            "block_inputs_differing_across_tp": int(flags[1]),
            "block_inputs_checked": len(block_inputs),
            "loss_scale": float(scaler.cur_scale) if scaler is not None else None,
        }
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
