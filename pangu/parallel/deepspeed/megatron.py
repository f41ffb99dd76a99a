"""Tensor (op-level) parallelism: the model's layer factory built from megatron-core.

`MegatronLayers` is the `pangu.model.factory.LayerFactory` that training uses: the model asks it
for its splittable layers, and gets
- megatron-core's column- and row-parallel linears and vocab-parallel embedding, returning plain
  tensors, with their tensor-parallel attributes always set (DeepSpeed's gradient-norm clipping
  reads them to count a replicated parameter once);
- one all-reduce of the input gradient for the Q, K and V projections together
  (`tensor_parallel_input`; megatron's column-parallel linears then skip their own);
Here too: megatron-core's parallel state for pangu's layout, the vocab-parallel cross entropy and
the masking of the padded vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from pangu.model.factory import LayerFactory


def megatron_config(tp: int, params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    # Weights are created on the CPU and initialised by pangu (see pangu/model/init.py), so the
    # same config runs on CPU and GPU; DeepSpeed moves the module to the device afterwards.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
        params_dtype=params_dtype,
    )


def _mark_split(tensor: torch.Tensor | None, dim: int) -> None:
    if tensor is not None and not getattr(tensor, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(tensor, attr):
                delattr(tensor, attr)
        set_tensor_model_parallel_attributes(tensor, True, dim, 1)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """y = x W^T + b with W split by output rows; the output stays split (one slice per rank)."""

    def __init__(
        self, input_size: int, output_size: int, *, bias: bool, config: ModelParallelConfig, shared_input: bool = False
    ):
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=None,
            bias=bias,
            gather_output=False,
            skip_bias_add=False,
            disable_grad_reduce=shared_input,  # the caller all-reduces the input's gradient once
        )
        _mark_split(self.weight, 0)
        _mark_split(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """y = x W^T + b with W split by input columns; outputs are summed over the group, then b."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, config: ModelParallelConfig):
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=None,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        _mark_split(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """The word embedding, split by vocabulary rows across the tensor-parallel group."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config: ModelParallelConfig):
        super().__init__(num_embeddings, embedding_dim, init_method=None, config=config)
        _mark_split(self.weight, 0)


class MegatronLayers(LayerFactory):
    """megatron-core's tensor-parallel layers over the tensor-parallel group of `parallel_state`
    (initialised by `init_parallel_state`)."""

    def __init__(self, tp_size: int):
        self.tp_size = tp_size
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.config = megatron_config(tp_size)

    def column_linear(self, fan_in, fan_out, *, bias, shared_input=False):
        return ColumnParallelLinear(fan_in, fan_out, bias=bias, config=self.config, shared_input=shared_input)

    def tensor_parallel_input(self, x):
        return tensor_parallel.copy_to_tensor_model_parallel_region(x)

    def row_linear(self, fan_in, fan_out, *, bias):
        return RowParallelLinear(fan_in, fan_out, bias=bias, config=self.config)

    def vocab_embedding(self, num_embeddings, embedding_dim):
        return VocabParallelEmbedding(num_embeddings, embedding_dim, config=self.config)

    def lm_logits(self, hidden, word_embeddings):
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return F.linear(hidden, word_embeddings)

    def gather_vocab(self, logits):
        return gather_vocab(logits)

    def cross_entropy(self, logits, labels, vocab_size):
        """Over the vocabulary split across the group: no rank gathers the full logits."""
        return tensor_parallel.vocab_parallel_cross_entropy(mask_padded_vocab(logits, vocab_size).float(), labels)


def layer_factory(tp: int) -> LayerFactory:
    """The layers of a tensor-parallel group of `tp` ranks: megatron-core's when tp > 1; plain torch
    ones at tp = 1, where megatron-core's layers add nothing but their overhead."""
    return MegatronLayers(tp) if tp > 1 else LayerFactory()


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """The full vocabulary's logits from each tensor-parallel rank's slice (last dimension), for
    inference: a plain all_gather, no autograd (training takes the vocab-parallel cross entropy
    instead)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sends the logits of the padding rows (ids >= vocab_size) to -inf on whichever rank holds them."""
    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank <= vocab_size:
        return logits
    ids = torch.arange(start, start + per_rank, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def init_parallel_state(topology, timeout_minutes: float) -> None:
    """megatron-core's groups for pangu's mapping of ranks (tp fastest, then dp, then pp), checked
    against it on every rank."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )
    megatron = (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    if megatron != (topology.dp_rank, topology.tp_rank, topology.pp_rank):
        raise RuntimeError(
            f"rank {topology.rank}: pangu places it at (dp, tp, pp) = "
            f"{(topology.dp_rank, topology.tp_rank, topology.pp_rank)} but megatron-core at {megatron}"
        )
