"""PanGu-α as a DeepSpeed `PipelineModule`: one pipeline layer per stage, each a `PanguStage`
(pangu/model/pangu_alpha.py) holding the declared layers of that stage.

pangu cuts the stages itself (pangu/parallel/stages.py, which the other engine and the planner
read too) and hands DeepSpeed exactly one layer per stage. Between stages flows a tuple of tensors: (hidden,
position_ids) or, with EOD reset, (hidden, position_ids, document_ids); the integer tensors go
to the next stage without gradients (the query layer needs the positions, every attention layer
the documents). The word embedding is tied between the first stage and the head on the last:
each holds a copy, initialised alike, whose gradients DeepSpeed all-reduces over the two stages
(megatron-core's embedding group) before the optimizer step; the head's copy counts once in the
gradient norm.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from pangu.config import Config
from pangu.model.factory import LayerFactory
from pangu.model.pangu_alpha import DropoutSeeds, PanguStage, TransformerLayer
from pangu.parallel.stages import stage_bounds
from pangu.parallel.topology import Topology


class DeepSpeedStage(PanguStage):
    """A stage as DeepSpeed calls it: one tuple in, a tuple (or the logits) out."""

    def forward(self, inputs):
        return super().forward(*inputs)


class StagePipeline(PipelineModule):
    """DeepSpeed's pipeline over pangu's stages, with the tied word embedding handled by pangu."""

    def __init__(self, config: Config, topology: Topology, layers: LayerFactory, loss_fn, dropout_seeds: DropoutSeeds):
        bounds = stage_bounds(config, topology.tp, topology.pp)
        specs = [
            LayerSpec(
                DeepSpeedStage,
                config.model,
                layers,
                first=bounds[stage],
                last=bounds[stage + 1],
                recompute=config.parallel.recompute,
                dropout_seeds=dropout_seeds,
            )
            for stage in range(topology.pp)
        ]
        super().__init__(
            layers=specs,
            topology=deepspeed_topology(topology),
            loss_fn=loss_fn,
            partition_method="uniform",  # one layer (a whole stage) each
            activation_checkpoint_interval=0,  # pangu's stages recompute what parallel.recompute asks
        )
        self.stage: PanguStage = self.forward_funcs[0]
        self._embedding_group = None
        if topology.pp > 1 and (self.stage.is_first or self.stage.is_last):
            self._embedding_group = parallel_state.get_embedding_group()
            if self.stage.is_last and not self.stage.is_first:
                # counted once in the gradient norm: on the first stage
                self.stage.embedding.word_embeddings.weight.ds_pipe_replicated = True
        if config.train.compile:  # each transformer layer compiled on its own: one graph, reused by every block
            for _, module in self.stage.trunk:
                if isinstance(module, TransformerLayer):
                    module.compile()

    def get_tied_weights_and_groups(self):
        """What DeepSpeed all-reduces before the optimizer step (ReduceTiedGrads)."""
        if self._embedding_group is None:
            return []
        return [(self.stage.embedding.word_embeddings.weight, self._embedding_group)]

    def allreduce_tied_weight_gradients(self):
        for weight, group in self.get_tied_weights_and_groups():
            torch.distributed.all_reduce(weight.grad, group=group)


def deepspeed_topology(topology: Topology) -> PipeModelDataParallelTopology:
    """DeepSpeed's view of pangu's rank mapping, checked to agree with it."""
    ds = PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.tp, num_dp=topology.dp)
    coords = ds.get_coord(topology.rank)
    if (coords.data, coords.model, coords.pipe) != (topology.dp_rank, topology.tp_rank, topology.pp_rank):
        raise RuntimeError(
            f"rank {topology.rank}: DeepSpeed places it at (dp, tp, pp) = {(coords.data, coords.model, coords.pipe)}, "
            f"pangu at {(topology.dp_rank, topology.tp_rank, topology.pp_rank)}"
        )
    return ds
