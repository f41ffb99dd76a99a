"""Tensor and sequence parallelism for the torch engine: plain layers split by DTensor plans.

The model is built from plain torch layers on the meta device (`DTensorLayers`, no storage), then
`parallelize` applies a plan read off the declaration (pangu/model/declaration.py): a parameter split
on dim 0 is a column-parallel linear (or the vocabulary-parallel embedding), one split on dim 1 a
row-parallel linear. Q, K and V share one input redistribution per attention (one all-reduce of
its gradient). With `parallel.sequence_parallel` the residual stream between the split regions
holds each rank's slice of the sequence: LayerNorms run on the slice (their parameters' gradients
summed over the group by DTensor), the attention and FFN inputs are gathered and their outputs
reduce-scattered, and the residual dropout draws a rank's own mask. The embedding's output stays
replicated (its dropout draws the same mask on every rank, as at tp = 1) and is cut into slices
before the first trunk layer; the head gathers the sequence again. torchtitan's composition; see
docs/architecture.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from pangu.config import ModelConfig
from pangu.model import declaration
from pangu.model.factory import LayerFactory, mix_seed
from pangu.model.pangu_alpha import PanguStage, QueryLayer, Stem, TransformerLayer


class DTensorLayers(LayerFactory):
    """Plain layers on the meta device, `tp_size` heads' worth per rank once `parallelize` has
    split them over `mesh` (tp = 1: no mesh, nothing split)."""

    device = "meta"

    def __init__(self, mesh: DeviceMesh | None, sequence_parallel: bool = False):
        self.mesh = mesh
        self.tp_size = mesh.size() if mesh is not None else 1
        self.tp_rank = mesh.get_local_rank() if mesh is not None else 0
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

    def _residual(self, x: torch.Tensor) -> DTensor:
        """The residual stream as a DTensor: the rank's slice of the sequence, or all of it."""
        return DTensor.from_local(x, self.mesh, [Shard(1) if self.sequence_parallel else Replicate()])

    def enter_sequence_parallel(self, x):
        if not self.sequence_parallel:
            return x
        return DTensor.from_local(x, self.mesh, [Replicate()]).redistribute(self.mesh, [Shard(1)]).to_local()

    def residual_seed(self, seed):
        return mix_seed(seed, self.tp_rank) if self.sequence_parallel else seed

    def lm_logits(self, hidden, word_embeddings):
        if self.mesh is None:
            return F.linear(hidden, word_embeddings)
        full = self._residual(hidden).redistribute(self.mesh, [Replicate()])
        return F.linear(full, word_embeddings)  # a DTensor: this rank's slice of the vocabulary

    def loss_context(self):
        """Around whatever computes the loss and runs its backward (the schedule's step):
        loss_parallel's cross entropy needs it in backward too."""
        return loss_parallel() if self.mesh is not None else contextlib.nullcontext()

    def gather_vocab(self, logits):
        return logits.full_tensor() if isinstance(logits, DTensor) else logits

    def cross_entropy(self, logits, labels, vocab_size):
        """Over the vocabulary split across the group (loss_parallel): no rank gathers the logits;
        the padding rows of the vocabulary get -inf on whichever rank holds them. Call it, and
        run its backward, inside `loss_context()` (it does not nest)."""
        if not isinstance(logits, DTensor):
            return super().cross_entropy(logits, labels, vocab_size)
        padded = logits.shape[-1]
        mask = torch.where(torch.arange(padded, device=labels.device) < vocab_size, 0.0, float("-inf"))
        masked = logits.float() + distribute_tensor(mask, self.mesh, [Shard(0)])
        losses = F.cross_entropy(masked.flatten(0, 1), labels.flatten(), reduction="none")
        return losses.to_local().view(labels.shape)


def parallelize(stage: PanguStage, layers: DTensorLayers) -> None:
    """Applies the tensor- (and sequence-) parallel plan to a stage's modules, in place."""
    if layers.mesh is None:
        return
    sp = layers.sequence_parallel
    residual = Shard(1) if sp else Replicate()
    plan: dict = {}
    if hasattr(stage.embedding, "word_embeddings"):
        # rows split over the group; its output replicated (see the module docstring)
        plan["embedding.word_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    for name, module in stage.named_modules():
        if isinstance(module, TransformerLayer):
            query_layout = Replicate() if isinstance(module, QueryLayer) else None
            plan.update(_norms(name, ["input_layernorm", "post_attention_layernorm"], sp))
            plan[f"{name}.attention"] = PrepareModuleInput(
                input_layouts=(residual, query_layout, None, None, None),
                desired_input_layouts=(Replicate(), query_layout, None, None, None),
            )
            for projection in ("query", "key", "value"):
                plan[f"{name}.attention.{projection}"] = ColwiseParallel()
            plan[f"{name}.attention.dense"] = RowwiseParallel(output_layouts=residual)
            plan.update(_feed_forward(f"{name}.mlp", residual))
        elif isinstance(module, Stem):
            plan.update(_norms(name, ["norm"], sp))
            plan.update(_feed_forward(f"{name}.mlp", residual))
    if sp and declaration.FINAL_LAYERNORM in stage._modules:
        plan[declaration.FINAL_LAYERNORM] = SequenceParallel(use_local_output=True)
    parallelize_module(stage, layers.mesh, plan)


def _norms(prefix: str, names: list[str], sp: bool) -> dict:
    return {f"{prefix}.{name}": SequenceParallel(use_local_output=True) for name in names} if sp else {}


def _feed_forward(prefix: str, residual) -> dict:
    return {
        prefix: PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
        f"{prefix}.dense_h_to_4h": ColwiseParallel(),
        f"{prefix}.dense_4h_to_h": RowwiseParallel(output_layouts=residual),
    }


def local_box(param: torch.Tensor, name: str, config: ModelConfig) -> tuple[tuple[int, int], ...]:
    """The region of the full tensor `name` that this rank's part of `param` holds."""
    if not isinstance(param, DTensor):
        return tuple((0, n) for n in declaration.parameter_table(config)[name].shape)
    # what torch.distributed.checkpoint uses to place a shard (FSDP2's strided shards included)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple((start, start + size) for start, size in zip(offset, shape))
