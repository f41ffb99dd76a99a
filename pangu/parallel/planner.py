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
sizes. The memory model (pangu/parallel/memory_model.py) is checked by tests/test_planner.py against tensors measured in real CPU runs
(tests/memory_probe.py): parameters, gradients, fp32 master copy and optimizer state exactly,
activations within 20%.

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

import dataclasses
from dataclasses import dataclass, field

from pangu.config import Config
from pangu.model import layout as model_layout
from pangu.model.sizes import flops_per_token, forward_flops_per_token
from pangu.parallel.memory_model import (
    Kernels,
    MemoryEstimate,
    dtype_bytes,
    estimate_memory,
    stage_memory,
)
from pangu.parallel.stages import stage_bounds
from pangu.schema import ConfigError

GiB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")


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
        return [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.recompute={self.recompute}",
            f"train.micro_batch_size={self.micro_batch_size}",
        ]

    def set_args(self) -> str:
        return " ".join(f"--set {o}" for o in self.overrides())

    def as_dict(self) -> dict:
        return {
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "recompute": self.recompute,
            "micro_batch_size": self.micro_batch_size,
            "micro_batches": self.micro_batches,
            "overrides": self.overrides(),
            "memory": self.memory.as_dict() if self.memory else None,
            "step_time": self.step_time.as_dict() if self.step_time else None,
        }


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
    layers = model_layout.layers(model)
    bounds = stage_bounds(config, tp, pp)
    stage_compute, stage_tensor = [], []
    for j in range(pp):
        flops, collectives = 0.0, 0
        for layer in layers[bounds[j] : bounds[j + 1]]:
            forward = forward_flops_per_token(model, layer) * T
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
    numel = (
        max(stage_memory(config, layout, j).numel for j in range(pp))
        if pp > 1
        else stage_memory(config, layout, 0).numel
    )
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
    return StepTime(
        compute=(m + pp - 1) * stage_compute[slowest],
        tensor_parallel=(m + pp - 1) * stage_tensor[slowest],
        pipeline_p2p=(m + pp - 1) * p2p,
        data_parallel=data_parallel,
        bubble_fraction=(pp - 1) / (m + pp - 1),
        total=total,
        mfu=mfu,
        tokens_per_second=tokens / total,
    )


# ---------------------------------------------------------------------------------------------
# Enumeration and ranking


def _divisors(n: int, limit: int) -> list[int]:
    """The divisors of n up to `limit`, in O(limit) whatever n is (a device count may be huge or
    prime; the limits are the model's heads and layers and the global batch)."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def enumerate_layouts(config: Config, gpus: int, recompute: tuple[str, ...] = RECOMPUTE_MODES) -> list[Layout]:
    """Every layout of `gpus` devices that pangu can run with this config's model and global batch:
    dp x tp x pp = gpus; tp divides the heads, the FFN size and the padded vocabulary; pp at most
    num_layers; dp x micro_batch_size x micro_batches = train.global_batch_size."""
    model, batch = config.model, config.train.global_batch_size
    layouts = []
    for tp in _divisors(gpus, model.num_heads):
        if model.num_heads % tp or model.ffn_size % tp or model.padded_vocab_size % tp:
            continue
        for pp in _divisors(gpus // tp, model.num_layers):
            dp = gpus // (tp * pp)
            if batch % dp:
                continue
            for mbs in _divisors(batch // dp, batch):
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
        fitting.append(
            dataclasses.replace(layout, memory=memory, step_time=estimate_step_time(config, layout, hardware))
        )
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
