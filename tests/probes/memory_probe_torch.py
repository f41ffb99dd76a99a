"""Measures, from the real tensors of pangu's torch engine (parallel.engine = torch), what the
planner's memory model (pangu/parallel/memory_model.py) predicts for it. Run under torchrun by
tests/parallel/test_planner.py and bench/activations.py:

    torchrun --standalone --nproc-per-node W tests/probes/memory_probe_torch.py RESULT.json CASES_JSON

CASES_JSON is a JSON list of cases, {"name": ..., "config": optional YAML path, "overrides":
["section.key=value", ...]}, each a config whose tp x pp divides W (no corpus is needed: the
batches are synthetic). One launch covers several layouts, schedules and precisions. Recorded per
case and rank (rank 0 writes RESULT.json), all in bytes of the storages really allocated (each
storage once):

- `tensors`:
  `master_weights`: FSDP2's fp32 shards of the parameters (padded as FSDP pads them); 0 without
  FSDP (fp32 at dp = 1, where the parameters are the fp32 weights themselves);
  `parameters`: the compute copy the step runs with: FSDP's gathered parameters in the precision
  trained (kept from the first forward to the last backward), or the parameters themselves;
  `gradients`: the unsharded gradients accumulated over the micro-batches (FSDP's fp32
  accumulation, or param.grad without FSDP), the most seen at the start of any backward action;
  `sharded_gradients`: the gradients the optimizer steps with (after FSDP's reduce-scatter);
  `optimizer_state`: the optimizer's per-element state;
  `pipeline_buffers`: the receive buffers torch.distributed.pipelining allocates per micro-batch
  (activations from the previous stage, gradients from the next);
- `saved_forward`: {stage index: bytes autograd saves during micro-batch 0's forward through it}
  (torch.autograd.graph.saved_tensors_hooks; parameter storages excluded; the inputs that
  recomputation keeps counted, since torch's checkpoint holds them outside autograd);
- `saved_peak`: the largest total alive at any moment of a real `train_step` of what a schedule
  holds per micro-batch in flight: the saved tensors, each stage's outputs until their backward
  (torch keeps them for it) and, for the zero-bubble schedules, the gradients of the intermediate
  values that an input-gradient action keeps for its weight-gradient action.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from tests.probes.memory_probe import SavedTensorMeter


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors by their local part)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = _local(tensor).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(n for ptr, n in seen.items() if ptr)


class LocalMeter(SavedTensorMeter):
    """The saved-tensor meter, counting a DTensor by its local part (what holds the memory)."""

    def storage(self, tensor: torch.Tensor):
        return _local(tensor).untyped_storage()


def fsdp_params(engine) -> list:
    """FSDP2's per-parameter records of every unit of this rank's stages (none without FSDP)."""
    out = []
    for stage in engine.stages:
        for module in stage.modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                out += group.fsdp_params if group is not None else []
    return out


def compute_copy_and_gradients(engine, records: list) -> tuple[int, int]:
    """(bytes of the parameters the step computes with, bytes of their unsharded gradients) now."""
    if records:
        gathered = storage_bytes(t for r in records for t in r.all_gather_outputs)
        grads = []
        for r in records:
            if r.unsharded_accumulated_grad is not None:
                grads.append(r.unsharded_accumulated_grad)
            elif hasattr(r, "_unsharded_param") and r._unsharded_param.grad is not None:
                grads.append(r._unsharded_param.grad)
        return gathered, storage_bytes(grads)
    params = [p for stage in engine.stages for p in stage.parameters()]
    return storage_bytes(params), storage_bytes(p.grad for p in params)


def synthetic_micro_batches(config, count: int, seed: int):
    from pangu.parallel.engine import MicroBatch

    generator = torch.Generator().manual_seed(seed)
    b, s, eod_reset = config.train.micro_batch_size, config.model.seq_length, config.data.eod_reset
    out = []
    for _ in range(count):
        ids = torch.randint(0, config.model.vocab_size, (b, s + 1), generator=generator)
        positions = torch.arange(s).expand(b, s).contiguous()
        # with data.eod_reset: two documents per sequence
        documents = (torch.arange(s) >= s // 2).to(torch.int32).expand(b, s).contiguous() if eod_reset else None
        out.append(
            MicroBatch(ids[:, :-1].contiguous(), positions, documents, ids[:, 1:].contiguous(), torch.ones(b, s))
        )
    return out


def instrument(engine, meter: LocalMeter, records: list, seen: dict) -> None:
    """Wraps each pipeline stage's actions: saved bytes of micro-batch 0's forward, the outputs
    and zero-bubble gradients a stage holds until its backward, and the compute copy and
    gradients at the start of every backward action."""
    held: dict[tuple[int, int], list] = {}

    def exclude_buffers(*_) -> None:
        """Parameter storages (FSDP allocates the gathered ones as a unit's forward starts) and
        the pipeline's receive buffers (measured on their own) are not activations."""
        tensors = [t for r in records for t in r.all_gather_outputs] + receive_buffers(engine)
        tensors += [p for stage in engine.stages for p in stage.parameters()]
        meter.excluded = {_local(t).untyped_storage().data_ptr() for t in tensors}

    for stage in engine.stages:
        for module in stage.modules():
            if isinstance(module, FSDPModule):  # runs after FSDP's own pre-forward hook (the gather)
                module.register_forward_pre_hook(exclude_buffers)

    def at_backward() -> None:
        gathered, grads = compute_copy_and_gradients(engine, records)
        seen["parameters"] = max(seen.get("parameters", 0), gathered)
        seen["gradients"] = max(seen.get("gradients", 0), grads)

    for stage in engine.pipeline_stages:
        forward, backward, weight = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

        def forward_one_chunk(microbatch, *args, _stage=stage, _forward=forward, **kwargs):
            exclude_buffers()
            before = meter.total
            output = _forward(microbatch, *args, **kwargs)
            if microbatch == 0:
                seen["saved_forward"][_stage.stage_index] = meter.total - before
            outputs, _ = _stage.fwd_cache[microbatch]
            held[(_stage.stage_index, microbatch)] = [meter.hold(t) for t in outputs if torch.is_tensor(t)]
            return output

        def backward_one_chunk(microbatch, *args, _stage=stage, _backward=backward, full_backward=True, **kwargs):
            at_backward()
            result = _backward(microbatch, *args, full_backward=full_backward, **kwargs)
            key = (_stage.stage_index, microbatch)
            if full_backward:
                held.pop(key, None)
            elif microbatch in _stage.backward_state:  # kept for the weight-gradient action
                _, groups, _, _ = _stage.backward_state[microbatch]
                grads = [g for group in groups or [] for g in group.get("grads") or [] for g in _tensors(g)]
                if microbatch == 0:
                    seen["zero_bubble_grads"][_stage.stage_index] = storage_bytes(grads)
                held[key] += [meter.hold(g) for g in grads]
            return result

        def backward_weight_one_chunk(microbatch, *args, _stage=stage, _weight=weight, **kwargs):
            at_backward()
            result = _weight(microbatch, *args, **kwargs)
            held.pop((_stage.stage_index, microbatch), None)
            return result

        stage.forward_one_chunk = forward_one_chunk
        stage.backward_one_chunk = backward_one_chunk
        stage.backward_weight_one_chunk = backward_weight_one_chunk


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple of gradients."""
    if torch.is_tensor(value):
        return [value]
    return [t for item in value or () for t in _tensors(item)] if isinstance(value, (tuple, list)) else []


def receive_buffers(engine) -> list[torch.Tensor]:
    """What torch.distributed.pipelining receives into: per micro-batch, the previous stage's
    outputs and the next stage's gradients."""
    tensors = []
    for stage in engine.pipeline_stages:
        for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()):
            tensors += [info.buffer for info in infos if getattr(info, "buffer", None) is not None]
    return tensors


