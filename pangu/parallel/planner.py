"""Auto-parallel planner: `pangu plan --config CFG --gpus N --gpu-memory 80GiB`.

Enumerates the layouts of N devices -- (dp, tp, pp), recomputation, micro-batch size -- for one
config, estimates each one's per-device memory under pangu's real training setup and its step
time under a simple cost model, drops those that do not fit and ranks the rest by step time.

Everything here is arithmetic on the config (no torch, no DeepSpeed import), so a plan for 2048
devices takes about a second. The formulas model what pangu actually runs:

    DeepSpeed PipelineEngine + ZeRO stage 1, the layers of pangu/parallel/pipeline.py, the
    optimizers of pangu/optim, DeepSpeed's BF16_Optimizer for train.precision = bf16
    (grad_accum_dtype fp32) and its DeepSpeedZeroOptimizer for fp32 / fp16.

Each term names its source; docs/planner.md explains them and shows plans for the PanGu-alpha
sizes. tests/test_planner.py checks the memory model against tensors measured in real CPU runs
(tests/memory_probe.py): parameters, gradients, fp32 master copy and optimizer state exactly,
activations within 20%.

Memory of one device (pipeline stage j, the stage with the largest total is reported):

    parameters        numel(stage j, this tp rank) x element size of train.precision
    gradients         bf16: BF16_Optimizer's fp32 accumulation buffer, one flat buffer per
                      param group padded to a multiple of 2 x dp elements (not partitioned:
                      ZeRO-1 partitions only the optimizer side), 4 bytes per element;
                      fp32 / fp16: param.grad in the model dtype (DeepSpeedZeroOptimizer stage 1
                      accumulates into param.grad and reduces at the boundary)
    model_gradients   bf16 only: the bf16 param.grad autograd writes before BF16_Optimizer adds
                      it into the fp32 buffer; zeroed, not freed, until zero_grad after the step
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

    peak = parameters + gradients + model_gradients + master_weights + optimizer_state
           + max(activations, reduce_buffers)

Activations of one transformer layer, one micro-batch of b sequences of s tokens (T = s b), h
hidden, f FFN, a heads, t = tp, e = bytes of the training dtype, m = bytes of a dropout mask
(1 on GPU, e on CPU; 0 without dropout). Megatron (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", sec. 4.1) counts s b h (34 + 5 a s / h) bytes for
bf16 without recomputation and tp = 1; pangu's layer saves more, because LayerNorm runs in fp32
(each LayerNorm saves a 4-byte copy of its input, not 2 bytes), fast_gelu saves its input and its
sigmoid, and the attention output is copied once more when the heads are merged:

    LayerNorm 1 and 2 inputs (fp32 copies, plus mean/rstd)   2 (4 T h + 8 T)
    Q/K/V input, FFN input                                    2 e T h
    attention core, flash (q, k, v, output, logsumexp)        4 e T h / t + 4 T a / t
    attention core, no flash (q, k, v; probabilities;         3 c T h / t + (c + m_a + c) a s T / t
      dropout mask; dropped probabilities)                      (c: element size of the math path)
    attention output projection input (heads merged)          e T h / t
    FFN activation (fast_gelu: input and sigmoid; gelu/relu: one)   2 e T f / t  (or e T f / t)
    FFN down-projection input                                 e T f / t
    two hidden dropout masks                                  2 m T h

  selective recomputation (the attention core is recomputed): the core keeps only q, k, v
  (3 e T h / t): the s^2 terms (no flash) or the output and logsumexp (flash) go.
  full recomputation: each layer keeps only its input (e T h, DeepSpeed's checkpoint), and in
  backward one layer at a time holds the full set above.

Step time (seconds), a deliberately simple model:

    per micro-batch on stage j:
        compute   = FLOPs of stage j's layers (6 x weights x tokens + attention 12 s h per token
                    per layer, as pangu.model.sizes.flops_per_token counts; + one more
                    forward of every layer with full recomputation, + the attention core's forward
                    with selective) / (tp x peak x efficiency)
        tensor    = 4 ring all-reduces of e T h bytes per layer (2 forward, 2 backward; 6 with
                    full recomputation), 1 for the embedding, 1 for the head; ring cost
                    2 (t-1)/t bytes / bandwidth + 2 (t-1) latency, intra-node bandwidth when
                    tp <= gpus-per-node, else inter-node
        p2p       = 2 sends of e T h bytes (activation forward, gradient backward) when pp > 1
    pipeline      = (m + p - 1) x max_j (compute + tensor + p2p)    [bubble (p-1)/(m+p-1)]
    data parallel = ring all-reduce of the largest stage's gradients in the communication dtype
                    (bf16 for bf16, else the model dtype), then ZeRO-1's all-gather of the
                    updated parameters, both over inter-node bandwidth when the dp group spans
                    nodes; plus the tied embedding's gradient all-reduce between the first and
                    last stage. DeepSpeed's pipeline engine does these after the last backward,
                    not overlapped with compute.
    step          = pipeline + data parallel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache

from pangu.config import Config, ConfigError, ModelConfig
from pangu.model.sizes import flops_per_token, forward_flops_per_token, parameter_count

GiB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")
GROUP_ORDER = ("decay", "no_decay", "scale_invariant")  # pangu.optim.param_groups
ZERO_ALIGNMENT = 2  # DeepSpeed pads each flat group to a multiple of 2 x dp elements (nccl_start_alignment_factor)
DEEPSPEED_BUCKET = 500_000_000  # elements: MEMORY_OPT_ALLREDUCE_SIZE and ZeRO's default reduce_bucket_size


# ---------------------------------------------------------------------------------------------
# Inputs and results


@dataclass(frozen=True)
class Hardware:
    """The devices and their links. Defaults: an A100-class GPU (dense bf16 peak 312 TFLOP/s),
    NVLink within a node and one 200 Gb/s NIC per GPU between nodes: replace them by measured
    figures (bandwidths are ring all-reduce bus bandwidths per device)."""

    gpus: int
    gpu_memory_bytes: int
    gpus_per_node: int = 8
    tflops: float = 312.0  # peak per device, TFLOP/s, in the training dtype
    efficiency: float = 0.5  # fraction of the peak that the matmuls reach
    bandwidth: float = 150e9  # bytes/s per device within a node
    inter_node_bandwidth: float = 25e9  # bytes/s per device between nodes
    latency: float = 10e-6  # seconds per step of a ring collective
    memory_margin: float = 0.10  # fraction of the device memory kept free (CUDA context, NCCL, fragmentation)

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory_bytes * (1.0 - self.memory_margin)


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
    def cpu(cls) -> "Kernels":
        return cls(flash_attention=None, dropout_mask_bytes=None, attention_math_bytes=4)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device: the pipeline stage with the largest peak (`stage`)."""

    stage: int
    parameters: int
    gradients: int
    model_gradients: int
    master_weights: int
    optimizer_state: int
    activations: int
    reduce_buffers: int

    @property
    def static(self) -> int:
        return (self.parameters + self.gradients + self.model_gradients + self.master_weights
                + self.optimizer_state)

    @property
    def peak(self) -> int:
        return self.static + max(self.activations, self.reduce_buffers)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


