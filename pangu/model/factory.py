"""How the model's splittable layers are built: a small factory the model takes as an argument.

The model says what the network computes; the factory says how the layers that tensor
parallelism splits are made, where parameters are made, and what happens at the edges of the
split regions. This default builds plain torch layers for one process (inference, evaluation,
export: no torch.distributed needed). The engines bring their own: the DeepSpeed engine's
`MegatronLayers` (pangu/parallel/deepspeed/megatron.py: megatron-core's column/row-parallel
linears and vocab-parallel embedding), the torch engine's `DTensorLayers`
(pangu/parallel/native/layers.py: plain layers on the meta device that DTensor plans split, with
sequence parallelism at the edges).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class LayerFactory:
    """Plain torch layers (tensor-parallel size 1). Parameters are created uninitialised:
    pangu.model.init fills them (or a checkpoint does)."""

    tp_size: int = 1
    tp_rank: int = 0
    device: str | None = None  # None: uninitialised on the CPU; "meta": no storage (an engine materialises shards)

    def make(self, module_class, *args, **kwargs) -> nn.Module:
        """`module_class(*args, **kwargs)` with uninitialised parameters, where `device` says."""
        if self.device is None:
            return nn.utils.skip_init(module_class, *args, **kwargs)
        return module_class(*args, device=self.device, **kwargs)

    def column_linear(self, fan_in: int, fan_out: int, *, bias: bool, shared_input: bool = False) -> nn.Module:
        """y = x W^T + b; under tensor parallelism each rank computes a slice of the outputs. With
        `shared_input` the caller passes the input through `tensor_parallel_input` itself, once for
        every linear that reads it."""
        return self.make(nn.Linear, fan_in, fan_out, bias=bias)

    def tensor_parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the input of column-parallel linears built with `shared_input`: under tensor
        parallelism its gradient is all-reduced over the group here, once for all of them."""
        return x

    def row_linear(self, fan_in: int, fan_out: int, *, bias: bool) -> nn.Module:
        """y = x W^T + b; under tensor parallelism each rank takes a slice of the inputs and the
        partial outputs are summed over the group."""
        return self.make(nn.Linear, fan_in, fan_out, bias=bias)

    def vocab_embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        """The word embedding; under tensor parallelism each rank holds a slice of the rows."""
        return self.make(nn.Embedding, num_embeddings, embedding_dim)

    def enter_sequence_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding's output (the same on every tp rank) as the residual stream of the trunk:
        under sequence parallelism each rank keeps its slice of the sequence."""
        return x

    def residual_seed(self, seed: int) -> int:
        """The seed of a trunk layer's dropout on the residual stream: the same on every tp rank
        (the stream is replicated), or a rank's own under sequence parallelism (it holds a slice)."""
        return seed

    def lm_logits(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits against the tied word embedding (this rank's vocabulary slice), from the trunk's
        residual stream (the whole sequence again under sequence parallelism)."""
        return F.linear(hidden, word_embeddings)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """The full vocabulary's logits from each rank's slice (last dimension)."""
        return logits

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Per-token cross entropy (fp32) over the real vocabulary: the padding rows of the
        embedding (ids >= vocab_size) take no probability."""
        losses = F.cross_entropy(logits[..., :vocab_size].float().flatten(0, 1), labels.flatten(), reduction="none")
        return losses.view(labels.shape)

    def tensor_parallel_rng(self, seed: int | None, device: torch.device) -> contextlib.AbstractContextManager:
        """Context for random ops on activations split across the tensor-parallel group (the
        attention probabilities), given the layer's dropout seed (None: draw from the current
        generator): under tensor parallelism each rank draws from a stream of its own, which
        recomputation replays (the seed is an argument of what it recomputes)."""
        if seed is None or self.tp_size == 1:
            return contextlib.nullcontext()
        return seeded(mix_seed(seed, self.tp_rank), device)

    def recompute(self, function, *args):
        """function(*args) without keeping its activations; backward runs it again with the same
        random state."""
        return checkpoint(function, *args, use_reentrant=False)


PLAIN = LayerFactory()


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (a hash: nearby inputs give unrelated seeds)."""
    h = 0
    for value in values:
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """The default generator of `device` seeded with `seed` inside the block, and as it was after."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield
