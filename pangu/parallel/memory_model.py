"""The planner's memory model: bytes on one device of a layout's most loaded pipeline rank, for
either engine (`Layout.engine`), from the config alone (no torch). This module holds what both
engines share (the layers and their parameters, what a micro-batch's forward saves for backward)
and the DeepSpeed engine's terms; pangu/parallel/memory_torch.py the torch engine's.

The DeepSpeed engine (PipelineEngine + ZeRO stage 1, the layers of pangu.model.declaration, the
optimizers' declared state, BF16_Optimizer for bf16 with fp32 gradient accumulation,
DeepSpeedZeroOptimizer for fp32 / fp16), for pipeline stage j:

    parameters        numel(stage j, this tp rank) x element size of train.precision
    gradients         bf16: BF16_Optimizer's fp32 accumulation buffer, one flat buffer per
                      param group padded to a multiple of 2 x dp elements (not partitioned:
                      ZeRO-1 partitions only the optimizer side), 4 bytes per element;
                      fp32 / fp16: param.grad in the model dtype (DeepSpeedZeroOptimizer stage 1
                      accumulates into param.grad and reduces at the boundary)
                      (bf16 with immediate_grad_update: each parameter's bf16 gradient is added
                      into the buffer as backward produces it, and freed)
    master_weights    the fp32 master partition, padded group size / dp x 4 bytes (ZeRO-1;
                      DeepSpeed makes it even when training in fp32)
    optimizer_state   S3 (m, s) and AdamW (exp_avg, exp_avg_sq): 2 fp32 buffers of the
                      partition; sgd_si's scale-invariant group: none
    activations       tensors autograd saves for backward, per micro-batch (formulas below),
                      times the micro-batches 1F1B keeps in flight on this stage
                      (stage s of p: min(p - s, m)), plus the pipeline engine's input/output
                      buffers, plus, with full recomputation, one layer recomputed in backward
    reduce_buffers    transient at the gradient reduction, after the last backward (so not at
                      the same time as the activations): bf16: DeepSpeed flattens the fp32
                      buffers into <= 5e8-element buckets and casts each to bf16 to all-reduce;
                      fp32 / fp16: DeepSpeedZeroOptimizer's 5e8-element ipg bucket plus the
                      reduced partition, in the model dtype

    peak = parameters + gradients + master_weights + optimizer_state
           + max(activations, reduce_buffers + sharded_gradients)     (sharded_gradients: torch)

Activations of one transformer layer, one micro-batch of b sequences of s tokens (T = s b), h
hidden, f FFN, a heads, t = tp, e = bytes of the training dtype, m = bytes of a dropout mask
(1 on GPU, e on CPU; 0 without dropout). Megatron (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", sec. 4.1) counts s b h (34 + 5 a s / h) bytes for
bf16 without recomputation and tp = 1; pangu's layer saves more, because LayerNorm runs in fp32
(each LayerNorm saves a 4-byte copy of its input, not 2 bytes), fast_gelu saves its input and its
sigmoid, and the attention output is copied once more when the heads are merged:

    LayerNorm 1 and 2 inputs (fp32 copies, plus mean/rstd)   2 (4 T h + 8 T)        [/ t with SP]
    Q/K/V input, FFN input                                    2 e T h
    attention core, flash (q, k, v, output, logsumexp)        4 e T h / t + 4 T a / t
    attention core, no flash (q, k, v; probabilities;         3 c T h / t + (c + m_a + c) a s T / t
      dropout mask; dropped probabilities)                      (c: element size of the math path)
    attention output projection input (heads merged)          e T h / t
    FFN activation (fast_gelu: input and sigmoid; gelu/relu: one)   2 e T f / t  (or e T f / t)
    FFN down-projection input                                 e T f / t
    two hidden dropout masks                                  2 m T h                [/ t with SP]

  selective recomputation (the attention core is recomputed): the core keeps only q, k, v
  (3 e T h / t): the s^2 terms (no flash) or the output and logsumexp (flash) go.
  full recomputation: each layer keeps only its input (e T h [/ t with SP], the checkpoint's), and
  in backward one layer at a time holds the full set above.
  Sequence parallelism (torch engine): what lies outside the tensor-parallel regions is cut over
  the sequence (the LayerNorms, the residual dropout masks, the residual stream a recomputed layer
  keeps); the gathered inputs of attention and FFN, the attention core and the FFN are not.
  The torch engine's LayerNorms in bf16 / fp16 also keep fp32 copies of their weight and bias
  (8 h bytes each); its embeddings save the step's token and position ids once for all
  micro-batches (memory_torch.py), and its head the hidden state only (the loss, computed after
  the stage's forward, is counted there too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from pangu.config import Config, ModelConfig, ParallelConfig
from pangu.model import declaration
from pangu.optim import registry
from pangu.optim.param_groups import GROUP_ORDER, group_of
from pangu.parallel.stages import stage_bounds

if TYPE_CHECKING:
    from pangu.parallel.planner import Layout

ZERO_ALIGNMENT = 2  # DeepSpeed pads each flat group to a multiple of 2 x dp elements (nccl_start_alignment_factor)
DEEPSPEED_BUCKET = 500_000_000  # elements: MEMORY_OPT_ALLREDUCE_SIZE and ZeRO's default reduce_bucket_size


@dataclass(frozen=True)
class Kernels:
    """What the kernels save for backward (the only device-dependent part of the memory model).

    flash_attention: the attention core keeps q, k, v, output and logsumexp (flash / memory-
        efficient SDPA; PyTorch uses it on GPU for pangu's causal attention) instead of the
        s x s probabilities. None: decide like PyTorch on CPU (flash only without dropout).
    dropout_mask_bytes: bytes per element of a dropout mask: 1 on GPU (a bool mask), the
        activation's own element size on CPU (None).
    attention_math_bytes: element size in the non-flash attention core: the training dtype on GPU
        (None), 4 on CPU (its math path upcasts bf16 to fp32).
    """

    flash_attention: bool | None = True
    dropout_mask_bytes: int | None = 1
    attention_math_bytes: int | None = None

    @classmethod
    def cpu(cls) -> Kernels:
        return cls(flash_attention=None, dropout_mask_bytes=None, attention_math_bytes=4)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device: the pipeline rank with the largest peak (`stage`)."""

    stage: int
    parameters: int
    gradients: int
    master_weights: int
    optimizer_state: int
    activations: int
    reduce_buffers: int
    sharded_gradients: int = 0

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.master_weights + self.optimizer_state

    @property
    def peak(self) -> int:
        return self.static + max(self.activations, self.reduce_buffers + self.sharded_gradients)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


# ---------------------------------------------------------------------------------------------
# The pipeline's layers and their parameters (pangu/parallel/pipeline.py, pangu/model/pangu_alpha.py)


@dataclass(frozen=True)
class PipeLayer:
    kind: str  # a layer kind of pangu.model.declaration
    groups: tuple[tuple[str, int], ...]  # (optimizer group, elements on one tp rank)
    tied: bool = False

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.groups)


