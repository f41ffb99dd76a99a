"""The planner's memory model for the torch engine (pangu/parallel/native/): bytes on one device
of pipeline rank r and data-parallel rank d, from the config alone (no torch). The rank holds the
stages pangu/parallel/stages.py gives it (one, or `virtual_stages` for the interleaved schedules
and ZBV), each cut into FSDP2 units (every transformer layer, and the stage's other parameters)
when the engine shards (dp > 1, or bf16 / fp16 at any dp, where FSDP2 keeps the fp32 master).

For a parameter whose tensor-parallel slice has d0 rows of `row` elements, FSDP2 keeps rows
c = ceil(d0 / dp) per data-parallel rank (the last ranks own fewer, or none), padded to c:

    master_weights    fp32 shards, padded: 4 c row (FSDP2 pre-pads them for its all-gather)
    parameters        the compute copy the step runs with: FSDP2's gathered parameters in the
                      precision trained, e c dp row, kept from a unit's first forward to the
                      step's last backward (reshard_after_forward=False); without FSDP (fp32,
                      dp = 1) the fp32 parameters themselves
    gradients         the unsharded gradients, fp32 whatever the precision (FSDP2 accumulates in
                      its reduce dtype), 4 d0 row, alive from a unit's first backward until the
                      reduce-scatter after its last; with one micro-batch and one stage per rank
                      each unit reduce-scatters as its backward ends (none kept). Without FSDP:
                      param.grad, 4 d0 row. The vocabulary-parallel word embedding's gradient
                      comes back from DTensor whole (tp times its rows) on a stage without the head
    optimizer_state   the optimizer's fp32 state over the rows rank d owns (unpadded)
    sharded_gradients the reduce-scatter's fp32 output, one flat buffer per unit: 4 c row
    reduce_buffers    the largest unit's reduce-scatter input (4 c dp row), for a moment

Activations, per stage and micro-batch: what the layers save (memory_model.activation_bytes, with
sequence parallelism), plus what torch.distributed.pipelining holds until the micro-batch's
backward: a stage's output (e T h, / tp with sequence parallelism) or, on the last stage, the
logits (e T V / tp) and what the loss saves (its fp32 log-softmax 4 T V' / tp, V' the real
vocabulary at tp = 1, the padded one split otherwise; the clamped labels, the mask). A stage that
receives its input saves nothing new where its first layer keeps that input itself (fp32
LayerNorms, full recomputation). The zero-bubble schedules' input-gradient actions keep, besides
the graph, the gradients of the intermediate values their weight actions start from: the
outputs of every layer with a weight (ZB_GRADS). The schedule says how many micro-batches each
stage holds at once (schedule_model.in_flight); the peak adds, with full recomputation, the one
layer recomputed in a backward. The first stage also keeps the step's token and position ids
(16 bytes a token, saved by the embeddings), and every stage that receives or sends owns one
receive buffer per micro-batch of the step: the previous stage's output (and position ids), the
next stage's gradient.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from pangu.config import Config, ModelConfig, ParallelConfig
from pangu.model import declaration
from pangu.optim.param_groups import GROUP_ORDER, group_of
from pangu.parallel.memory_model import Kernels, Profile, StageMemory, dtype_bytes
from pangu.parallel.schedule_model import in_flight
from pangu.parallel.stages import stages_of_rank

if TYPE_CHECKING:
    from pangu.parallel.planner import Layout

ZERO_BUBBLE = ("zero_bubble", "zbv")
ROOT_UNIT, WORD_EMBEDDING_UNIT = -1, -2  # FSDP units of a stage that are not transformer layers


def torch_stage_memory(config: Config, layout: Layout, rank: int, kernels: Kernels, dp_rank: int = 0) -> StageMemory:
    """Memory of a device of pipeline rank `rank`, data-parallel rank `dp_rank` (module docstring)."""
    return rank_memory(Profile.of(config), layout, rank, kernels, dp_rank)


def rank_memory(profile: Profile, layout: Layout, rank: int, kernels: Kernels, dp_rank: int = 0) -> StageMemory:
    """torch_stage_memory from the parts of the config the model reads."""
    model, m = profile.model, layout.micro_batches
    pp, v = layout.pp, layout.virtual_stages
    indices = rank_stages(layout.schedule, pp, v, rank)
    static = _static(profile, layout.dp, layout.tp, pp * v, indices, m > 1 or v > 1, dp_rank)
    sp = layout.sequence_parallel and layout.tp > 1
    per_stage = [
        _micro_batch_bytes(
            profile,
            kernels,
            layout.tp,
            pp * v,
            layout.schedule in ZERO_BUBBLE,
            index,
            layout.micro_batch_size,
            layout.recompute,
            sp,
        )
        for index in indices
    ]
    moments = (
        (((min(pp - rank, m),), (0,), (0,)),)
        if layout.schedule == "1f1b"
        else in_flight(layout.schedule, pp, v, m, rank)
    )
    saved_peak = 0
    for held, pending, done in moments:
        alive = sum(h * p.held + w * p.pending + d * p.kept for h, w, d, p in zip(held, pending, done, per_stage))
        recomputed = max((p.recomputed for h, p in zip(held, per_stage) if h), default=0)
        saved_peak = max(saved_peak, alive + recomputed)
    if 0 in indices:  # the step's token and position ids, which the embeddings save
        saved_peak += 16 * model.seq_length * layout.micro_batch_size * m
    buffers = sum(_receive_buffers(profile, layout, index, indices) for index in indices)
    bounds = profile.stage_cut(layout.tp, pp * v)
    return StageMemory(
        stage=rank,
        layers=tuple(
            layer.kind for index in indices for layer in declaration.layers(model)[bounds[index] : bounds[index + 1]]
        ),
        group_numel=static.group_numel,
        parameters=static.parameters,
        gradients=static.gradients,
        master_weights=static.master_weights,
        optimizer_state=static.optimizer_state,
        activations_per_micro_batch=per_stage[0].held,
        in_flight=max(sum(held) for held, _, _ in moments),
        saved_activations=saved_peak,
        pipeline_buffers=buffers,
        activations=saved_peak + buffers,
        reduce_buffers=static.largest_unit,
        sharded_gradients=static.sharded_gradients,
    )


@lru_cache(maxsize=4096)
def rank_stages(schedule: str, pp: int, virtual: int, rank: int) -> tuple[int, ...]:
    """pangu/parallel/stages.py's stages of a pipeline rank, cached."""
    return tuple(stages_of_rank(ParallelConfig(engine="torch", pp=pp, schedule=schedule, virtual_stages=virtual), rank))


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state


