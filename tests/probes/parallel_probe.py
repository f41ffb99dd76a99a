"""Run under torchrun by tests/parallel/conftest.py: trains with pangu's Trainer, case after case,
in one process group, and records everything the tests compare, so that each world size is
launched once (process start-up, imports and the rendezvous are paid once for all its cases).

    torchrun --standalone --nproc-per-node W tests/probes/parallel_probe.py RESULT.json CASES.json

CASES.json: a list of {"name", "args": pangu pretrain's arguments (--config, --set k=v ...),
"resume_from": optional checkpoint directory copied into the case's train.output_dir/checkpoints
first}.
Recorded per case (rank 0 writes RESULT.json: {name: record}): per step loss, grad norm and
whether it was skipped; the per-rank memory report and peak memory; whether every tensor-parallel-
replicated parameter, and every transformer block's input, is bitwise equal across the tp ranks;
the final checkpoint's path (the tests read weights and optimizer state from it, layout-
independently); the fp16 loss scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pangu.config import ParallelConfig, load_config
from pangu.model import declaration
from pangu.model.pangu_alpha import TransformerLayer
from pangu.parallel.topology import init_distributed
from pangu.pretrain.trainer import Trainer


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (the torch engine's parameters), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def tensor_parallel_group(topology):
    """This rank's tensor-parallel group (every rank makes every group: new_group is collective)."""
    mine = None
    for p in range(topology.pp):
        for d in range(topology.dp):
            ranks = [topology.rank_of(d, t, p) for t in range(topology.tp)]
            group = dist.new_group(ranks)
            if topology.rank in ranks:
                mine = group
    return mine


def differs_across_tp(tensor: torch.Tensor, group) -> bool:
    """True if this tensor is not bitwise identical on every rank of the tensor-parallel group."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return any(not torch.equal(gathered[0], other) for other in gathered[1:])


def run_case(case: dict) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(case["args"])
    config = load_config(args.config, args.overrides)
    if case.get("resume_from") and dist.get_rank() == 0:
        source = Path(case["resume_from"])
        shutil.copytree(source, Path(config.train.output_dir) / "checkpoints" / source.name)
    dist.barrier()
    trainer = Trainer(config)
    group = tensor_parallel_group(trainer.topology)
    block_inputs: list[torch.Tensor] = []
    hooks = [
        module.register_forward_pre_hook(lambda _, inputs: block_inputs.append(inputs[0].detach().clone()))
        for stage in trainer.engine.stages
        for module in stage.modules()
        if isinstance(module, TransformerLayer)
    ]
    steps = []
    record: dict = {}
    while trainer.step < (trainer.config.train.stop_at or trainer.config.train.steps):
        block_inputs.clear()
        record = trainer.train_step()
        if trainer.config.train.save_interval and trainer.step % trainer.config.train.save_interval == 0:
            trainer.save()  # as the trainer's run() does
        steps.append(
            {
                "step": record["step"],
                "loss": record["loss"],
                "grad_norm": record["grad_norm"],
                "skipped": record["skipped"],
                **{k: v for k, v in record.items() if k.startswith("si_")},
            }
        )
    for hook in hooks:
        hook.remove()
    table = declaration.parameter_table(trainer.config.model)
    replicated_differ = [
        name
        for stage in trainer.engine.stages
        for name, param in stage.named_parameters()
        if table[name].split_dim is None and differs_across_tp(local(param.data), group)
    ]
    inputs_differ = sum(differs_across_tp(x, group) for x in block_inputs)
    checkpoint = trainer.save()
    trainer.checkpoints.wait()
    memory = [None] * trainer.topology.world_size
    dist.all_gather_object(memory, dict(trainer.memory, peak_memory_bytes=record.get("peak_memory_bytes")))
    flags = torch.tensor([len(replicated_differ), inputs_differ], dtype=torch.int64)
    dist.all_reduce(flags)
    return {
        "steps": steps,
        "micro_batches": trainer.batches.micro_batches,
        "memory": memory,
        "checkpoint": str(checkpoint),
        "replicated_params_differing_across_tp": int(flags[0]),
        "block_inputs_differing_across_tp": int(flags[1]),
        "block_inputs_checked": len(block_inputs),
        "loss_scale": trainer.engine.loss_scale_state().get("scale"),
        "loss_scale_state": trainer.engine.loss_scale_state(),
    }


def main() -> None:
    result_file, cases_file = Path(sys.argv[1]), Path(sys.argv[2])
    init_distributed(ParallelConfig())  # one process group for every case
    results = {}
    for case in json.loads(cases_file.read_text()):
        results[case["name"]] = run_case(case)
        if dist.get_rank() == 0:  # written after every case: a failing case keeps the ones before
            result_file.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown after gloo: it can abort the exit (see pangu.cli.entry)


if __name__ == "__main__":
    main()
