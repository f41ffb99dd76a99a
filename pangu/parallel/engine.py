"""Wiring the pipeline module and the optimizer into DeepSpeed's PipelineEngine with ZeRO stage 1.

One engine for every layout: the PipelineEngine allows ZeRO stage 1 only, so pangu uses it at
pp = 1 too. DeepSpeed owns what it does well: gradient accumulation over micro-batches, 1F1B,
data-parallel reduction, optimizer-state partitioning, gradient clipping, bf16/fp16 and loss
scaling. pangu owns the model, the optimizer and the loss normalisation.
"""

from __future__ import annotations

import warnings
from functools import partial

import deepspeed
import torch

from pangu.config import Config
from pangu.model import layout
from pangu.model.factory import LayerFactory
from pangu.model.init import initialize_parameters, zero_parameters
from pangu.model.pangu_alpha import DropoutSeeds
from pangu.optim.registry import build_optimizer
from pangu.parallel.pipeline import build_pipeline, canonical_names
from pangu.parallel.tensor_parallel import layer_factory
from pangu.parallel.topology import Topology, deepspeed_prints_to_debug_log
from pangu.schema import ConfigError


def pipeline_loss(
    logits: torch.Tensor,
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    layers: LayerFactory,
    vocab_size: int,
) -> torch.Tensor:
    """Sum of this micro-batch's token losses times `scale`.

    The loss of a step must be (sum of token losses) / (tokens counted in the whole global batch),
    not a mean of per-micro-batch means. DeepSpeed divides each micro-batch loss by the number of
    micro-batches and averages gradients over data-parallel ranks, so the data loader passes
    scale = micro_batches x dp / counted_tokens_of_the_global_batch, and the two cancel.
    """
    targets, loss_mask, scale = labels
    token_losses = layers.cross_entropy(logits, targets, vocab_size)
    return (token_losses * loss_mask).sum() * scale[0]


def micro_batches_per_step(config: Config, topology: Topology) -> int:
    per_step = config.train.micro_batch_size * topology.dp
    if config.train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size = {config.train.global_batch_size} is not allowed: expected a "
            f"multiple of train.micro_batch_size x dp = {config.train.micro_batch_size} x {topology.dp}"
        )
    return config.train.global_batch_size // per_step


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


def pipeline_inputs(batch: dict) -> tuple[torch.Tensor, ...]:
    """The pipeline's input tuple from a `pangu.data.dataset.make_batch` dict: token ids and
    position ids, and the document ids when data.eod_reset made them."""
    inputs = [torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["position_ids"])]
    if batch.get("document_ids") is not None:
        inputs.append(torch.from_numpy(batch["document_ids"]))
    return tuple(inputs)


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


def build_engine(config: Config, topology: Topology, initialize: bool = True):
    """(engine, {pipeline name: canonical name}) for this rank's pipeline stage. Without
    `initialize` (a resumed run: a checkpoint sets every weight) no initial weight is drawn.
    `engine.dropout_seeds` (DropoutSeeds) must be told each step's micro-batches before it runs."""
    layers = layer_factory(config.parallel.tp)
    dropout_seeds = DropoutSeeds(config.train.seed)
    with deepspeed_prints_to_debug_log():
        pipe = build_pipeline(
            config,
            topology,
            layers,
            loss_fn=partial(pipeline_loss, layers=layers, vocab_size=config.model.vocab_size),
            dropout_seeds=dropout_seeds,
        )
    names = canonical_names(pipe)
    named = [(names[n], p) for n, p in pipe.named_parameters()]
    if initialize:
        initialize_parameters(named, config.model, config.train.seed, topology.tp_rank, topology.tp)
    else:
        zero_parameters(named)
    table = layout.parameter_table(config.model)
    optimizer = build_optimizer(
        config.optim,
        named,
        no_decay=[name for name, _ in named if not table[name].weight_decay],
        scale_invariant=[name for name, _ in named if table[name].scale_invariant],
    )
    if config.train.precision == "fp16":
        allow_fp16_on_cpu()
    with deepspeed_prints_to_debug_log():
        engine, _, _, _ = deepspeed.initialize(
            model=pipe, optimizer=optimizer, config=deepspeed_config(config, topology)
        )
    engine.dropout_seeds = dropout_seeds
    return engine, names
