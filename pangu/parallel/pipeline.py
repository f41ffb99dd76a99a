"""PanGu-α as a DeepSpeed `PipelineModule`: one pipeline layer per layer of the declaration
(pangu/model/layout.py), which DeepSpeed cuts into stages.

Between layers flows a tuple of tensors: (hidden, position_ids) or, with EOD reset,
(hidden, position_ids, attention_mask). position_ids and the mask are integer/bool tensors, so
the engine sends them to the next stage without gradients; the query layer needs the positions
for its query embedding. The layers are the model's own classes (pangu/model/pangu_alpha.py)
behind a tuple-in, tuple-out adapter, and `canonical_names` maps this module's parameter names to
the canonical ones of checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from pangu.config import Config, ModelConfig
from pangu.model import layout
from pangu.model.factory import LayerFactory
from pangu.model.pangu_alpha import FinalLayerNorm, QueryLayer, Stem, TransformerLayer
from pangu.parallel.tensor_parallel import VocabParallelEmbedding, megatron_config
from pangu.parallel.topology import Topology

TIED_KEY = "word_embeddings"


class WordEmbeddingPipe(VocabParallelEmbedding):
    """First layer: token ids -> word vectors. Also the head on the last stage (tied weights)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory):
        super().__init__(config.padded_vocab_size, config.hidden_size, config=megatron_config(layers.tp_size))
        self.layers = layers

    def forward(self, inputs):
        input_ids, *rest = inputs
        return (super().forward(input_ids), *rest)


def lm_head(embedding: WordEmbeddingPipe, inputs) -> torch.Tensor:
    """The head: logits for this rank's vocabulary slice, against the tied word embedding."""
    return embedding.layers.lm_logits(inputs[0], embedding.weight)


class PositionEmbeddingPipe(torch.nn.Module):
    """Adds the position embedding and applies the embedding dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(config.seq_length, config.hidden_size))
        self.dropout = config.dropout

    def forward(self, inputs):
        words, position_ids, *mask = inputs
        x = words + F.embedding(position_ids, self.weight)
        return (F.dropout(x, self.dropout, training=self.training), position_ids, *mask)


class TrunkPipe:
    """Tuple in, tuple out around a trunk layer of the model: (x, position_ids[, mask])."""

    def forward(self, inputs):
        x, position_ids, *mask = inputs
        return (super().forward(x, mask[0] if mask else None, position_ids), position_ids, *mask)


class StemPipe(TrunkPipe, Stem):
    pass


class TransformerLayerPipe(TrunkPipe, TransformerLayer):
    pass


class QueryLayerPipe(TrunkPipe, QueryLayer):
    pass


class FinalLayerNormPipe(TrunkPipe, FinalLayerNorm):
    pass


TRANSFORMER_PIPES = {layout.BLOCK: TransformerLayerPipe, layout.QUERY: QueryLayerPipe}


def _layer_spec(layer: layout.Layer, config: Config, layers: LayerFactory) -> LayerSpec:
    model, selective = config.model, config.parallel.recompute == "selective"
    if layer.kind == layout.WORD_EMBEDDING:
        return TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, model, layers, tied_weight_attr=["weight"])
    if layer.kind == layout.HEAD:
        return TiedLayerSpec(
            TIED_KEY, WordEmbeddingPipe, model, layers, forward_fn=lm_head, tied_weight_attr=["weight"]
        )
    if layer.kind == layout.POSITION_EMBEDDING:
        return LayerSpec(PositionEmbeddingPipe, model)
    if layer.kind == layout.STEM_LAYER:
        return LayerSpec(StemPipe, model, layers)
    if layer.kind == layout.FINAL_NORM:
        return LayerSpec(FinalLayerNormPipe, model)
    return LayerSpec(TRANSFORMER_PIPES[layer.kind], model, layers, selective)


def build_pipeline(config: Config, topology: Topology, layers: LayerFactory, loss_fn) -> PipelineModule:
    """This rank's stage of the pipeline, its splittable layers made by `layers`."""
    transformer_classes = [cls.__name__ for cls in TRANSFORMER_PIPES.values()]
    # "uniform" balances the transformer layers over the stages; "parameters" the parameters
    partition = "parameters" if config.parallel.partition == "parameters" else "type:" + "|".join(transformer_classes)
    pipe = PipelineModule(
        layers=[_layer_spec(layer, config, layers) for layer in layout.layers(config.model)],
        topology=topology.deepspeed_topology,
        loss_fn=loss_fn,
        partition_method=partition,
        activation_checkpoint_interval=1 if config.parallel.recompute == "full" else 0,
        checkpointable_layers=transformer_classes,
    )
    if config.train.compile:  # each transformer layer compiled on its own: one graph, reused by every block
        for module in pipe.forward_funcs:
            if isinstance(module, tuple(TRANSFORMER_PIPES.values())):
                module.compile()
    return pipe


def canonical_names(pipe: PipelineModule, config: ModelConfig) -> dict[str, str]:
    """{pipeline parameter name: canonical parameter name} for the parameters this stage holds."""
    modules = [layer.module for layer in layout.layers(config)]
    mapping = {}
    for name, _ in pipe.named_parameters():
        head, _, rest = name.partition(".")
        if head == "tied_modules":
            key, _, rest = rest.partition(".")
            assert key == TIED_KEY, name
            prefix = layout.WORD_EMBEDDINGS
        else:
            prefix = modules[int(head)]
        mapping[name] = f"{prefix}.{rest}"
    return mapping
