"""The DeepSpeed engine: pangu's stages in DeepSpeed's PipelineEngine with ZeRO stage 1.

One engine for every layout: the PipelineEngine allows ZeRO stage 1 only, so pangu uses it at
pp = 1 too. DeepSpeed owns what it does well: gradient accumulation over micro-batches, 1F1B,
data-parallel reduction, optimizer-state partitioning, gradient clipping, bf16/fp16 and loss
scaling; megatron-core the tensor-parallel layers. pangu owns the model, the optimizer and the
loss normalisation. This folder is the only place that imports DeepSpeed.
"""

from __future__ import annotations

import warnings

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pangu.config import Config
from pangu.model import declaration
from pangu.model.init import initialize_parameters, zero_parameters
from pangu.model.pangu_alpha import DropoutSeeds
from pangu.optim.registry import build_optimizer
from pangu.parallel.deepspeed import state
from pangu.parallel.deepspeed.megatron import gather_vocab, init_parallel_state, layer_factory
from pangu.parallel.deepspeed.pipeline import StagePipeline
from pangu.parallel.engine import Engine, MicroBatch, Replicas, StepResult, micro_batches_per_step
from pangu.parallel.topology import Topology, prints_to_debug_log


def deepspeed_config(config: Config, topology: Topology) -> dict:
    train = config.train
    ds = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_step(config, topology),
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        # immediate_grad_update: each micro-batch's bf16 gradient is added into the fp32 buffer as
        # backward produces it (no bf16 gradient kept for the whole model; the same sums)
        ds["bf16"] = {"enabled": True, "immediate_grad_update": True}
        # gradients accumulate over micro-batches in fp32 and are reduced over data-parallel
        # ranks in fp32 (DeepSpeed's default reduces bf16 gradients in bf16, which rounds the
        # sum to 8 bits of mantissa and makes the step depend on dp)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    elif train.precision == "fp16":
        # dynamic loss scale as in the original recipe: halve on every overflow (hysteresis 1,
        # like MindSpore's DynamicLossScaleUpdateCell) and skip that step; double after a window
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": train.initial_loss_scale_power,
            "loss_scale_window": train.loss_scale_window,
            "hysteresis": 1,
            "min_loss_scale": train.min_loss_scale,
        }
    return ds


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels (AVX512-FP16 CPUs).
    torch computes fp16 on any CPU, only slower, so pangu lets DeepSpeed's fp16 path (loss
    scaling, overflow skipping) run there: that is how it is tested without a GPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        warnings.warn(
            "fp16 on a CPU without oneDNN fp16 kernels: correct but slow; use bf16 or fp32 on CPU", stacklevel=2
        )
        accelerator.is_fp16_supported = lambda: True