class StaticBytes(NamedTuple):
    group_numel: tuple[tuple[str, int], ...]
    parameters: int
    gradients: int
    master_weights: int
    optimizer_state: int
    sharded_gradients: int
    largest_unit: int  # the largest FSDP unit's reduce-scatter input


@lru_cache(maxsize=1024)
def _stage_parameters(
    model: ModelConfig, tp: int, scale_invariant_group: bool, first: int, last: int
) -> tuple[tuple[int, int, int, int], ...]:
    """(optimizer group's index in GROUP_ORDER, rows, elements per row, FSDP unit) of every
    parameter of the stage of layers [first, last) on one tensor-parallel rank: the unit is the
    layer's index for a transformer layer, ROOT_UNIT for the stage's other parameters
    (WORD_EMBEDDING_UNIT for the word embedding's where its DTensor gradient comes back whole).
    The tied word embedding once."""
    out, tied_seen = [], False
    own = declaration.layers(model)[first:last]
    # the vocabulary-parallel embedding's gradient comes back whole unless the head, on the same
    # stage, adds its part (split like the parameter) to it
    embedding_unit = ROOT_UNIT if any(layer.kind == declaration.HEAD for layer in own) else WORD_EMBEDDING_UNIT
    for index, layer in enumerate(own, start=first):
        if layer.tied:
            if tied_seen:
                continue
            tied_seen = True
        if layer.kind in declaration.TRANSFORMER_KINDS:
            unit = index
        else:  # the stage's root unit
            unit = embedding_unit if layer.kind == declaration.WORD_EMBEDDING else ROOT_UNIT
        for param in layer.parameters:
            shape = param.local_shape(tp)
            group = group_of(decays=param.weight_decay, scale_invariant=param.scale_invariant and scale_invariant_group)
            out.append((GROUP_ORDER.index(group), shape[0], math.prod(shape[1:]), unit))
    return tuple(out)


