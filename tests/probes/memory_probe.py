"""Measures, from the real tensors of pangu's DeepSpeed engine, what the planner's memory model
(pangu/parallel/planner.py) predicts. Run under torchrun by tests/parallel/test_planner.py, or called
in-process at world size 1:

    torchrun --standalone --nproc-per-node W tests/probes/memory_probe.py RESULT.json CASES_JSON

CASES_JSON is a JSON list of cases, {"name": ..., "config": optional YAML path, "overrides":
["section.key=value", ...]}, each a config (no corpus is needed: the batches are synthetic) whose
tp x pp divides W. Every case builds its own engine, so one launch covers several layouts and
precisions. Recorded per case and rank (rank 0 writes RESULT.json):

- `report`: the engine's memory_report (what a run logs);
- `tensors`: bytes of the real allocations: the parameters, DeepSpeed's flat parameter buffer,
  the gradients where they live (BF16_Optimizer's fp32 buffer; for fp32/fp16 the param.grad),
  measured at the gradient reduction of a real step, the fp32 master partitions and the
  optimizer state (tensors with at least one dimension);
- `saved_forward`: bytes autograd saves during one forward of one micro-batch through this
  rank's stage (torch.autograd.graph.saved_tensors_hooks; each storage counted once; parameter
  storages excluded; the inputs recomputation keeps are counted too, since torch's checkpoint
  holds them outside autograd's saved tensors);
- `saved_peak`: the largest total of those bytes alive at any moment of a real `train_batch`
  (1F1B over all micro-batches, recomputation in backward included).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import weakref

import torch
import torch.utils.checkpoint as torch_checkpoint


class _Held:
    """What the pack hook returns: keeps the tensor; its finalizer tells the meter when autograd
    drops it (the node that saved it is freed)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Bytes of the storages autograd holds for backward, each storage once, alive and peak,
    with what torch's non-reentrant checkpoint (pangu's recomputation, both engines) keeps: its
    inputs, and what it recomputes in backward (stored in the checkpoint's frame, out of sight
    of the saved-tensor hooks)."""

    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0
        self.total = 0  # every storage ever saved, once

    def hold(self, tensor: torch.Tensor) -> _Held:
        held = _Held(tensor)
        storage = self.storage(tensor)
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.excluded or nbytes == 0:
            return held
        entry = self.refs.get(ptr)
        if entry is None:
            self.refs[ptr] = [nbytes, 1]
            self.live += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        weakref.finalize(held, self._release, ptr)
        return held

    def storage(self, tensor: torch.Tensor):
        """The storage whose bytes `tensor` holds."""
        return tensor.untyped_storage()

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del self.refs[ptr]
            self.live -= entry[0]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.hold, lambda held: held.tensor)

    def checkpoint_wrapper(self, original):
        """torch's non-reentrant checkpoint keeps its inputs for the recomputation until the
        layer's backward has run: count them until their gradient has been computed."""

        def checkpoint(function, *args, **kwargs):
            outputs = original(function, *args, **kwargs)
            if torch.is_grad_enabled():
                for arg in args:
                    if torch.is_tensor(arg) and arg.requires_grad:
                        held = [self.hold(arg)]
                        arg.register_hook(lambda grad, held=held: held.clear())
            return outputs

        return checkpoint

    @contextlib.contextmanager
    def recomputation(self):
        """Counts each recomputed tensor while it lives (until the backward node that needs it
        has run)."""
        original = torch_checkpoint._recomputation_hook
        meter, alive = self, {}

        class MeteredRecomputation(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                pack = self.pack_hook

                def metered(x):
                    out = pack(x)
                    held = meter.hold(out)
                    held.tensor = None  # counted, not kept: `out` lives as long as torch keeps it
                    alive[id(out)] = held
                    weakref.finalize(out, alive.pop, id(out), None)
                    return out

                self.pack_hook = metered

        torch_checkpoint._recomputation_hook = MeteredRecomputation
        try:
            yield
        finally:
            torch_checkpoint._recomputation_hook = original


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def synthetic_micro_batches(config, count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    b, s = config.train.micro_batch_size, config.model.seq_length
    out = []
    for _ in range(count):
        ids = torch.randint(0, config.model.vocab_size, (b, s + 1), generator=generator)
        positions = torch.arange(s).expand(b, s).contiguous()
        scale = torch.tensor([1.0 / (b * s)], dtype=torch.float32)
        out.append(((ids[:, :-1].contiguous(), positions), (ids[:, 1:].contiguous(), torch.ones(b, s), scale)))
    return out


def measure_case(config) -> dict:
    """Builds the engine for `config` on this rank and measures it (see the module docstring)."""
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from pangu.model import factory
    from pangu.parallel.engine import build_engine, micro_batches_per_step
    from pangu.parallel.topology import init_distributed

    topology = init_distributed(config.parallel)
    torch.manual_seed(config.train.seed)
    pangu_engine = build_engine(config, topology)
    pangu_engine.create_optimizer_state()
    report = pangu_engine.memory_report()
    engine = pangu_engine.engine  # DeepSpeed's PipelineEngine: the buffers the planner models
    module = engine.module
    params = list(module.parameters())
    ds_optimizer = engine.optimizer
    base = ds_optimizer.optimizer
    masters = [group["params"][0] for group in base.param_groups]
    flat = getattr(ds_optimizer, "bf16_groups_flat", None) or getattr(ds_optimizer, "bit16_groups_flat", None)
    tensors = {
        "parameters": _bytes(params),
        "parameter_flat_buffer": _bytes(flat or []),
        "master_weights": _bytes(masters),
        "optimizer_state": _bytes(
            v for state in base.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
        ),
    }
    excluded = {p.untyped_storage().data_ptr() for p in params} | {m.untyped_storage().data_ptr() for m in masters}

    original_checkpoint = factory.checkpoint
    original_reduce = PipelineEngine._INSTRUCTION_MAP[schedule.ReduceGrads]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision, torch.float32)
    b, s, h = config.train.micro_batch_size, config.model.seq_length, config.model.hidden_size
    try:
        # one micro-batch's forward through this stage, with synthetic inputs of the right shape
        meter = SavedTensorMeter(excluded)
        factory.checkpoint = meter.checkpoint_wrapper(original_checkpoint)
        (ids, positions), labels = synthetic_micro_batches(config, 1, seed=1)[0]
        module.train()
        if topology.is_first_stage:
            inputs = (ids, positions)
        else:
            inputs = (torch.randn(b, s, h, dtype=dtype, requires_grad=True), positions)
        with meter.hooks():
            outputs = module(inputs)
            if topology.is_last_stage:
                outputs = module.loss_fn(outputs, labels)
        saved_forward = meter.total
        del outputs, inputs

        # a real step: 1F1B over all micro-batches, the reduction, the optimizer step
        meter = SavedTensorMeter(excluded)
        factory.checkpoint = meter.checkpoint_wrapper(original_checkpoint)
        at_reduce: dict[str, int] = {}

        def reduce_grads(self, *args, **kwargs):
            buffers = getattr(ds_optimizer, "fp32_groups_gradients_flat", None)
            if buffers is not None:  # BF16_Optimizer: the fp32 buffer (bf16 gradients are added in as they come)
                at_reduce.update(gradients=_bytes(buffers))
            else:
                at_reduce.update(gradients=_bytes(p.grad for p in params if p.grad is not None))
            return original_reduce(self, *args, **kwargs)

        PipelineEngine._INSTRUCTION_MAP[schedule.ReduceGrads] = reduce_grads
        batches = synthetic_micro_batches(config, micro_batches_per_step(config, topology), seed=2)
        with meter.hooks(), meter.recomputation():
            engine.train_batch(iter(batches))
        saved_peak = meter.peak
    finally:
        factory.checkpoint = original_checkpoint
        PipelineEngine._INSTRUCTION_MAP[schedule.ReduceGrads] = original_reduce
    tensors.update(at_reduce)
    engine.destroy()
    return {
        "rank": topology.rank,
        "dp_rank": topology.dp_rank,
        "tp_rank": topology.tp_rank,
        "stage": topology.pp_rank,
        "layout": [topology.dp, topology.tp, topology.pp],
        "report": report,
        "tensors": tensors,
        "saved_forward": saved_forward,
        "saved_peak": saved_peak,
    }


def run_cases(cases: list[dict]) -> dict[str, list[dict]]:
    """{case name: [per-rank measurements]} (gathered on every rank)."""
    import torch.distributed as dist

    from pangu.config import load_config

    results = {}
    for case in cases:
        measured = measure_case(load_config(case.get("config"), case["overrides"]))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured)
        results[case["name"]] = gathered
    return results


def main() -> None:
    import torch.distributed as dist

    result_file, cases = sys.argv[1], json.loads(sys.argv[2])
    results = run_cases(cases)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown after gloo: it can abort the exit (see pangu.cli.entry)


if __name__ == "__main__":
    main()