class DeepSpeedEngine(Engine):
    """pangu's engine interface over DeepSpeed's PipelineEngine (see the module docstring)."""

    def __init__(self, config: Config, topology: Topology, initialize: bool = True):
        self.config, self.topology = config, topology
        with prints_to_debug_log():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        init_parallel_state(topology, config.parallel.timeout_minutes)
        self.layers = layer_factory(topology.tp)
        self.dropout_seeds = DropoutSeeds(config.train.seed)
        self.micro_batches = micro_batches_per_step(config, topology)
        self._scale = torch.ones(1)  # this step's loss normalisation, read by the loss function
        with prints_to_debug_log():
            pipe = StagePipeline(config, topology, self.layers, self._loss, self.dropout_seeds)
        self.stages = [pipe.stage]
        named = [(name.partition(".")[2], p) for name, p in pipe.named_parameters()]
        if initialize:
            initialize_parameters(named, config.model, config.train.seed, topology.tp_rank, topology.tp)
        else:
            zero_parameters(named)
        table = declaration.parameter_table(config.model)
        optimizer = build_optimizer(
            config.optim,
            named,
            no_decay=[name for name, _ in named if not table[name].weight_decay],
            scale_invariant=[name for name, _ in named if table[name].scale_invariant],
        )
        if config.train.precision == "fp16":
            allow_fp16_on_cpu()
        with prints_to_debug_log():
            self.engine, _, _, _ = deepspeed.initialize(
                model=pipe, optimizer=optimizer, config=deepspeed_config(config, topology)
            )

    # -- training and evaluation ------------------------------------------------------------

    @property
    def reads_inputs(self):
        return self.topology.is_first_stage

    @property
    def reads_labels(self):
        return self.topology.is_last_stage

    def _loss(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Training: this micro-batch's sum of token losses x the step's scale. DeepSpeed divides
        each micro-batch loss by the number of micro-batches and averages gradients over
        data-parallel ranks, so scale = micro_batches x dp / counted_tokens_of_the_global_batch,
        and the two cancel. Scoring passes the targets alone and gets every token's loss."""
        token_losses = self.layers.cross_entropy(logits, labels[0], self.config.model.vocab_size)
        if len(labels) == 1:
            return token_losses
        return (token_losses * labels[1]).sum() * self._scale.to(token_losses.device)

    def _feed(self, micro_batches: list[MicroBatch | None], tokens: int | None):
        """What DeepSpeed's data iterator yields: (inputs, labels) per micro-batch."""
        if tokens is not None:
            self._scale = torch.tensor([self.micro_batches * self.topology.dp / max(tokens, 1)])
        for batch in micro_batches:
            if batch is None:
                yield None
            elif tokens is None:
                yield batch.inputs, (batch.labels,)
            else:
                yield batch.inputs, (batch.labels, batch.loss_mask)

    def train_step(self, micro_batches, tokens):
        loss = self.engine.train_batch(iter(self._feed(micro_batches, tokens)))
        norm = self.engine.get_global_grad_norm()
        return StepResult(
            float(loss), float(norm) if norm is not None else float("nan"), self.engine.was_step_applied()
        )

    def evaluate(self, micro_batches, tokens):
        return float(self.engine.eval_batch(iter(self._feed(micro_batches, tokens)), compute_loss=True))

    def token_losses(self, micro_batches):
        # eval_batch adds each micro-batch's loss into total_loss without resetting it (only
        # train_batch does): a scalar left by training or validation would not take our
        # per-token losses
        self.engine.total_loss = None
        outputs = self.engine.eval_batch(
            iter(self._feed(micro_batches, None)),
            compute_loss=True,
            reduce_output=None,
            bcast_loss=False,
            num_micro_batches=len(micro_batches),
        )
        if not (self.topology.is_last_stage and self.topology.tp_rank == 0):
            return None
        return [losses.float().cpu() for losses in outputs]

    @torch.no_grad()
    def logits(self, inputs):
        module = self.engine.module
        device = next(module.parameters()).device
        was_training = module.training
        module.eval()
        try:
            logits = module(tuple(t.to(device) for t in inputs))
        finally:
            module.train(was_training)
        return gather_vocab(logits)[..., : self.config.model.vocab_size]

    @property
    def optimizer(self):
        return state.base_optimizer(self.engine)

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_buffers(self, weights_only=False):
        return state.partitions(self.engine, self.config, weights_only)

    def fragments(self):
        return state.fragments(self.engine, self.config, self.topology)

    def state_keys(self, buffer):
        return state.group_state_keys(self.engine, self.config)[buffer]

    def create_optimizer_state(self, zeros=True):
        state.link_optimizer_state(self.engine, self.config, zeros)

    def after_load(self, optimizer_state):
        if optimizer_state:
            state.zero_uncovered(self.engine, self.config, self.topology)
        state.refresh_model_weights(self.engine)

    def optimizer_scalars(self):
        return state.optimizer_scalars(self.engine)

    def restore_optimizer_scalars(self, scalars):
        state.restore_optimizer_scalars(self.engine, scalars)

    def loss_scale_state(self):
        return state.loss_scale_state(self.engine)

    def restore_loss_scale(self, values):
        state.restore_loss_scale(self.engine, values)

    def before_optimizer_step(self, hook):
        state.before_optimizer_step(self.engine, hook)

    def replicas(self):
        """The model's weights, which every data-parallel rank holds after the all-gather that ends
        each step, and those not split by tensor parallelism, which every tp rank holds."""
        table = declaration.parameter_table(self.config.model)
        named = [(name.partition(".")[2], p.detach()) for name, p in self.engine.module.named_parameters()]
        out = []
        if self.topology.dp > 1:
            out.append(Replicas(parallel_state.get_data_parallel_group(), named))
        if self.topology.tp > 1:
            unsplit = [(name, p) for name, p in named if table[name].split_dim is None]
            out.append(Replicas(parallel_state.get_tensor_model_parallel_group(), unsplit))
        return out

    def memory_report(self):
        return state.memory_report(self.engine)
