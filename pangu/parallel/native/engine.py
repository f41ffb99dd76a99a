"""The torch engine: pangu's stages under torch.distributed.pipelining, DTensor and FSDP2.

- Mesh: (pp, dp, tp) over pangu's rank mapping (tp fastest, then dp, then pp).
- Stages: this rank's stages of the cut in pangu/parallel/stages.py (one, or several with
  interleaved schedules), each a `PanguStage` built on the meta device, split by the tensor-
  (and sequence-) parallel plan (layers.py), wrapped by FSDP2 per transformer layer and per
  stage, then materialised: each rank allocates and initialises only its shard.
- Data parallelism: FSDP2 `fully_shard` over dp (at dp = 1 only for bf16/fp16, where it keeps the
  fp32 master weights): parameters, gradients and optimizer state sharded; gradients reduced in
  fp32 and reduce-scattered layer by layer as backward reaches them, once per step (the schedule
  syncs on the last micro-batch; earlier ones accumulate in fp32).
- Pipeline: one schedule of `parallel.schedule` over the stages, built per number of
  micro-batches (training, validation, scoring), with static shapes (train.micro_batch_size).
- The optimizer: pangu's, over each parameter's local shard (elementwise S3 runs on the shards as
  it runs on ZeRO's partitions); the gradient norm over every rank's shards, each element once;
  clipping, a skipped step on non-finite gradients, fp16's dynamic loss scale (ShardedGradScaler,
  the overflow agreed on by every rank).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from pangu.config import Config
from pangu.model import declaration
from pangu.model.init import initial_value, zero_parameters
from pangu.model.pangu_alpha import DropoutSeeds, PanguStage, TransformerLayer
from pangu.optim import registry
from pangu.optim.registry import build_optimizer
from pangu.parallel.engine import Engine, Fragment, MicroBatch, Replicas, StepResult, micro_batches_per_step
from pangu.parallel.native.layers import DTensorLayers, local_box, parallelize
from pangu.parallel.stages import num_stages, stage_bounds, stages_of_rank
from pangu.parallel.topology import Topology, device

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine(Engine):
    """pangu's engine interface over torch's own parallelism (see the module docstring)."""

    def __init__(self, config: Config, topology: Topology, initialize: bool = True):
        self.config, self.topology = config, topology
        parallel, train = config.parallel, config.train
        self.device = device()
        self.mesh = init_device_mesh(
            self.device.type, (topology.pp, topology.dp, topology.tp), mesh_dim_names=("pp", "dp", "tp")
        )
        self.layers = DTensorLayers(self.mesh["tp"] if topology.tp > 1 else None, parallel.sequence_parallel)
        self.dropout_seeds = DropoutSeeds(train.seed)
        self.micro_batches = micro_batches_per_step(config, topology)
        self.compute_dtype = DTYPES[train.precision]
        self.sharded = topology.dp > 1 or train.precision != "fp32"
        bounds = stage_bounds(config, topology.tp, num_stages(parallel))
        self.stage_indices = stages_of_rank(parallel, topology.pp_rank)
        self.stages: list[PanguStage] = []
        for index in self.stage_indices:
            with torch.device("meta"):
                stage = PanguStage(
                    config.model,
                    self.layers,
                    first=bounds[index],
                    last=bounds[index + 1],
                    recompute=parallel.recompute,
                    dropout_seeds=self.dropout_seeds,
                )
            parallelize(stage, self.layers)
            if train.compile:  # each transformer layer compiled on its own: one graph, reused by every block
                for _, module in stage.trunk:
                    if isinstance(module, TransformerLayer):
                        module.compile()
            if self.sharded:
                self._shard(stage)
            stage.to_empty(device=self.device)
            self.stages.append(stage)
        self._materialise(initialize)
        self._build_optimizer()
        self._tied_group = self._embedding_group()
        self.pipeline_stages = [
            self._pipeline_stage(stage, index) for stage, index in zip(self.stages, self.stage_indices)
        ]
        self._schedules: dict[tuple[int, str], object] = {}
        self._mode, self._scale, self._loss_sum = "train", 1.0, None
        self.scaler = None
        if train.precision == "fp16":
            self.scaler = ShardedGradScaler(
                device=self.device.type,
                init_scale=2.0**train.initial_loss_scale_power,
                growth_interval=train.loss_scale_window,
                process_group=dist.group.WORLD,
            )
        self._hooks: list = []

    # -- building ---------------------------------------------------------------------------

    def _shard(self, stage: PanguStage) -> None:
        """FSDP2 over the data-parallel mesh: each transformer layer a unit of its own (gathered
        and reduced as the schedule reaches it), the stage's other parameters in its root unit."""
        dtype = self.compute_dtype if self.compute_dtype != torch.float32 else None
        options = dict(
            mesh=self.mesh["dp"],
            mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
            # kept gathered between forward and backward of a step's micro-batches (ZeRO-2's
            # memory; gathered once per step, not once per micro-batch)
            reshard_after_forward=False,
        )
        for _, module in stage.trunk:
            if isinstance(module, TransformerLayer):
                fully_shard(module, **options)
        fully_shard(stage, **options)

    def _named_parameters(self):
        for stage in self.stages:
            yield from stage.named_parameters()

    def _materialise(self, initialize: bool) -> None:
        """Each parameter's local shard drawn as pangu.model.init draws it (the same values as any
        other layout), or zeros for a checkpoint to fill."""
        table = declaration.parameter_table(self.config.model)
        self._boxes = []
        with torch.no_grad():
            for name, param in self._named_parameters():
                local = param.to_local() if isinstance(param, DTensor) else param
                box = local_box(param, name, self.config.model)
                self._boxes.append(box)
                if initialize and local.numel():
                    local.copy_(
                        initial_value(table[name], box, self.config.model, self.config.train.seed).view(local.shape)
                    )
        if not initialize:
            zero_parameters(list(self._named_parameters()))

    def _build_optimizer(self) -> None:
        """pangu's optimizer over leaf tensors that share each parameter's local shard."""
        table = declaration.parameter_table(self.config.model)
        self._params, self._local = [], []
        named = []
        for name, param in self._named_parameters():
            local = (param.to_local() if isinstance(param, DTensor) else param).detach().requires_grad_(True)
            self._params.append(param)
            self._local.append(local)
            named.append((name, local))
        self._names = [name for name, _ in named]
        self._optimizer = build_optimizer(
            self.config.optim,
            named,
            no_decay=[n for n in self._names if not table[n].weight_decay],
            scale_invariant=[n for n in self._names if table[n].scale_invariant],
        )
        group_of = {id(p): i for i, group in enumerate(self._optimizer.param_groups) for p in group["params"]}
        self._groups = [group_of[id(local)] for local in self._local]
        # copy 0 of each element is counted once in the gradient norm and read from checkpoints
        self._copies = [self._copy(name, first=stage.is_first) for name, stage in self._owners()]

    def _owners(self):
        for stage in self.stages:
            for name, _ in stage.named_parameters():
                yield name, stage

    def _copy(self, name: str, first: bool) -> int:
        if name == declaration.WORD_EMBEDDING_WEIGHT and not first:
            return 1  # the head's copy of the tied embedding; the first stage's is read
        return self.topology.tp_rank if declaration.parameter_table(self.config.model)[name].split_dim is None else 0

    def _embedding_group(self):
        """The tied word embedding's group: the ranks holding the first and the last stage, for
        each (dp, tp); None where one rank holds both (pp = 1, or ZBV's V)."""
        topology, mine = self.topology, None
        last = stages_of_rank(self.config.parallel, 0)[-1] == num_stages(self.config.parallel) - 1
        if topology.pp == 1 or last:
            return None
        for d in range(topology.dp):
            for t in range(topology.tp):
                ranks = [topology.rank_of(d, t, 0), topology.rank_of(d, t, topology.pp - 1)]
                group = dist.new_group(ranks)
                if topology.rank in ranks:
                    mine = group
        return mine

    def _reduce_tied_gradients(self) -> None:
        """The word embedding's copies (first stage, head) get the sum of their gradients."""
        grads = [
            local.grad
            for name, local in zip(self._names, self._local)
            if name == declaration.WORD_EMBEDDING_WEIGHT and local.grad is not None
        ]
        if len(grads) == 2:  # both copies on this rank (two stage modules)
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif grads and self._tied_group is not None:
            dist.all_reduce(grads[0], group=self._tied_group)

    def _pipeline_stage(self, stage: PanguStage, index: int) -> PipelineStage:
        """A pipelining stage with static shapes (no shape-inference forward): micro-batches of
        train.micro_batch_size samples of model.seq_length tokens."""
        model, topology = self.config.model, self.topology
        b, s, h = self.config.train.micro_batch_size, model.seq_length, model.hidden_size
        sequence = s // topology.tp if self.layers.sequence_parallel else s

        def meta(*shape, dtype=torch.int64, grad=False):
            return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

        side = (meta(b, s),) + ((meta(b, s, dtype=torch.int32),) if self.config.data.eod_reset else ())
        hidden = meta(b, sequence, h, dtype=self.compute_dtype, grad=True)
        inputs = (meta(b, s), *side) if stage.is_first else (hidden, *side)
        if stage.is_last:
            outputs = meta(b, s, model.padded_vocab_size // topology.tp, dtype=self.compute_dtype, grad=True)
        else:
            outputs = (hidden, *side)
        return PipelineStage(
            stage,
            index,
            num_stages(self.config.parallel),
            self.device,
            input_args=inputs,
            output_args=outputs,
            group=self.mesh["pp"].get_group(),
        )

    def _schedule(self, n: int, mode: str):
        key = (n, mode)
        if key not in self._schedules:
            kind = SCHEDULES[self.config.parallel.schedule]
            if mode != "train" and kind is not ScheduleZBVZeroBubble:
                # without backwards, schedules of the same stage placement run the same forwards;
                # GPipe's and looped BFS's take any number of micro-batches (evaluation's last batch,
                # a short task), where 1F1B needs one per stage and the interleaved ones whole rounds
                kind = ScheduleGPipe if kind is Schedule1F1B else ScheduleLoopedBFS
            stages = self.pipeline_stages[0] if issubclass(kind, PipelineScheduleSingle) else self.pipeline_stages
            self._schedules[key] = kind(stages, n_microbatches=n, loss_fn=self._loss, scale_grads=False)
        return self._schedules[key]

    # -- running micro-batches --------------------------------------------------------------

    @property
    def reads_inputs(self):
        return any(stage.is_first for stage in self.stages)

    @property
    def reads_labels(self):
        return any(stage.is_last for stage in self.stages)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target: labels, -1 where a token does not count. Training: the micro-batch's sum of
        token losses x dp / the global batch's tokens (FSDP averages over dp); validation: the same
        without the loss scale; scoring: every token's loss."""
        losses = self.layers.cross_entropy(logits, target.clamp(min=0), self.config.model.vocab_size)
        if self._mode == "tokens":
            return losses
        loss = (losses * (target >= 0)).sum() * self._scale
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        return self.scaler.scale(loss) if self.scaler is not None and self._mode == "train" else loss

    def _run(self, micro_batches: list[MicroBatch | None], mode: str, tokens: int | None) -> list:
        """One pass of the schedule over the micro-batches: (per-micro-batch losses on the last stage)."""
        self._mode, self._loss_sum = mode, None
        if tokens is not None:
            self._scale = self.topology.dp / max(tokens, 1)
        schedule = self._schedule(len(micro_batches), mode)
        args, target = (), None
        if self.reads_inputs:
            args = tuple(torch.cat(parts).to(self.device) for parts in zip(*(mb.inputs for mb in micro_batches)))
        if self.reads_labels:
            target = torch.cat([torch.where(mb.loss_mask > 0, mb.labels, -1) for mb in micro_batches])
            target = target.to(self.device)
        losses: list = []
        with self.layers.loss_context():
            if mode == "train":
                schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                with torch.no_grad():
                    schedule.eval(*args, target=target, losses=losses)
        return losses

    def _mean_loss(self) -> float:
        """The step's mean token loss, from the last stage's tp rank 0 of every dp rank, on every rank."""
        counts = self.reads_labels and self.topology.tp_rank == 0 and self._loss_sum is not None
        total = self._loss_sum.float().reshape(1) if counts else torch.zeros(1, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.topology.dp

    def train_step(self, micro_batches, tokens):
        for stage in self.stages:
            stage.train()
        self._run(micro_batches, "train", tokens)
        loss = self._mean_loss()
        for local, param in zip(self._local, self._params):
            local.grad = None if param.grad is None else _local_gradient(param)
        self._reduce_tied_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self._optimizer)
        norm = self._grad_norm()
        applied = math.isfinite(norm)
        if applied:
            clip = self.config.optim.grad_clip
            if clip > 0 and norm > clip:
                grads = [local.grad for local in self._local if local.grad is not None]
                torch._foreach_mul_(grads, clip / (norm + 1e-6))
            for hook in self._hooks:
                hook()
            if self.scaler is not None:
                self.scaler.step(self._optimizer)
            else:
                self._optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
            floor = self.config.train.min_loss_scale
            if self.scaler.get_scale() < floor:
                self.scaler.update(float(floor))
        for local in self._local:
            local.grad = None
        for stage in self.stages:
            stage.zero_grad(set_to_none=True)
        return StepResult(loss, norm if applied else float("nan"), applied)

    def _grad_norm(self) -> float:
        """The global gradient norm: every element once (shards are disjoint; tp-replicated
        parameters and the head's tied copy counted by one rank)."""
        squares = [
            local.grad.float().square().sum()
            for local, copy in zip(self._local, self._copies)
            if copy == 0 and local.grad is not None
        ]
        total = torch.stack(squares).sum().reshape(1) if squares else torch.zeros(1, device=self.device)
        dist.all_reduce(total)
        return math.sqrt(float(total))

    def evaluate(self, micro_batches, tokens):
        for stage in self.stages:
            stage.eval()
        try:
            self._run(micro_batches, "sum", tokens)
        finally:
            for stage in self.stages:
                stage.train()
        return self._mean_loss()

    def token_losses(self, micro_batches):
        for stage in self.stages:
            stage.eval()
        try:
            losses = self._run(micro_batches, "tokens", None)
        finally:
            for stage in self.stages:
                stage.train()
        if not (self.reads_labels and self.topology.tp_rank == 0):
            return None
        return [mb_losses.float().cpu() for mb_losses in losses]

    @torch.no_grad()
    def logits(self, inputs):
        if self.topology.pp != 1 or len(self.stages) != 1:
            raise ValueError("logits of a whole micro-batch need the whole network on one rank: parallel.pp = 1")
        stage = self.stages[0]
        stage.eval()
        try:
            logits = stage(*(t.to(self.device) for t in inputs))
        finally:
            stage.train()
        return self.layers.gather_vocab(logits)[..., : self.config.model.vocab_size]

    @property
    def optimizer(self):
        return self._optimizer

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_buffers(self, weights_only=False):
        out = []
        for local, group in zip(self._local, self._groups):
            tensors = {"weight": local.detach().view(-1)}
            if not weights_only:
                state = self._optimizer.state[local]
                tensors.update({key: state[key].view(-1) for key in self.state_keys_of_group(group)})
            out.append(tensors)
        return out

    def state_keys_of_group(self, group: int) -> tuple[str, ...]:
        name = self._optimizer.param_groups[group]["name"]
        return registry.get(self.config.optim.name).state_keys(self.config.optim, name)

    def state_keys(self, buffer):
        return self.state_keys_of_group(self._groups[buffer])

    def fragments(self):
        return [
            Fragment(name, box, (0, local.numel()), i, 0, copy)
            for i, (name, box, local, copy) in enumerate(zip(self._names, self._boxes, self._local, self._copies))
            if local.numel()
        ]

    def create_optimizer_state(self, zeros=True):
        spec = registry.get(self.config.optim.name)
        create = torch.zeros_like if zeros else torch.empty_like
        for local, group in zip(self._local, self._groups):
            state = self._optimizer.state[local]
            if not state:
                state.update({key: create(local, dtype=torch.float32) for key in self.state_keys_of_group(group)})
                # on the shard's device, as torch's fused optimizers need their step counts
                state.update(
                    {k: torch.tensor(v, dtype=torch.float32, device=local.device) for k, v in spec.scalar_state.items()}
                )

    def after_load(self, optimizer_state):
        """The parameters are the fp32 master weights (FSDP gathers and casts them per step)."""

    def optimizer_scalars(self):
        """Per param group (buffers of one group share them), as the DeepSpeed engine keeps them."""
        out = []
        for index, group in enumerate(self._optimizer.param_groups):
            local = next(local for local, g in zip(self._local, self._groups) if g == index)
            state = self._optimizer.state.get(local, {})
            out.append(
                {
                    "state": {
                        k: float(v) for k, v in state.items() if not (torch.is_tensor(v) and v.shape == local.shape)
                    },
                    "group": {"step": group["step"]} if "step" in group else {},
                }
            )
        return out

    def restore_optimizer_scalars(self, scalars):
        for index, (group, values) in enumerate(zip(self._optimizer.param_groups, scalars)):
            for local, g in zip(self._local, self._groups):
                if g == index:
                    for key, value in values["state"].items():
                        self._optimizer.state[local][key] = torch.tensor(
                            value, dtype=torch.float32, device=local.device
                        )
            group.update(values["group"])

    def loss_scale_state(self):
        if self.scaler is None:
            return {}
        return {"scale": float(self.scaler.get_scale()), "good_steps": int(self.scaler.state_dict()["_growth_tracker"])}

    def restore_loss_scale(self, values):
        if self.scaler is None or not values:
            return
        if "cur_iter" in values:  # written by the DeepSpeed engine before the engine interface
            values = {"scale": values["cur_scale"], "good_steps": values["cur_iter"] - values["last_overflow_iter"] - 1}
        if "scale" not in values:
            return
        state = self.scaler.state_dict()
        state.update(scale=values["scale"], _growth_tracker=values["good_steps"] % self.config.train.loss_scale_window)
        self.scaler.load_state_dict(state)

    def before_optimizer_step(self, hook):
        self._hooks.append(hook)

    def replicas(self):
        """The shards of the parameters tensor parallelism does not split: every tp rank holds them
        (FSDP2's shards over dp are disjoint)."""
        if self.topology.tp == 1:
            return []
        table = declaration.parameter_table(self.config.model)
        unsplit = [
            (name, local)
            for name, local in zip(self._names, self._local)
            if table[name].split_dim is None and local.numel()
        ]
        return [Replicas(self.mesh["tp"].get_group(), unsplit)]

    def memory_report(self):
        """Bytes this rank holds: the compute copy of its stages' parameters (gathered over dp
        during a step, in the precision trained), the fp32 master shards, the fp32 gradient shards
        and the optimizer state."""
        element = torch.empty((), dtype=self.compute_dtype).element_size()
        gathered = sum(math.prod(p.to_local().shape if isinstance(p, DTensor) else p.shape) for p in self._params)
        if self.sharded:
            gathered = sum(
                math.prod(
                    b - a
                    for a, b in declaration.parameter_table(self.config.model)[name].local_range(0, self.topology.tp)
                )
                for name in self._names
            )
        shard = sum(local.numel() * local.element_size() for local in self._local)
        state = self._optimizer.state
        return {
            "parameter_bytes": gathered * element,
            "master_weight_bytes": shard if self.sharded else 0,
            "gradient_bytes": shard,
            "optimizer_state_bytes": sum(
                v.numel() * v.element_size()
                for local in self._local
                for v in state.get(local, {}).values()
                if torch.is_tensor(v) and v.dim() > 0
            ),
        }


def _local_gradient(param: torch.Tensor) -> torch.Tensor:
    """The gradient of this rank's shard of `param`. DTensor leaves a gradient in whatever
    placement autograd produced (e.g. partial sums, or the whole tensor where the parameter is
    split): it is laid out as the parameter is first (FSDP2 has done so for its parameters)."""
    grad = param.grad
    if not isinstance(grad, DTensor):
        return grad.detach()
    if grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local().detach()