@dataclass(frozen=True)
class StepTime:
    compute: float  # seconds of the pipeline spent computing (slowest stage x (m + p - 1))
    tensor_parallel: float
    pipeline_p2p: float
    data_parallel: float
    bubble_fraction: float
    total: float
    mfu: float  # model FLOPs (no recomputation) / (devices x peak x total)
    tokens_per_second: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    recompute: str
    micro_batch_size: int
    micro_batches: int
    memory: MemoryEstimate | None = field(default=None, compare=False)
    step_time: StepTime | None = field(default=None, compare=False)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def overrides(self) -> list[str]:
        """The `--set` values that make a config train with this layout."""
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.recompute={self.recompute}",
                f"train.micro_batch_size={self.micro_batch_size}"]

    def set_args(self) -> str:
        return " ".join(f"--set {o}" for o in self.overrides())

    def as_dict(self) -> dict:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "recompute": self.recompute,
                "micro_batch_size": self.micro_batch_size, "micro_batches": self.micro_batches,
                "overrides": self.overrides(),
                "memory": self.memory.as_dict() if self.memory else None,
                "step_time": self.step_time.as_dict() if self.step_time else None}


# ---------------------------------------------------------------------------------------------
# The pipeline's layers and their parameters (pangu/parallel/pipeline.py, pangu/model/pangu_alpha.py)