def _add(groups: dict[str, int], group: str, numel: int) -> None:
    if numel:
        groups[group] = groups.get(group, 0) + numel


@lru_cache(maxsize=256)
def model_pipeline_layers(model: ModelConfig, tp: int, scale_invariant_group: bool) -> tuple[PipeLayer, ...]:
    out = []
    for layer in declaration.layers(model):
        groups: dict[str, int] = {}
        for param in layer.parameters:
            group = group_of(decays=param.weight_decay, scale_invariant=param.scale_invariant and scale_invariant_group)
            _add(groups, group, math.prod(param.local_shape(tp)))
        out.append(PipeLayer(layer.kind, tuple(groups.items()), layer.tied))
    return tuple(out)


def pipeline_layers(config: Config, tp: int) -> tuple[PipeLayer, ...]:
    """The pipeline's layers (pangu.model.declaration, as pangu.parallel.pipeline builds them), with
    the parameters each holds on one tensor-parallel rank, by optimizer group."""
    return model_pipeline_layers(config.model, tp, registry.get(config.optim.name).scale_invariant_group)


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class StageMemory:
    """One device of pipeline rank `stage` (DeepSpeed: stage `stage`; torch: the stages
    pangu/parallel/stages.py gives the rank), with the numbers behind the estimate."""

    stage: int
    layers: tuple[str, ...]  # kinds of the device's layers
    group_numel: tuple[tuple[str, int], ...]  # elements per optimizer group (unpadded)
    parameters: int
    gradients: int
    master_weights: int
    optimizer_state: int
    activations_per_micro_batch: int  # saved for backward by one micro-batch's forward (the first stage held)
    in_flight: int  # micro-batches whose activations the schedule holds at once (all stages held)
    saved_activations: int  # the most saved-for-backward bytes alive at once (recomputation included)
    pipeline_buffers: int  # the pipeline engine's buffers for the micro-batches it sends and receives
    activations: int  # saved_activations + pipeline_buffers
    reduce_buffers: int
    sharded_gradients: int = 0  # torch engine: the fp32 gradient shards FSDP's reduce-scatter writes

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.group_numel)

    @property
    def peak(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.master_weights
            + self.optimizer_state
            + max(self.activations, self.reduce_buffers + self.sharded_gradients)
        )

    def estimate(self) -> MemoryEstimate:
        return MemoryEstimate(
            self.stage,
            self.parameters,
            self.gradients,
            self.master_weights,
            self.optimizer_state,
            self.activations,
            self.reduce_buffers,
            self.sharded_gradients,
        )


@dataclass(frozen=True)
class Profile:
    """What the memory model reads from a config, hashable (the planner caches on it)."""

    model: ModelConfig
    precision: str
    eod_reset: bool
    partition: str
    scale_invariant_group: bool  # the optimizer keeps the scale-invariant trunk apart
    state_buffers: tuple[int, ...]  # fp32 state buffers per element of each group of GROUP_ORDER

    @classmethod
    def of(cls, config: Config) -> Profile:
        return cls(
            config.model,
            config.train.precision,
            config.data.eod_reset,
            config.parallel.partition,
            registry.get(config.optim.name).scale_invariant_group,
            tuple(optimizer_buffers(config, group) for group in GROUP_ORDER),
        )

    def activation_bytes(
        self, kind: str, micro_batch_size: int, tp: int, recompute: str, kernels: Kernels, sequence_parallel: bool
    ) -> int:
        """The torch engine's activation_bytes."""
        return layer_activation_bytes(
            self.model,
            self.precision,
            self.eod_reset,
            kind,
            micro_batch_size,
            tp,
            recompute,
            kernels,
            "torch",
            sequence_parallel,
        )

    def stage_cut(self, tp: int, stages: int) -> tuple[int, ...]:
        return model_stage_cut(self.model, self.partition, tp, stages)


def dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _padded(numel: int, dp: int) -> int:
    alignment = ZERO_ALIGNMENT * dp
    return -(-numel // alignment) * alignment


def optimizer_buffers(config: Config, group: str) -> int:
    """fp32 state buffers per element of a group, as the optimizer's spec declares them (S3:
    m, s; AdamW: exp_avg, exp_avg_sq; sgd_si's scale-invariant group: none)."""
    return len(registry.get(config.optim.name).state_keys(config.optim, group))


def stage_memory(
    config: Config, layout: Layout, stage: int, kernels: Kernels = Kernels(), dp_rank: int = 0
) -> StageMemory:
    """Memory of a device of pipeline rank `stage` and data-parallel rank `dp_rank` (the first
    holds the most where shards are uneven) under `layout`, on the layout's engine."""
    if layout.engine == "torch":
        from pangu.parallel.memory_torch import torch_stage_memory  # it builds on this module

        return torch_stage_memory(config, layout, stage, kernels, dp_rank)
    return _deepspeed_stage_memory(config, layout, stage, kernels)


def stage_cut(config: Config, tp: int, stages: int) -> tuple[int, ...]:
    """pangu/parallel/stages.py's cut, computed once per model, partition, tp and stage count (the
    planner asks for it for every layout)."""
    return model_stage_cut(config.model, config.parallel.partition, tp, stages)


@lru_cache(maxsize=4096)
def model_stage_cut(model: ModelConfig, partition: str, tp: int, stages: int) -> tuple[int, ...]:
    return tuple(stage_bounds(Config(model=model, parallel=ParallelConfig(partition=partition)), tp, stages))


def _deepspeed_stage_memory(config: Config, layout: Layout, stage: int, kernels: Kernels) -> StageMemory:
    """DeepSpeed's pipeline engine: stage `stage` on one device (see the module docstring)."""
    model, precision = config.model, config.train.precision
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    layers = pipeline_layers(config, tp)
    bounds = stage_cut(config, tp, pp)
    own = layers[bounds[stage] : bounds[stage + 1]]
    groups: dict[str, int] = {}
    tied_seen = False
    for layer in own:
        if layer.tied:  # the word embedding and the head share one module on a stage holding both
            if tied_seen:
                continue
            tied_seen = True
        for group, numel in layer.groups:
            _add(groups, group, numel)
    group_numel = tuple((g, groups[g]) for g in GROUP_ORDER if g in groups)
    numel = sum(groups.values())
    e = dtype_bytes(precision)
    padded = [_padded(n, dp) for _, n in group_numel]
    parameters = numel * e
    if precision == "bf16":
        gradients = 4 * sum(padded)  # BF16_Optimizer.fp32_groups_gradients_flat
    else:
        gradients = e * numel  # param.grad (DeepSpeedZeroOptimizer stage 1)
    master = 4 * sum(p // dp for p in padded)
    optimizer_state = sum(4 * optimizer_buffers(config, g) * (p // dp) for (g, _), p in zip(group_numel, padded))
    if precision == "bf16":
        reduce_buffers = _bf16_reduce_buffers(padded)
    else:
        reduce_buffers = DEEPSPEED_BUCKET * e + e * sum(padded) // dp

    b = layout.micro_batch_size
    saved = [activation_bytes(config, layer.kind, b, tp, layout.recompute, kernels) for layer in own]
    per_mb = sum(saved)
    in_flight = min(pp - stage, layout.micro_batches)
    saved_peak = in_flight * per_mb
    if layout.recompute == "full":
        # In backward, DeepSpeed recomputes one checkpointed layer at a time: the layers after it
        # on this stage have been freed, the ones before it still hold what they saved, and the
        # recomputed layer holds everything it saves without recomputation (in fp32 its first
        # LayerNorm saves the kept input itself, otherwise a copy of it).
        T_h = e * model.seq_length * b * model.hidden_size
        for i, layer in enumerate(own):
            if layer.kind in ("block", "query_layer"):
                full_layer = activation_bytes(config, layer.kind, b, tp, "none", kernels)
                alive = sum(saved[:i]) + full_layer + (0 if precision == "fp32" else T_h)
                saved_peak = max(saved_peak, (in_flight - 1) * per_mb + alive)
    buffers = 0
    if pp > 1:  # the engine keeps each in-flight micro-batch's received input and sent output
        buffers = in_flight * e * model.seq_length * b * model.hidden_size * ((stage > 0) + (stage < pp - 1))
    return StageMemory(
        stage,
        tuple(layer.kind for layer in own),
        group_numel,
        parameters,
        gradients,
        master,
        optimizer_state,
        per_mb,
        in_flight,
        saved_peak,
        buffers,
        saved_peak + buffers,
        reduce_buffers,
    )


def _bf16_reduce_buffers(padded: list[int]) -> int:
    """DeepSpeed's buffered_allreduce_fallback over the fp32 flat buffers: tensors are gathered
    into buckets until one exceeds 5e8 elements; a bucket of several tensors is flattened into a
    new fp32 tensor, and every bucket is cast to bf16 (the communication dtype) for the
    all-reduce. The peak is the largest bucket's copies."""
    peak, bucket = 0, []
    for numel in padded:
        bucket.append(numel)
        if sum(bucket) > DEEPSPEED_BUCKET:
            peak, bucket = max(peak, _bucket_bytes(bucket)), []
    if bucket:
        peak = max(peak, _bucket_bytes(bucket))
    return peak


def _bucket_bytes(bucket: list[int]) -> int:
    n = sum(bucket)
    return (4 * n if len(bucket) > 1 else 0) + 2 * n


def activation_bytes(
    config: Config,
    kind: str,
    micro_batch_size: int,
    tp: int,
    recompute: str,
    kernels: Kernels = Kernels(),
    *,
    engine: str = "deepspeed",
    sequence_parallel: bool = False,
) -> int:
    """Bytes one micro-batch's forward through a layer of `kind` saves for backward on one
    tensor-parallel rank of `engine` (see the module docstring for the terms and their sources)."""
    return layer_activation_bytes(
        config.model,
        config.train.precision,
        config.data.eod_reset,
        kind,
        micro_batch_size,
        tp,
        recompute,
        kernels,
        engine,
        sequence_parallel,
    )


@lru_cache(maxsize=65536)
def layer_activation_bytes(
    model: ModelConfig,
    precision: str,
    eod_reset: bool,
    kind: str,
    micro_batch_size: int,
    tp: int,
    recompute: str,
    kernels: Kernels,
    engine: str,
    sequence_parallel: bool,
) -> int:
    """activation_bytes from the parts of the config it reads (cached: the planner asks often)."""
    e = dtype_bytes(precision)
    s, b, h, f, a, t = (model.seq_length, micro_batch_size, model.hidden_size, model.ffn_size, model.num_heads, tp)
    T = s * b
    torch_engine = engine == "torch"
    cut = t if sequence_parallel and torch_engine else 1  # what lies outside the tensor-parallel regions
    dropout, attention_dropout = model.dropout > 0, model.attention_dropout_rate > 0
    mask = (kernels.dropout_mask_bytes or e) if dropout else 0
    ln = (4 * T * h + 8 * T) // cut  # fp32 input copy, mean and rstd (pangu's LayerNorm runs in fp32)
    if torch_engine and e != 4 and not model.scale_invariant:
        ln += 8 * h  # the fp32 copies of its weight and bias
    ids = 8 * T  # an int64 index tensor
    if kind == "word_embedding":
        if torch_engine:  # the step's ids, saved once for all its micro-batches (memory_torch.py)
            return 0
        return ids + ((8 * T + T) if tp > 1 else 0)  # ids; at tp > 1 the masked ids and the mask
    if kind == "position_embedding":
        return (0 if torch_engine else ids) + mask * T * h  # position ids; the embedding dropout mask
    if kind == "final_layernorm":
        return ln
    if kind == "head":
        if torch_engine:  # the (gathered) hidden state into the head's matmul; the loss: memory_torch.py
            return e * T * h
        # hidden state into the head's matmul; the fp32 logits the vocab-parallel cross entropy
        # keeps (exp_logits); targets, masks and per-token losses
        return e * T * h + 4 * T * model.padded_vocab_size // tp + 8 * T + T + 8 * T
    if kind not in ("block", "query_layer", "stem"):
        raise ValueError(f"unknown layer kind {kind!r}")
    if kind == "stem":  # scale-invariant: LayerNorm, FFN with ReLU (its output is the down-projection's input)
        return ln + e * T * h + e * T * f // t
    if recompute == "full":
        # the checkpoint keeps the layer's input (the position ids are shared)
        return e * T * h // cut
    flash = kernels.flash_attention
    if flash is None:  # PyTorch on CPU: the flash kernel only without dropout and mask
        flash = not attention_dropout and not eod_reset
    heads = a // t
    core_qkv = 3 * e * T * h // t
    merged = e * T * h // t  # the attention output with the heads merged: the projection's input
    if recompute == "selective":
        core = core_qkv
    elif flash:
        # q, k, v and the logsumexp; the output, laid out [b, s, heads, d] by the kernel, is the
        # same storage as the projection's input after the heads are merged (no copy)
        core = core_qkv + 4 * T * heads
    else:
        c = kernels.attention_math_bytes or e
        m_a = (kernels.dropout_mask_bytes or c) if attention_dropout else 0
        probs = heads * s * T * (c + (m_a + c if attention_dropout else 0))
        if model.scale_invariant:
            # ReLU attention keeps the ReLU's output, the masked scores and their row sums, and
            # the normalised probabilities where no dropout copies them
            probs = heads * s * T * (2 * c + (m_a + c if attention_dropout else c)) + c * heads * T
        core = 3 * c * T * h // t + probs  # merging the heads copies the [b, heads, s, d] output
    # the FFN keeps its input, what its activation saves (fast_gelu: input and sigmoid; gelu: its
    # input; ReLU: its output, which is also the down-projection's input) and that input
    activation = {"fast_gelu": 2, "gelu": 1}.get("relu" if model.scale_invariant else model.activation, 0)
    ffn = e * T * h + (activation + 1) * e * T * f // t
    total = 2 * ln + e * T * h + ffn + core + merged + 2 * mask * T * h // cut
    if eod_reset and not torch_engine:
        total += b * s * s  # the [b, s, s] bool attention mask travels with the layer's inputs
    if kind == "query_layer":
        total += e * T * h  # the query embedding feeds Q instead of the normalised hidden state
    return total


def estimate_memory(config: Config, layout: Layout, kernels: Kernels = Kernels()) -> MemoryEstimate:
    """Per-device bytes of the layout's most loaded pipeline rank."""
    if layout.engine == "torch":
        from pangu.parallel.memory_torch import rank_memory  # it builds on this module

        profile = Profile.of(config)
        ranks = [rank_memory(profile, layout, j, kernels) for j in range(layout.pp)]
    else:
        ranks = [_deepspeed_stage_memory(config, layout, j, kernels) for j in range(layout.pp)]
    return max(ranks, key=lambda sm: (sm.peak, -sm.stage)).estimate()
