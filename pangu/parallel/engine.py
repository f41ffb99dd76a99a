"""The engine interface: everything training, evaluation and checkpoints ask of the machinery that
runs the network under a (dp, tp, pp) layout. Two engines implement it, each in a folder of its
own that is the only place importing its stack (`parallel.engine` picks one):

- `deepspeed`: DeepSpeed's PipelineEngine (1F1B, one stage per rank) with ZeRO stage 1 and
  megatron-core's tensor-parallel layers (pangu/parallel/deepspeed/);
- `torch`: torch.distributed.pipelining schedules (1F1B, interleaved 1F1B, zero bubble), DTensor
  tensor parallelism with optional sequence parallelism, and FSDP2 sharding of parameters,
  gradients and optimizer state (pangu/parallel/native/).

Both build the network from `PanguStage` (pangu/model/pangu_alpha.py), cut at the same layer
indices (pangu/parallel/stages.py), and describe what a rank owns in the same terms (`Fragment`),
so a checkpoint written by one resumes on the other under any layout.

The loss of a step is sum(token losses) / (tokens counted in the whole global batch): the trainer
counts the tokens (`MicroBatches.tokens`) and each engine scales its micro-batch losses so that
its gradient reduction over data-parallel ranks yields exactly that.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pangu.config import Config
from pangu.model.pangu_alpha import DropoutSeeds
from pangu.parallel.schedule_model import runs
from pangu.parallel.topology import Topology
from pangu.schema import ConfigError


@dataclass
class MicroBatch:
    """One micro-batch as the engine eats it (torch tensors on the host): inputs for the first
    stage, labels and the loss mask for the last (a middle stage of a pipeline gets None)."""

    input_ids: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64
    document_ids: torch.Tensor | None  # [b, s] int32 with data.eod_reset, else None (causal)
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float32: 1 where the token counts

    @classmethod
    def from_batch(cls, batch: dict) -> MicroBatch:
        """From a `pangu.data.dataset.make_batch` dict of numpy arrays."""
        documents = batch.get("document_ids")
        return cls(
            torch.from_numpy(batch["input_ids"]),
            torch.from_numpy(batch["position_ids"]),
            None if documents is None else torch.from_numpy(documents),
            torch.from_numpy(batch["labels"]),
            torch.from_numpy(batch["loss_mask"]),
        )

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """What the first stage takes: (input_ids, position_ids[, document_ids])."""
        if self.document_ids is None:
            return (self.input_ids, self.position_ids)
        return (self.input_ids, self.position_ids, self.document_ids)


@dataclass
class StepResult:
    loss: float  # mean token loss of the global batch (every rank)
    grad_norm: float  # before clipping; nan when the step was skipped for non-finite gradients
    applied: bool  # False: non-finite gradients (or an fp16 overflow), weights and state untouched


@dataclass(frozen=True)
class Fragment:
    """A part of one parameter whose fp32 master weight and optimizer state this rank owns (what
    it writes to a checkpoint and reads back): the elements [flat[0], flat[1]) in row-major order
    of the region `box` of the full tensor, stored in `checkpoint_buffers()[buffer][key]` from
    element `start`. `copy` > 0 marks a replica that checkpoints store but readers skip (the
    head's copy of the tied embedding; a tensor-parallel-replicated parameter on tp rank > 0)."""

    name: str  # canonical (pangu/model/declaration.py)
    box: tuple[tuple[int, int], ...]
    flat: tuple[int, int]
    buffer: int
    start: int
    copy: int = 0

    @property
    def numel(self) -> int:
        return self.flat[1] - self.flat[0]

    def view(self, buffers: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        return buffers[self.buffer][key].narrow(0, self.start, self.numel)


@dataclass
class Replicas:
    """Weights this rank holds bit for bit like every other rank of `group` (train.sdc_check
    compares their checksums): each of those ranks lists the same names, in the same order."""

    group: dist.ProcessGroup
    named: list[tuple[str, torch.Tensor]]  # canonical name, the tensor as this rank holds it


class Engine(ABC):
    """One rank's share of the network and its optimizer under a layout (see the module docstring)."""

    config: Config
    topology: Topology
    dropout_seeds: DropoutSeeds

    # -- training and evaluation ------------------------------------------------------------

    @property
    @abstractmethod
    def reads_inputs(self) -> bool:
        """This rank holds the first stage: it needs the micro-batches' token ids."""

    @property
    @abstractmethod
    def reads_labels(self) -> bool:
        """This rank holds the last stage: it needs the labels, and the tokens a step counts."""

    @abstractmethod
    def train_step(self, micro_batches: list[MicroBatch | None], tokens: int) -> StepResult:
        """Forward and backward over this rank's micro-batches (in order; the global micro-batch
        index of each is set on `dropout_seeds` by the caller), gradients reduced over
        data-parallel ranks, clipped to optim.grad_clip, and one optimizer step. `tokens`: the
        tokens counted in the whole global batch."""

    @abstractmethod
    def evaluate(self, micro_batches: list[MicroBatch | None], tokens: int) -> float:
        """Mean token loss of a global batch, without dropout or gradients (every rank)."""

    @abstractmethod
    def token_losses(self, micro_batches: list[MicroBatch | None]) -> list[torch.Tensor] | None:
        """Per-token losses [b, s] of each micro-batch, on the ranks holding the last stage with tp
        rank 0 (None elsewhere): task scoring."""

    @abstractmethod
    def logits(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Full-vocabulary logits [b, s, vocab_size] of one micro-batch's inputs, on every rank
        (generation; pp = 1 only)."""

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer pangu built (its param groups carry the learning rates; its spec's
        `metrics` read it)."""

    def set_lr_factor(self, factor: float) -> None:
        """Every param group's lr = its base lr x factor (the schedule's value)."""
        from pangu.optim.schedules import apply_lr_factor

        apply_lr_factor(self.optimizer.param_groups, factor)

    # -- checkpoints ------------------------------------------------------------------------

    @abstractmethod
    def checkpoint_buffers(self, weights_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """This rank's fp32 tensors that fragments live in: {"weight": master weights, state key:
        optimizer state} per buffer, 1-D. The optimizer state exists once `create_optimizer_state`
        has run."""

    @abstractmethod
    def fragments(self) -> list[Fragment]:
        """This rank's fragments, every parameter it owns part of."""

    @abstractmethod
    def state_keys(self, buffer: int) -> tuple[str, ...]:
        """The optimizer state kept per element for the parameters of a buffer."""

    @abstractmethod
    def create_optimizer_state(self, zeros: bool = True) -> None:
        """Makes the optimizer state exist before the first step (zeros; or uninitialised, for a
        checkpoint to fill, followed by `after_load`)."""

    @abstractmethod
    def after_load(self, optimizer_state: bool) -> None:
        """After a checkpoint has filled the fragments: the model's weights from the fp32 master
        weights, and (with `optimizer_state`) zeros in state no fragment covers (padding)."""

    @abstractmethod
    def optimizer_scalars(self) -> list[dict]:
        """Per buffer, the optimizer state that is not per element (see checkpoint/training.py)."""

    @abstractmethod
    def restore_optimizer_scalars(self, scalars: list[dict]) -> None: ...

    @abstractmethod
    def loss_scale_state(self) -> dict:
        """The fp16 dynamic loss scale, engine-neutral: {"scale", "good_steps"} ({} without fp16)."""

    @abstractmethod
    def restore_loss_scale(self, state: dict) -> None: ...

    @abstractmethod
    def before_optimizer_step(self, hook: Callable[[], None]) -> None:
        """Runs `hook()` at the start of every optimizer step: the one place where the master
        weights and the optimizer state change (a background checkpoint copy waits there)."""

    @abstractmethod
    def replicas(self) -> list[Replicas]:
        """The weights this rank holds identically with other ranks, one entry per group of such
        ranks (none at all when no weight has a replica)."""

    @abstractmethod
    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: parameter_bytes, master_weight_bytes, gradient_bytes,
        optimizer_state_bytes (measured from the tensors)."""


def micro_batches_per_step(config: Config, topology: Topology) -> int:
    per_step = config.train.micro_batch_size * topology.dp
    if config.train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size = {config.train.global_batch_size} is not allowed: expected a "
            f"multiple of train.micro_batch_size x dp = {config.train.micro_batch_size} x {topology.dp}"
        )
    return config.train.global_batch_size // per_step


def check_schedule_runs(config: Config, topology: Topology) -> None:
    """Refuses a training step whose micro-batches the torch engine's schedule cannot run (torch's
    schedules check it only when built; evaluation runs forward-only schedules, which take any)."""
    parallel, micro_batches = config.parallel, micro_batches_per_step(config, topology)
    if (
        parallel.engine == "torch"
        and parallel.pp > 1
        and not runs(parallel.schedule, parallel.pp, parallel.virtual_stages, micro_batches)
    ):
        raise ConfigError(
            f"parallel.schedule = {parallel.schedule!r} at pp = {parallel.pp} cannot run {micro_batches} micro-batches "
            f"per step (train.global_batch_size / (train.micro_batch_size x dp)): 1f1b needs at least pp, the "
            "interleaved schedules a multiple of their rounds (max(1, micro-batches // pp)); raise "
            "train.global_batch_size or lower train.micro_batch_size"
        )


def build_engine(config: Config, topology: Topology, initialize: bool = True) -> Engine:
    """The engine `parallel.engine` names, holding this rank's stages. Without `initialize` (a
    resumed run: a checkpoint sets every weight) no initial weight is drawn."""
    if config.parallel.engine == "deepspeed":
        from pangu.parallel.deepspeed.engine import DeepSpeedEngine

        return DeepSpeedEngine(config, topology, initialize)
    from pangu.parallel.native.engine import TorchEngine

    return TorchEngine(config, topology, initialize)


def finite_or_nan(value) -> float:
    value = float(value) if value is not None else float("nan")
    return value if math.isfinite(value) else float("nan")