@dataclass(frozen=True)
class PipeLayer:
    kind: str  # word_embedding | position_embedding | stem | block | final_layernorm | query_layer | head
    typename: str  # the DeepSpeed layer class (for partition "type:")
    groups: tuple[tuple[str, int], ...]  # (optimizer group, elements on one tp rank)
    tied: bool = False

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.groups)


def _add(groups: dict[str, int], group: str, numel: int) -> None:
    if numel:
        groups[group] = groups.get(group, 0) + numel


def _block_groups(model: ModelConfig, tp: int, query_embedding: bool) -> dict[str, int]:
    """A TransformerLayer's parameters on one tp rank, by optimizer group (pangu.optim.param_groups:
    1-D parameters and biases do not decay; the scale-invariant trunk has its own group)."""
    h, f = model.hidden_size, model.ffn_size
    si = model.scale_invariant
    groups: dict[str, int] = {}
    weight, no_decay = ("scale_invariant", "scale_invariant") if si else ("decay", "no_decay")
    if not si:
        _add(groups, no_decay, 4 * h)  # two LayerNorms (gain, shift), replicated
    _add(groups, weight, 3 * h * h // tp)  # Q, K, V: column parallel
    _add(groups, no_decay, 3 * h // tp)  # their biases, split
    _add(groups, weight, h * h // tp)  # attention output: row parallel
    if not si:
        _add(groups, no_decay, h)  # its bias, replicated
    _add(groups, weight, 2 * h * f // tp)  # FFN up (column) and down (row)
    _add(groups, no_decay, f // tp)  # FFN up bias, split
    if not si:
        _add(groups, no_decay, h)  # FFN down bias, replicated
    if query_embedding:
        _add(groups, "decay", model.seq_length * h)  # the query layer's position-indexed query table
    return groups


def pipeline_layers(model: ModelConfig, tp: int) -> list[PipeLayer]:
    """The PipelineModule's layer list (pangu.parallel.pipeline.build_pipeline), with the
    parameters each layer holds on one tensor-parallel rank."""
    h, f = model.hidden_size, model.ffn_size
    word = (("decay", model.padded_vocab_size * h // tp),)
    layers = [PipeLayer("word_embedding", "WordEmbeddingPipe", word, tied=True),
              PipeLayer("position_embedding", "PositionEmbeddingPipe", (("decay", model.seq_length * h),))]
    if model.scale_invariant:  # LayerNorm without parameters, FFN without down bias
        layers.append(PipeLayer("stem", "StemPipe", (("scale_invariant", 2 * h * f // tp + f // tp),)))
    block = tuple(_block_groups(model, tp, False).items())
    layers += [PipeLayer("block", "TransformerLayerPipe", block) for _ in range(model.num_layers - 1)]
    final = PipeLayer("final_layernorm", "FinalLayerNormPipe",
                      (() if model.scale_invariant else (("no_decay", 2 * h),)))
    query = PipeLayer("query_layer", "QueryLayerPipe", tuple(_block_groups(model, tp, True).items()))
    layers += [final, query] if model.final_layernorm == "before" else [query, final]
    layers.append(PipeLayer("head", "WordEmbeddingPipe", word, tied=True))
    return layers


def _partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    parts = [p * chunk for p in range(num_parts + 1)]
    for i in range(residual):
        for k in range(i + 1, num_parts + 1):
            parts[k] += 1
    return parts


def _partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_balanced, the same dynamic programme and tie-breaking
    (it minimises max - min of the parts' weights)."""
    n, m = len(weights), num_parts
    if n <= m:
        return _partition_uniform(n, m)
    inf = math.inf
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + float(w)
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            best_cost, best_max, best_min, best_k = dp_cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j]
            prev_max, prev_min = [row[j - 1] for row in dp_max], [row[j - 1] for row in dp_min]
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum = prev_max[k] if prev_max[k] > part else part
                min_sum = prev_min[k] if prev_min[k] < part else part
                cost = max_sum - min_sum
                if best_cost >= cost:
                    best_cost, best_max, best_min, best_k = cost, max_sum, min_sum, k
            dp_cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j] = best_cost, best_max, best_min, best_k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    parts.reverse()
    return parts


def stage_bounds(config: Config, tp: int, pp: int) -> list[int]:
    """Layer indices where each pipeline stage starts (pp + 1 numbers), as DeepSpeed's
    PipelineModule partitions pangu's layers (parallel.partition: "parameters" balances the
    parameters of each rank's layers; "uniform" balances the transformer layers)."""
    layers = pipeline_layers(config.model, tp)
    if config.parallel.partition == "parameters":
        weights = tuple(layer.numel for layer in layers)
    else:  # "type:TransformerLayerPipe|QueryLayerPipe"
        weights = tuple(int(layer.typename in ("TransformerLayerPipe", "QueryLayerPipe")) for layer in layers)
    return list(_cached_partition(weights, pp))


@lru_cache(maxsize=4096)
def _cached_partition(weights: tuple[int, ...], pp: int) -> tuple[int, ...]:
    return tuple(_partition_balanced(list(weights), pp))


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage on one device, with the numbers behind the estimate."""

    stage: int
    layers: tuple[str, ...]  # kinds of the stage's layers
    group_numel: tuple[tuple[str, int], ...]  # elements per optimizer group (unpadded)
    parameters: int
    gradients: int
    model_gradients: int
    master_weights: int
    optimizer_state: int
    activations_per_micro_batch: int  # saved for backward by one micro-batch's forward
    in_flight: int  # micro-batches whose activations 1F1B holds at once
    saved_activations: int  # the most saved-for-backward bytes alive at once (recomputation included)
    pipeline_buffers: int  # the pipeline engine's inputs and outputs of the in-flight micro-batches
    activations: int  # saved_activations + pipeline_buffers
    reduce_buffers: int

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.group_numel)

    @property
    def peak(self) -> int:
        return (self.parameters + self.gradients + self.model_gradients + self.master_weights
                + self.optimizer_state + max(self.activations, self.reduce_buffers))


def dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _padded(numel: int, dp: int) -> int:
    alignment = ZERO_ALIGNMENT * dp
    return -(-numel // alignment) * alignment


def _optimizer_buffers(config: Config, group: str) -> int:
    """fp32 state buffers per element of a group: S3 (m, s), AdamW (exp_avg, exp_avg_sq);
    ScaleInvariantSGD keeps none for its scale-invariant group (plain SGD)."""
    if config.optim.name == "sgd_si" and group == "scale_invariant":
        return 0
    return 2


def stage_memory(config: Config, layout: Layout, stage: int, kernels: Kernels = Kernels()) -> StageMemory:
    """Memory of a device of pipeline stage `stage` under `layout` (see the module docstring)."""
    model, precision = config.model, config.train.precision
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    layers = pipeline_layers(model, tp)
    bounds = stage_bounds(config, tp, pp)
    own = layers[bounds[stage]:bounds[stage + 1]]
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
        model_gradients = 2 * numel  # bf16 param.grad
    else:
        gradients = e * numel  # param.grad (DeepSpeedZeroOptimizer stage 1)
        model_gradients = 0
    master = 4 * sum(p // dp for p in padded)
    optimizer_state = sum(4 * _optimizer_buffers(config, g) * (p // dp) for (g, _), p in zip(group_numel, padded))
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
    return StageMemory(stage, tuple(layer.kind for layer in own), group_numel, parameters, gradients,
                       model_gradients, master, optimizer_state, per_mb, in_flight, saved_peak, buffers,
                       saved_peak + buffers, reduce_buffers)


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


def activation_bytes(config: Config, kind: str, micro_batch_size: int, tp: int, recompute: str,
                     kernels: Kernels = Kernels()) -> int:
    """Bytes one micro-batch's forward through a layer of `kind` saves for backward on one
    tensor-parallel rank (see the module docstring for the terms and their sources)."""
    model, e = config.model, dtype_bytes(config.train.precision)
    s, b, h, f, a, t = (model.seq_length, micro_batch_size, model.hidden_size, model.ffn_size,
                        model.num_heads, tp)
    T = s * b
    dropout, attention_dropout = model.dropout > 0, model.attention_dropout_rate > 0
    mask = (kernels.dropout_mask_bytes or e) if dropout else 0
    ln = 4 * T * h + 8 * T  # fp32 input copy, mean and rstd (pangu's LayerNorm runs in fp32)
    ids = 8 * T  # an int64 index tensor
    if kind == "word_embedding":
        return ids + ((8 * T + T) if tp > 1 else 0)  # ids; at tp > 1 the masked ids and the mask
    if kind == "position_embedding":
        return ids + mask * T * h  # position ids; the embedding dropout mask
    if kind == "final_layernorm":
        return ln
    if kind == "head":
        # hidden state into the head's matmul; the fp32 logits the vocab-parallel cross entropy
        # keeps (exp_logits); targets, masks and per-token losses
        return e * T * h + 4 * T * model.padded_vocab_size // tp + 8 * T + T + 8 * T
    if kind not in ("block", "query_layer", "stem"):
        raise ValueError(f"unknown layer kind {kind!r}")
    if kind == "stem":  # scale-invariant stem: LayerNorm, FFN (ReLU)
        return ln + e * T * h + 2 * e * T * f // t
    if recompute == "full":
        # DeepSpeed's checkpoint keeps the layer's input (the position ids are shared)
        return e * T * h
    flash = kernels.flash_attention
    if flash is None:  # PyTorch on CPU: the flash kernel only without dropout and mask
        flash = not attention_dropout and not config.data.eod_reset
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
        core = 3 * c * T * h // t + probs  # merging the heads copies the [b, heads, s, d] output
    activation = (1 if model.scale_invariant or model.activation != "fast_gelu" else 2) * e * T * f // t
    total = 2 * ln + 2 * e * T * h + core + merged + activation + e * T * f // t + 2 * mask * T * h
    if config.data.eod_reset:
        total += b * s * s  # the [b, s, s] bool attention mask travels with the layer's inputs
    if kind == "query_layer":
        total += e * T * h  # the query embedding feeds Q instead of the normalised hidden state
    return total


def estimate_memory(config: Config, layout: Layout, kernels: Kernels = Kernels()) -> MemoryEstimate:
    """Per-device bytes of the layout's most loaded pipeline stage."""
    stages = [stage_memory(config, layout, j, kernels) for j in range(layout.pp)]
    worst = max(stages, key=lambda sm: (sm.peak, -sm.stage))
    return MemoryEstimate(worst.stage, worst.parameters, worst.gradients, worst.model_gradients,
                          worst.master_weights, worst.optimizer_state, worst.activations, worst.reduce_buffers)


# ---------------------------------------------------------------------------------------------
# Step time


def _ring_allreduce(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def _ring_gather(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """All-gather or reduce-scatter of `nbytes` in total."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


def estimate_step_time(config: Config, layout: Layout, hardware: Hardware) -> StepTime:
    """Seconds per optimizer step (see the module docstring for the model)."""
    model, e = config.model, dtype_bytes(config.train.precision)
    dp, tp, pp, m = layout.dp, layout.tp, layout.pp, layout.micro_batches
    G = hardware.gpus_per_node
    T = model.seq_length * layout.micro_batch_size
    peak = hardware.tflops * 1e12 * hardware.efficiency
    tp_bw = hardware.bandwidth if tp <= G else hardware.inter_node_bandwidth
    hidden_bytes = e * T * model.hidden_size
    allreduce = _ring_allreduce(hidden_bytes, tp, tp_bw, hardware.latency)
    layers = pipeline_layers(model, tp)
    bounds = stage_bounds(config, tp, pp)
    stage_compute, stage_tensor = [], []
    for j in range(pp):
        flops, collectives = 0.0, 0
        for layer in layers[bounds[j]:bounds[j + 1]]:
            forward = forward_flops_per_token(model, layer.kind) * T
            flops += 3 * forward
            if layer.kind in ("block", "query_layer", "stem"):
                collectives += 4
                if layout.recompute == "full":
                    flops += forward
                    collectives += 2
                elif layout.recompute == "selective" and layer.kind != "stem":
                    flops += 4 * model.seq_length * model.hidden_size * T
            elif layer.kind in ("word_embedding", "head"):
                collectives += 1
        stage_compute.append(flops / tp / peak)
        stage_tensor.append(collectives * allreduce)
    p2p = 0.0
    if pp > 1:
        pp_bw = hardware.bandwidth if dp * tp * pp <= G else hardware.inter_node_bandwidth
        p2p = 2 * (hidden_bytes / pp_bw + hardware.latency)
    slowest = max(range(pp), key=lambda j: stage_compute[j] + stage_tensor[j])
    per_micro_batch = stage_compute[slowest] + stage_tensor[slowest] + p2p
    pipeline = (m + pp - 1) * per_micro_batch

    dp_bw = hardware.bandwidth if dp * tp <= G else hardware.inter_node_bandwidth
    numel = max(stage_memory(config, layout, j).numel for j in range(pp)) if pp > 1 else \
        stage_memory(config, layout, 0).numel
    comm_bytes = 2 if config.train.precision in ("bf16", "fp16") else 4
    if config.train.precision == "bf16":  # BF16_Optimizer: all-reduce of the whole buffer
        data_parallel = _ring_allreduce(comm_bytes * numel, dp, dp_bw, hardware.latency)
    else:  # DeepSpeedZeroOptimizer stage 1: each partition reduced to its owner
        data_parallel = _ring_gather(comm_bytes * numel, dp, dp_bw, hardware.latency)
    data_parallel += _ring_gather(e * numel, dp, dp_bw, hardware.latency)  # ZeRO-1 parameter all-gather
    if pp > 1:  # tied word embedding: gradient all-reduce between the first and the last stage
        word = model.padded_vocab_size * model.hidden_size // tp
        data_parallel += _ring_allreduce(4 * word, 2, hardware.inter_node_bandwidth, hardware.latency)
    total = pipeline + data_parallel
    tokens = config.train.global_batch_size * model.seq_length
    mfu = tokens * flops_per_token(model) / (layout.gpus * hardware.tflops * 1e12 * total)
    return StepTime(compute=(m + pp - 1) * stage_compute[slowest],
                    tensor_parallel=(m + pp - 1) * stage_tensor[slowest],
                    pipeline_p2p=(m + pp - 1) * p2p, data_parallel=data_parallel,
                    bubble_fraction=(pp - 1) / (m + pp - 1), total=total, mfu=mfu,
                    tokens_per_second=tokens / total)


# ---------------------------------------------------------------------------------------------
# Enumeration and ranking


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(config: Config, gpus: int, recompute: tuple[str, ...] = RECOMPUTE_MODES) -> list[Layout]:
    """Every layout of `gpus` devices that pangu can run with this config's model and global batch:
    dp x tp x pp = gpus; tp divides the heads, the FFN size and the padded vocabulary; pp at most
    num_layers; dp x micro_batch_size x micro_batches = train.global_batch_size."""
    model, batch = config.model, config.train.global_batch_size
    layouts = []
    for tp in _divisors(gpus):
        if model.num_heads % tp or model.ffn_size % tp or model.padded_vocab_size % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > model.num_layers:
                continue
            dp = gpus // (tp * pp)
            if batch % dp:
                continue
            for mbs in _divisors(batch // dp):
                for mode in recompute:
                    layouts.append(Layout(dp, tp, pp, mode, mbs, batch // (dp * mbs)))
    return layouts


def plan(config: Config, hardware: Hardware, kernels: Kernels = Kernels()) -> list[Layout]:
    """The layouts of `hardware.gpus` devices that fit in their usable memory, fastest first
    (ties: less memory), each with its memory and step-time estimate."""
    if hardware.gpus < 1:
        raise ConfigError(f"--gpus = {hardware.gpus} is not allowed: expected >= 1")
    fitting = []
    for layout in enumerate_layouts(config, hardware.gpus):
        memory = estimate_memory(config, layout, kernels)
        if memory.peak > hardware.usable_memory:
            continue
        fitting.append(dataclasses.replace(layout, memory=memory,
                                           step_time=estimate_step_time(config, layout, hardware)))
    fitting.sort(key=lambda lay: (round(lay.step_time.total, 9), lay.memory.peak, lay.tp, lay.pp))
    return fitting


def smallest_memory(config: Config, gpus: int, kernels: Kernels = Kernels()) -> Layout | None:
    """The layout needing the least memory (to say how far from fitting a plan is)."""
    best = None
    for layout in enumerate_layouts(config, gpus):
        memory = estimate_memory(config, layout, kernels)
        if best is None or memory.peak < best.memory.peak:
            best = dataclasses.replace(layout, memory=memory)
    return best


# ---------------------------------------------------------------------------------------------
# Command line


def parse_bytes(text: str) -> int:
    """'80GiB', '32GB', '80G', '1.5TiB', '81920MiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: expected e.g. 80GiB, 32GB or 1e9")
    value, prefix, binary = float(match[1]), match[2].upper(), match[3]
    power = "KMGT".index(prefix) + 1 if prefix else 0
    return int(value * (1024 if binary or not prefix else 1000) ** power) if prefix else int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The device options of `pangu plan` (the CLI adds --config and --set)."""
    parser.add_argument("--gpus", type=int, required=True, help="number of devices")
    parser.add_argument("--gpu-memory", type=parse_bytes, required=True, metavar="SIZE",
                        help="memory per device, e.g. 80GiB, 32GiB")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tflops", type=float, default=312.0,
                        help="peak TFLOP/s per device in the training dtype (default 312: A100 bf16)")
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="fraction of the peak the matmuls reach (default 0.5)")
    parser.add_argument("--bandwidth", type=float, default=150.0,
                        help="intra-node all-reduce bus bandwidth per device, GB/s (default 150)")
    parser.add_argument("--inter-node-bandwidth", type=float, default=25.0,
                        help="inter-node bandwidth per device, GB/s (default 25: one 200 Gb/s NIC per GPU)")
    parser.add_argument("--memory-margin", type=float, default=0.10,
                        help="fraction of device memory kept free for the CUDA context, NCCL and "
                             "fragmentation (default 0.10)")
    parser.add_argument("--no-flash", action="store_true",
                        help="assume an attention kernel that saves the s x s probabilities")
    parser.add_argument("--top", type=int, default=5, help="how many layouts to print (default 5)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable list instead")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def _reference_layout(config: Config, gpus: int) -> Layout | None:
    """The config's own layout (parallel.* and train.micro_batch_size) at this device count."""
    tp, pp, mbs = config.parallel.tp, config.parallel.pp, config.train.micro_batch_size
    if gpus % (tp * pp):
        return None
    dp = gpus // (tp * pp)
    if config.train.global_batch_size % (dp * mbs):
        return None
    return Layout(dp, tp, pp, config.parallel.recompute, mbs, config.train.global_batch_size // (dp * mbs))


def main(args: argparse.Namespace) -> int:
    """`pangu plan`: print the best layouts (table and --set lines), or a JSON list with --json."""
    from pangu.config import load_config

    config = load_config(args.config, args.overrides)
    for name in ("gpus", "gpus_per_node", "top"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed: expected >= 1")
    if not 0 <= args.memory_margin < 1:
        raise ConfigError(f"--memory-margin = {args.memory_margin} is not allowed: expected a fraction in [0, 1)")
    hardware = Hardware(args.gpus, args.gpu_memory, args.gpus_per_node, args.tflops, args.efficiency,
                        args.bandwidth * 1e9, args.inter_node_bandwidth * 1e9, memory_margin=args.memory_margin)
    kernels = Kernels(flash_attention=not args.no_flash)
    layouts = plan(config, hardware, kernels)
    params = parameter_count(config.model)
    if args.json:
        print(json.dumps({"parameters": params, "gpus": args.gpus, "gpu_memory_bytes": args.gpu_memory,
                          "usable_memory_bytes": int(hardware.usable_memory),
                          "layouts": [layout.as_dict() for layout in layouts]}, indent=1))
        return 0 if layouts else 1
    m = config.model
    print(f"model: {params / 1e9:.2f}B parameters ({m.num_layers} layers incl. the query layer, hidden "
          f"{m.hidden_size}, {m.num_heads} heads, FFN {m.ffn_size}, vocab {m.vocab_size} -> {m.padded_vocab_size}, "
          f"seq {m.seq_length}); {config.train.precision}, optimizer {config.optim.name}, "
          f"global batch {config.train.global_batch_size} sequences")
    print(f"devices: {args.gpus} x {_gib(args.gpu_memory)} GiB ({_gib(hardware.usable_memory)} GiB usable), "
          f"{args.gpus_per_node} per node, {args.tflops:g} TFLOP/s peak at {args.efficiency:.0%}, "
          f"{args.bandwidth:g} GB/s intra-node, {args.inter_node_bandwidth:g} GB/s inter-node, "
          f"flash attention {'off' if args.no_flash else 'on'}")
    total = len(enumerate_layouts(config, args.gpus))
    if not layouts:
        best = smallest_memory(config, args.gpus, kernels)
        if best is None:
            print(f"no layout of {args.gpus} devices divides the model and the global batch "
                  f"({config.train.global_batch_size}): try another device count", file=sys.stderr)
        else:
            print(f"none of the {total} layouts fits: the smallest needs {_gib(best.memory.peak)} GiB per device "
                  f"(dp={best.dp} tp={best.tp} pp={best.pp} recompute={best.recompute} "
                  f"mbs={best.micro_batch_size})", file=sys.stderr)
        return 1
    print(f"{len(layouts)} of {total} layouts fit; fastest first (memory in GiB on the most loaded device):")
    header = (f"{'#':>2} {'dp':>4} {'tp':>3} {'pp':>3} {'recompute':>9} {'mbs':>3} {'m':>4} | {'params':>6} "
              f"{'grads':>6} {'master':>6} {'optim':>6} {'activ':>6} {'peak':>6} | {'step s':>7} {'bubble':>6} "
              f"{'tp s':>6} {'dp s':>6} {'MFU':>5}")
    print(header)
    print("-" * len(header))
    for i, layout in enumerate(layouts[:args.top], 1):
        mem, t = layout.memory, layout.step_time
        print(f"{i:>2} {layout.dp:>4} {layout.tp:>3} {layout.pp:>3} {layout.recompute:>9} "
              f"{layout.micro_batch_size:>3} {layout.micro_batches:>4} | {_gib(mem.parameters):>6} "
              f"{_gib(mem.gradients + mem.model_gradients):>6} {_gib(mem.master_weights):>6} "
              f"{_gib(mem.optimizer_state):>6} {_gib(max(mem.activations, mem.reduce_buffers)):>6} "
              f"{_gib(mem.peak):>6} | {t.total:>7.3f} {t.bubble_fraction:>6.1%} {t.tensor_parallel:>6.3f} "
              f"{t.data_parallel:>6.3f} {t.mfu:>5.1%}")
    reference = _reference_layout(config, args.gpus)
    if reference is not None:
        ranked = [i for i, lay in enumerate(layouts, 1) if lay == reference]
        memory = estimate_memory(config, reference, kernels)
        where = f"ranked {ranked[0]}" if ranked else (
            f"does not fit: {_gib(memory.peak)} GiB" if memory.peak > hardware.usable_memory else "")
        print(f"the config's own layout (dp={reference.dp} tp={reference.tp} pp={reference.pp} "
              f"recompute={reference.recompute} mbs={reference.micro_batch_size}): {where}")
    print("\nto train with one of them:")
    for i, layout in enumerate(layouts[:args.top], 1):
        print(f"  #{i}: {layout.set_args()}")
    return 0