@lru_cache(maxsize=65536)
def _static(
    profile: Profile, dp: int, tp: int, stages: int, indices: tuple[int, ...], accumulates: bool, dp_rank: int
) -> StaticBytes:
    """The parameters, gradients and optimizer state of the stages `indices` (module docstring).
    `accumulates`: an unsharded gradient outlives its unit's backward (several micro-batches or
    stages per rank)."""
    e = dtype_bytes(profile.precision)
    sharded = dp > 1 or profile.precision != "fp32"
    bounds = profile.stage_cut(tp, stages)
    groups = [0] * len(GROUP_ORDER)
    parameters = gradients = master = state = shards = largest_unit = 0
    for index in indices:
        units: dict[int, int] = {}
        layers = _stage_parameters(profile.model, tp, profile.scale_invariant_group, bounds[index], bounds[index + 1])
        for group, rows, row, unit in layers:
            groups[group] += rows * row
            keys = profile.state_buffers[group]
            whole = tp if unit == WORD_EMBEDDING_UNIT else 1  # rows of its (unsharded) gradient / rows
            if not sharded:  # the fp32 parameters are the master weights; param.grad
                parameters += 4 * rows * row
                gradients += 4 * whole * rows * row
                state += 4 * keys * rows * row
                continue
            c = -(-rows // dp)
            own = min(c, max(0, rows - dp_rank * c))
            master += 4 * c * row
            parameters += e * c * dp * row
            gradients += 4 * whole * rows * row if accumulates else 0
            state += 4 * keys * own * row
            shards += 4 * c * row
            root = unit if unit >= 0 else ROOT_UNIT
            units[root] = units.get(root, 0) + 4 * c * dp * row
        largest_unit = max([largest_unit, *units.values()])
    group_numel = tuple((name, n) for name, n in zip(GROUP_ORDER, groups) if n)
    return StaticBytes(group_numel, parameters, gradients, master, state, shards, largest_unit)


# ---------------------------------------------------------------------------------------------
# Activations


class MicroBatchBytes(NamedTuple):
    """What one micro-batch costs a stage, by how long torch keeps it."""

    forward: int  # what autograd saves during its forward
    held: int  # from its forward to its backward (B, or W after I): that, its output, the loss
    pending: int  # the zero-bubble intermediate gradients, from I to W
    kept: int  # zero bubble: what its W leaves of the graph, until the step ends
    recomputed: int  # the most a backward adds for what it recomputes (a layer, or an attention core)


@lru_cache(maxsize=65536)
def _micro_batch_bytes(
    profile: Profile,
    kernels: Kernels,
    tp: int,
    stages: int,
    zero_bubble: bool,
    index: int,
    micro_batch_size: int,
    recompute: str,
    sp: bool,
) -> MicroBatchBytes:
    """Stage `index` of `stages`, one micro-batch (module docstring)."""
    model, e = profile.model, dtype_bytes(profile.precision)
    T, h = model.seq_length * micro_batch_size, model.hidden_size
    cut = tp if sp else 1
    layers = declaration.layers(model)
    bounds = profile.stage_cut(tp, stages)
    own = layers[bounds[index] : bounds[index + 1]]
    last = bounds[index + 1] == len(layers)

    def saves(kind: str, mode: str) -> int:
        return profile.activation_bytes(kind, micro_batch_size, tp, mode, kernels, sp)

    saved = [saves(layer.kind, recompute) for layer in own]
    total = sum(saved)
    if index > 0 and (e == 4 or recompute == "full"):
        total -= e * T * h // cut  # the first layer keeps the received input itself
    forward = total
    vocab = model.padded_vocab_size // tp if tp > 1 else model.vocab_size  # what the loss's log-softmax spans
    loss = 0
    if last:  # the logits, and the loss: log-softmax, clamped labels, mask
        loss = 4 * T * vocab + 8 * T + T + 4
        total += e * T * model.padded_vocab_size // tp + loss
    else:  # the stage's output, kept for its backward
        total += e * T * h // cut
    recomputed = 0
    if recompute == "full":
        # a backward recomputes one checkpointed layer at a time: the loss and the layers after
        # it have been freed, the ones before it still hold their inputs, and it holds its whole
        # set (in fp32 its first LayerNorm saves the kept input itself, otherwise a copy of it;
        # the first layer's input is the received buffer)
        kept_input = e * T * h // cut
        for i, layer in enumerate(own):
            if layer.kind in declaration.TRANSFORMER_KINDS:
                whole = saves(layer.kind, "none") + (0 if e == 4 else kept_input)
                if i == 0 and index > 0:
                    whole -= kept_input
                recomputed = max(recomputed, whole - sum(saved[i:]) - loss)
    if recompute == "selective":
        # a backward recomputes one attention core at a time, once the loss, the layers after it
        # and its own layer's FFN, projection, LayerNorm and dropout masks have been freed
        ffn = _ffn_and_residual_bytes(profile, kernels, tp, sp, micro_batch_size)
        for i, layer in enumerate(own):
            if layer.kind in declaration.TRANSFORMER_KINDS:
                core = saves(layer.kind, "none") - saved[i]  # what the recomputation adds to q, k, v
                recomputed = max(recomputed, core - sum(saved[i + 1 :]) - loss - ffn)
    if not zero_bubble or index == 0:  # the first stage's weight action runs its whole backward
        return MicroBatchBytes(forward, total, 0, 0, recomputed)
    pending = sum(_zero_bubble_grads(profile, kernels, tp, sp, micro_batch_size, layer.kind) for layer in own)
    kept = sum(_kept_after_weights(profile, kernels, tp, sp, micro_batch_size, recompute, layer.kind) for layer in own)
    transformer = [layer.kind for layer in own if layer.kind in declaration.TRANSFORMER_KINDS]
    if transformer and transformer[-1] == declaration.BLOCK and recompute != "full":
        # the stage's last block: its output's own nodes (the last dropout, and with them one of
        # the activation's saved tensors) are freed when the output is detached
        activation = 0 if model.scale_invariant or model.activation == "relu" else 1
        mask = (kernels.dropout_mask_bytes or e) if model.dropout > 0 else 0
        kept -= activation * e * T * model.ffn_size // tp + mask * T * h // cut
    if last:  # the loss's log-softmax lies on no parameter's path
        kept += 4 * T * vocab
    return MicroBatchBytes(forward, total, pending, kept, recomputed)


def _ffn_and_residual_bytes(profile: Profile, kernels: Kernels, tp: int, sp: bool, micro_batch_size: int) -> int:
    """What a transformer layer saves after its attention core: the attention projection's input,
    the second LayerNorm, the FFN and the two residual dropout masks."""
    model, e = profile.model, dtype_bytes(profile.precision)
    T, h, f = model.seq_length * micro_batch_size, model.hidden_size, model.ffn_size
    cut = tp if sp else 1
    ln = (4 * T * h + 8 * T) // cut + (8 * h if e != 4 and not model.scale_invariant else 0)
    activation = {"fast_gelu": 2, "gelu": 1}.get("relu" if model.scale_invariant else model.activation, 0)
    mask = (kernels.dropout_mask_bytes or e) if model.dropout > 0 else 0
    return e * T * h // tp + ln + e * T * h + (activation + 1) * e * T * f // tp + 2 * mask * T * h // cut


def _zero_bubble_grads(profile: Profile, kernels: Kernels, tp: int, sp: bool, micro_batch_size: int, kind: str) -> int:
    """Bytes of the intermediate gradients a zero-bubble input-gradient action keeps for the
    weight action, one micro-batch through a layer of `kind`: where each parameter's path meets
    the activations, the gradient of that node's output (torch's stage_backward_input). A
    transformer layer: the outputs of Q, K, V (T h / t each), of the attention projection and
    the FFN's down-projection (T h: row-parallel outputs before their reduction), of the
    up-projection (T f / t), and of its LayerNorms (fp32, cut over the sequence with sequence
    parallelism). The query layer's Q comes from the query embedding, so Q's path meets the
    activations at the attention scores instead: their gradient (a s T / t elements, fp32 on the
    CPU's math path; with a flash kernel, the attention output's). The head: the logits."""
    model, e, t = profile.model, dtype_bytes(profile.precision), tp
    T, h, f, a, s = (
        model.seq_length * micro_batch_size,
        model.hidden_size,
        model.ffn_size,
        model.num_heads,
        model.seq_length,
    )
    norm = 0 if model.scale_invariant else 4 * T * h // (t if sp else 1)
    if kind == declaration.HEAD:
        return e * T * model.padded_vocab_size // t
    if kind == declaration.FINAL_NORM:
        return norm
    if kind == declaration.STEM_LAYER:
        return norm + e * T * (f // t + h)
    if kind not in declaration.TRANSFORMER_KINDS:
        return 0  # the embeddings: on the first stage, whose whole backward runs in its weight action
    grads = 2 * norm + e * T * (3 * h // t + h + f // t + h)
    if kind == declaration.QUERY:
        flash = _flash(profile, kernels)
        scores = e * T * h // t if flash else (kernels.attention_math_bytes or e) * a // t * s * T
        grads += scores - e * T * h // t
    return grads


def _flash(profile: Profile, kernels: Kernels) -> bool:
    if kernels.flash_attention is None:  # PyTorch on CPU: the flash kernel only without dropout and mask
        return profile.model.attention_dropout_rate == 0 and not profile.eod_reset
    return kernels.flash_attention


def _kept_after_weights(
    profile: Profile, kernels: Kernels, tp: int, sp: bool, micro_batch_size: int, recompute: str, kind: str
) -> int:
    """What of one micro-batch's graph of a layer torch's weight action leaves alive: the saved
    tensors of the nodes on no parameter's path (the attention core, the FFN's activation, the
    dropout masks, LayerNorms without parameters), which the input action ran with retain_graph.
    The query layer's Q comes from the query embedding: its path runs through the attention's
    first matmul (q and k freed) or, with a flash kernel or selective recomputation, through the
    whole core."""
    if kind not in declaration.TRANSFORMER_KINDS or recompute == "full":
        return 0
    model, e, t = profile.model, dtype_bytes(profile.precision), tp
    T, h, f = model.seq_length * micro_batch_size, model.hidden_size, model.ffn_size
    cut = t if sp else 1
    whole = profile.activation_bytes(kind, micro_batch_size, t, recompute, kernels, sp)
    ln = (4 * T * h + 8 * T) // cut + (8 * h if e != 4 and not model.scale_invariant else 0)
    activation = {"fast_gelu": 2, "gelu": 1}.get("relu" if model.scale_invariant else model.activation, 0)
    dropout = 2 * (kernels.dropout_mask_bytes or e) * T * h // cut if model.dropout > 0 else 0
    query = e * T * h if kind == declaration.QUERY else 0
    core = whole - (2 * ln + 2 * e * T * h + e * T * h // t + (activation + 1) * e * T * f // t + dropout + query)
    if kind == declaration.QUERY:
        math_bytes = kernels.attention_math_bytes or e
        core = 0 if _flash(profile, kernels) or recompute == "selective" else core - 2 * math_bytes * T * h // t
    return core + activation * e * T * f // t + dropout + (2 * ln if model.scale_invariant else 0)


def _receive_buffers(profile: Profile, layout: Layout, index: int, held: tuple[int, ...]) -> int:
    """The receive buffers torch keeps for stage `index`, one per micro-batch of the step: the
    previous stage's output (hidden state, and position ids from another rank: a neighbour on
    the same rank, ZBV's V, hands its own over) and the next stage's gradient."""
    model, e = profile.model, dtype_bytes(profile.precision)
    T = model.seq_length * layout.micro_batch_size
    hidden = e * T * model.hidden_size // (layout.tp if layout.sequence_parallel and layout.tp > 1 else 1)
    side = 8 * T + (4 * T if profile.eod_reset else 0)  # position ids, document ids
    inputs = hidden + (side if index - 1 not in held else 0) if index > 0 else 0
    gradients = hidden if index < layout.pp * layout.virtual_stages - 1 else 0
    return layout.micro_batches * (inputs + gradients)