def measure_case(config) -> dict:
    """Builds the torch engine for `config` on this rank and measures one real step."""
    from pangu.model import factory
    from pangu.parallel.engine import build_engine, micro_batches_per_step
    from pangu.parallel.topology import init_distributed

    topology = init_distributed(config.parallel)
    torch.manual_seed(config.train.seed)
    engine = build_engine(config, topology)
    engine.create_optimizer_state()
    records = fsdp_params(engine)
    optimizer = engine.optimizer
    tensors = {
        "master_weights": storage_bytes(r._sharded_param_data for r in records),
        "optimizer_state": sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        ),
    }
    m = micro_batches_per_step(config, topology)
    seen: dict = {"saved_forward": {}, "zero_bubble_grads": {}}
    meter = LocalMeter(set())
    instrument(engine, meter, records, seen)

    def at_optimizer_step() -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        seen["sharded_gradients"] = storage_bytes(grads)

    engine.before_optimizer_step(at_optimizer_step)
    original_checkpoint = factory.checkpoint
    factory.checkpoint = meter.checkpoint_wrapper(original_checkpoint)
    try:
        engine.dropout_seeds.start_step(0, list(range(m)))
        micro_batches = synthetic_micro_batches(config, m, seed=2 + topology.dp_rank)
        tokens = topology.dp * m * config.train.micro_batch_size * config.model.seq_length
        with meter.hooks(), meter.recomputation():
            engine.train_step(micro_batches, tokens)
    finally:
        factory.checkpoint = original_checkpoint
    if not records:  # without FSDP the parameters are the fp32 weights, unchanged by a step
        seen["parameters"] = storage_bytes(p for stage in engine.stages for p in stage.parameters())
    tensors.update(
        parameters=seen.get("parameters", 0),
        gradients=seen.get("gradients", 0),
        sharded_gradients=seen.get("sharded_gradients", 0) if records else 0,
        pipeline_buffers=storage_bytes(receive_buffers(engine)),
    )
    return {
        "rank": topology.rank,
        "dp_rank": topology.dp_rank,
        "tp_rank": topology.tp_rank,
        "pp_rank": topology.pp_rank,
        "layout": [topology.dp, topology.tp, topology.pp],
        "stages": list(engine.stage_indices),
        "micro_batches": m,
        "tensors": tensors,
        "saved_forward": {str(k): v for k, v in seen["saved_forward"].items()},
        "zero_bubble_grads": {str(k): v for k, v in seen["zero_bubble_grads"].items()},
        "saved_peak": meter.peak,
    }


def run_cases(cases: list[dict]) -> dict[str, list[dict]]:
    """{case name: [per-rank measurements]} (gathered on every rank)."""
    import torch.distributed as dist

    from pangu.config import load_config

    results = {}
    for case in cases:
        if dist.get_rank() == 0:
            print(f"memory probe: {case['name']}", file=sys.stderr, flush=True)
        measured = measure_case(load_config(case.get("config"), case["overrides"]))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured)
        results[case["name"]] = gathered
    return results


def main() -> None:
    import torch.distributed as dist

    from pangu.config import ParallelConfig
    from pangu.parallel.topology import init_distributed

    result_file, cases = sys.argv[1], json.loads(sys.argv[2])
    init_distributed(ParallelConfig())  # one process group for every case
    results = run_cases(cases)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()  # gloo groups left open can abort the exit


if __name__ == "__main__":
    main()
