"""The scale-invariant PanGu-α trunk (SIBERT recipe), checked in fp64."""

from __future__ import annotations

import pytest
import torch

from pangu.config import ModelConfig, load_config
from pangu.model import declaration
from pangu.model.init import initialize_parameters
from pangu.model.pangu_alpha import PanguAlpha
from pangu.model.sizes import parameter_count
from pangu.optim.param_groups import param_groups
from pangu.optim.scale_invariant import ScaleInvariantSGD
from pangu.schema import ConfigError

CONFIG = ModelConfig(
    num_layers=3,
    hidden_size=32,
    num_heads=4,
    vocab_size=100,
    seq_length=12,
    dropout=0.0,
    scale_invariant=True,
    final_layernorm="after",
)


def si_model(seed: int = 0) -> PanguAlpha:
    model = PanguAlpha(CONFIG)
    initialize_parameters(model.named_parameters(), CONFIG, seed)
    return model.double().eval()


TRUNK = [p.name for p in declaration.parameters(CONFIG) if p.scale_invariant]


def trunk(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if name in TRUNK]


def scale_trunk(model, c: float) -> None:
    with torch.no_grad():
        for p in trunk(model):
            p.mul_(c)


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (3, CONFIG.seq_length), generator=torch.Generator().manual_seed(seed))


def test_structure(single_process):
    model = si_model()
    names = {n for n, _ in model.named_parameters()}
    assert "stem.mlp.dense_h_to_4h.weight" in names
    assert not any(n.endswith(("attention.dense.bias", "mlp.dense_4h_to_h.bias")) for n in names)
    assert not any("layernorm" in n for n in names)  # non-affine LayerNorms
    assert declaration.QUERY_EMBEDDING_WEIGHT not in TRUNK and declaration.WORD_EMBEDDING_WEIGHT not in TRUNK
    assert "stem.mlp.dense_h_to_4h.weight" in TRUNK and "query_layer.attention.query.bias" in TRUNK
    padding = (CONFIG.padded_vocab_size - CONFIG.vocab_size) * CONFIG.hidden_size
    assert sum(p.numel() for p in model.parameters()) - padding == parameter_count(CONFIG)


@pytest.mark.parametrize("c", [10.0, 0.1])
def test_logits_do_not_change_when_the_trunk_is_scaled(single_process, c):
    model, ids = si_model(), batch()
    with torch.no_grad():
        before = model(ids)
        scale_trunk(model, c)
        after = model(ids)
    assert float((after - before).norm() / before.norm()) < 1e-6


def test_an_ordinary_model_is_not_scale_invariant(single_process):
    config = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, vocab_size=100, seq_length=12, dropout=0.0)
    model = PanguAlpha(config)
    initialize_parameters(model.named_parameters(), config, 0)
    model.double().eval()
    ids = batch()
    with torch.no_grad():
        before = model(ids)
        for name, p in model.named_parameters():
            if name.startswith(("blocks.", "query_layer.")) and "query_embeddings" not in name:
                p.mul_(10.0)
        assert (model(ids) - before).abs().max() > 1e-2


def _trunk_gradients(model) -> list[torch.Tensor]:
    model.zero_grad()
    logits = model(batch())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch(2).flatten()).backward()
    return [p.grad.clone() for p in trunk(model)]


def test_trunk_gradient_is_orthogonal_to_the_weights_and_scales_as_one_over_c(single_process):
    model = si_model()
    grads = _trunk_gradients(model)
    inner = sum((g * p).sum() for g, p in zip(grads, trunk(model)))
    norm = torch.sqrt(sum((g * g).sum() for g in grads)) * torch.sqrt(sum((p * p).sum() for p in trunk(model)))
    assert abs(float(inner / norm)) < 1e-8
    scale_trunk(model, 10.0)
    scaled = _trunk_gradients(model)
    for g, g10 in zip(grads, scaled):
        assert float((g10 * 10.0 - g).norm() / g.norm()) < 1e-6


def _equilibrium_weight_norm(initial_scale: float, steps: int = 500, average_over: int = 200) -> float:
    """The trunk's weight norm under SGD + weight decay, averaged over the last steps (at
    equilibrium it fluctuates around its level by some 10-20%)."""
    model = si_model().train()
    scale_trunk(model, initial_scale)
    named = list(model.named_parameters())
    groups = param_groups(
        named, 0.0, no_decay=[], scale_invariant=TRUNK, scale_invariant_lr=0.5, scale_invariant_weight_decay=0.1
    )
    optimizer = ScaleInvariantSGD(groups, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(steps):
        ids = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1), generator=generator)
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            norms.append(float(torch.sqrt(sum((p * p).sum() for p in trunk(model)))))
    return sum(norms[-average_over:]) / average_over


def test_sgd_with_weight_decay_reaches_the_same_weight_norm_from_any_scale(single_process):
    """Weight decay shrinks, the orthogonal SGD step grows the norm (by lr^2 ||g||^2 with
    ||g|| ~ 1/||x||): both meet at one equilibrium, whatever the initial scale (1e-2 and 1e2
    start 10^4 apart)."""
    small, large = _equilibrium_weight_norm(1e-2), _equilibrium_weight_norm(1e2)
    assert large == pytest.approx(small, rel=0.2), (small, large)


def test_sgd_si_needs_the_scale_invariant_model():
    with pytest.raises(ConfigError, match="model.scale_invariant"):
        load_config(None, ["optim.name=sgd_si"])
    with pytest.raises(ConfigError, match="model.final_layernorm"):
        load_config(None, ["model.scale_invariant=true"])
