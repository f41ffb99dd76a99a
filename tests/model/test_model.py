"""The PanGu-α network against an independent NumPy forward written from docs/reference.md, through the
MindSpore import path; sizes of the paper's configs; layout-independent initialisation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import pangu
from pangu.cli import main
from pangu.config import ModelConfig, load_config
from pangu.convert.mindspore.ckpt import write_mindspore_ckpt
from pangu.evaluation.inference import generate_ids
from pangu.model.factory import LayerFactory
from pangu.model.init import initialize_parameters
from pangu.model.pangu_alpha import PanguAlpha
from pangu.model.sizes import parameter_count
from tests.model.numpy_pangu import (
    causal_attention_mask,
    eod_reset_positions_and_mask,
    numpy_pangu_logits,
    random_ms_params,
)

LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ = 3, 32, 4, 64, 300, 16
SEPARATOR = 9


def _import(tmp_path, params, fmt: str, **flags) -> torch.nn.Module:
    src = tmp_path / f"weights.{fmt}"
    if fmt == "npz":
        np.savez(src, **params)
    else:
        write_mindspore_ckpt(src, params.items())
    out = tmp_path / f"imported-{fmt}"
    args = ["convert", "import-mindspore", str(src), str(out), "--num-heads", str(HEADS)]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", value]
    assert main(args) == 0
    model, tokenizer = pangu.load(out)
    assert tokenizer is None
    return model


@pytest.mark.parametrize(
    "names,fmt,activation,final_ln",
    [
        ("release", "ckpt", "fast_gelu", "before"),
        ("mindformers", "npz", "gelu", "after"),
    ],
)
def test_imported_model_matches_numpy_reference(tmp_path, names, fmt, activation, final_ln):
    rng = np.random.default_rng(0)
    params = random_ms_params(LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ, rng, names=names)
    model = _import(tmp_path, params, fmt, activation=activation, final_ln=final_ln)
    assert model.config.num_layers == LAYERS and model.config.padded_vocab_size == 384

    input_ids = rng.integers(0, VOCAB, size=(2, SEQ))
    input_ids[0, 5] = input_ids[1, 9] = SEPARATOR  # two packed documents per row
    causal_positions = np.broadcast_to(np.arange(SEQ), (2, SEQ))
    eod_positions, eod_mask = eod_reset_positions_and_mask(input_ids, SEPARATOR)
    cases = [(causal_positions, causal_attention_mask(2, SEQ), False), (eod_positions, eod_mask, True)]
    for positions, mask, pass_mask in cases:
        expected = numpy_pangu_logits(
            params, input_ids, positions, mask, num_heads=HEADS, activation=activation, final_ln=final_ln
        )
        with torch.no_grad():
            got = model(
                torch.from_numpy(input_ids),
                torch.from_numpy(np.ascontiguousarray(positions)),
                torch.from_numpy(mask) if pass_mask else None,
            )
        assert got.shape == (2, SEQ, VOCAB)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_import_rejects_missing_parameter_and_existing_output(tmp_path, capsys):
    params = random_ms_params(LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ, np.random.default_rng(1))
    del params["backbone.blocks.1.attention.dense2.weight"]
    src = tmp_path / "broken.npz"
    np.savez(src, **params)
    assert main(["convert", "import-mindspore", str(src), str(tmp_path / "out"), "--num-heads", "4"]) == 2
    assert "blocks.1.attention.key.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    assert main(["convert", "import-mindspore", str(src), str(tmp_path / "taken"), "--num-heads", "4"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config,paper", [("configs/2.6b.yaml", 2.6e9), ("configs/13b.yaml", 13.1e9), ("configs/200b.yaml", 207.0e9)]
)
def test_parameter_counts_match_the_paper(config, paper):
    count = parameter_count(load_config(config).model)
    assert abs(count - paper) / paper < 0.03, count


def _tiny(**overrides) -> ModelConfig:
    return ModelConfig(
        **{**dict(num_layers=3, hidden_size=32, num_heads=4, vocab_size=200, seq_length=16), **overrides}
    )


def test_parameter_count_formula_matches_the_module(single_process):
    model = PanguAlpha(_tiny())
    padding = (model.config.padded_vocab_size - model.config.vocab_size) * model.config.hidden_size
    assert sum(p.numel() for p in model.parameters()) - padding == parameter_count(model.config)


def test_initialisation_is_per_parameter_and_deterministic(single_process):
    config = _tiny()
    a, b = PanguAlpha(config), PanguAlpha(config)
    initialize_parameters(a.named_parameters(), config, seed=5)
    # initialise b in reverse order: values must not depend on the order layers are built in
    initialize_parameters(reversed(list(b.named_parameters())), config, seed=5)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert torch.all(a.embedding.word_embeddings.weight[config.vocab_size :] == 0)
    stds = {name: float(p.std()) for name, p in a.named_parameters() if p.dim() == 2}
    assert stds["blocks.0.attention.query.weight"] == pytest.approx(0.01, rel=0.2)
    assert stds["blocks.0.mlp.dense_4h_to_h.weight"] == pytest.approx(0.02 / np.sqrt(6), rel=0.2)


def test_kv_cache_generation_equals_full_forward_greedy(single_process):
    config = _tiny(dropout=0.0)
    model = PanguAlpha(config)
    initialize_parameters(model.named_parameters(), config, seed=3)
    model.eval()
    prompt = [5, 17, 42, 8]
    generated = generate_ids(model, prompt, max_new_tokens=8)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generated == ids[len(prompt) :]
    assert all(t < config.vocab_size for t in generated)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"final_layernorm": "after"}, {"scale_invariant": True, "final_layernorm": "after"}],
    ids=["before", "after", "scale_invariant"],
)
def test_the_model_and_its_stages_build_exactly_the_declared_parameters(single_process, overrides):
    """pangu/model/declaration.py is the one declaration: the single-process model registers its
    parameters under the declared names, shapes and order, and every stage cut (what both
    engines build) holds each declared parameter once under the same names, the last stage a
    copy of the tied word embedding for the head."""
    from pangu.model import declaration
    from pangu.model.pangu_alpha import PanguStage
    from pangu.parallel.stages import stage_bounds

    config = _tiny(num_layers=5, **overrides)
    declared = [(p.name, p.shape) for p in declaration.parameters(config)]
    assert [(n, tuple(p.shape)) for n, p in PanguAlpha(config).named_parameters()] == declared
    full = dataclasses.replace(load_config(None, []), model=config)
    for stages in (2, 3, 5):
        bounds = stage_bounds(full, 1, stages)
        built = [
            (n, tuple(p.shape))
            for first, last in zip(bounds, bounds[1:])
            for n, p in PanguStage(config, first=first, last=last).named_parameters()
        ]
        head_copy = [(declaration.WORD_EMBEDDING_WEIGHT, dict(declared)[declaration.WORD_EMBEDDING_WEIGHT])]
        assert sorted(built) == sorted(declared + head_copy), stages


def test_flex_attention_under_a_document_mask_equals_the_reference():
    """The GPU path for EOD reset (FlexAttention with a block mask built from the document ids)
    computes what scaled_dot_product_attention computes with the materialised mask (forward, on
    the CPU; training on the GPU is checked by scripts/gpu_check.sh)."""
    import torch.nn.functional as F

    from pangu.data.dataset import make_batch
    from pangu.model.pangu_alpha import attention_core, document_block_mask, document_mask

    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(10, 50, (2, 129), generator=generator).numpy()
    samples[0, [20, 70, 71]] = 8  # separators, back to back too
    samples[1, [5, 100]] = 8
    documents = torch.from_numpy(make_batch(samples, pad_id=6, eod_id=8, eod_reset=True)["document_ids"])
    q, k, v = (torch.randn(2, 4, 128, 16, generator=generator) for _ in range(3))
    with torch.no_grad():
        got = attention_core(q, k, v, document_block_mask(documents), 0.0, scale_invariant=False)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(documents))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _train_mode_stage(config, first=0, last=None, recompute="none", seeds=None):
    from pangu.model.pangu_alpha import PanguStage

    stage = PanguStage(config, first=first, last=last, recompute=recompute, dropout_seeds=seeds)
    initialize_parameters(stage.named_parameters(), config, seed=5)
    return stage.train()


def _documents_batch(config, batch=2, seed=0):
    from pangu.data.dataset import make_batch

    generator = torch.Generator().manual_seed(seed)
    samples = torch.randint(10, config.vocab_size, (batch, config.seq_length + 1), generator=generator).numpy()
    samples[:, 5] = 8
    made = make_batch(samples, pad_id=6, eod_id=8, eod_reset=True)
    return tuple(torch.from_numpy(made[key]) for key in ("input_ids", "position_ids", "document_ids"))


def test_dropout_is_seeded_per_layer_and_micro_batch_not_per_stage(single_process):
    """With DropoutSeeds, a network cut into two stages draws exactly the masks of the uncut
    network (each layer seeds itself by its index): stage 1 does not repeat stage 0's masks."""
    from pangu.model import declaration
    from pangu.model.pangu_alpha import DropoutSeeds

    config = _tiny(num_layers=4, dropout=0.2)
    cut = len(declaration.layers(config)) // 2
    inputs = _documents_batch(config)
    outputs = []
    for bounds in [[(0, None)], [(0, cut), (cut, None)]]:
        seeds = DropoutSeeds(seed=11)
        seeds.start_step(step=3, micro_batches=[5])
        stages = [_train_mode_stage(config, first, last, seeds=seeds) for first, last in bounds]
        x = inputs
        for stage in stages:
            x = stage(*x)
        outputs.append(x)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    # and the masks depend on the step, the micro-batch and the layer
    seeds = DropoutSeeds(seed=11)
    drawn = set()
    for step in (0, 1):
        seeds.start_step(step, [0, 1])
        drawn |= {seeds.next_seed(layer) for layer in range(4) for _ in range(2)}
    assert len(drawn) == 2 * 2 * 4


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_the_document_mask_is_built_once_per_stage_forward(single_process, monkeypatch, recompute):
    from pangu.model import pangu_alpha

    built = []
    original = pangu_alpha.document_mask
    monkeypatch.setattr(pangu_alpha, "document_mask", lambda ids: built.append(1) or original(ids))
    config = _tiny(num_layers=4, dropout=0.0)
    stage = _train_mode_stage(config, recompute=recompute)
    stage(*_documents_batch(config)).sum().backward()
    assert len(built) == 1  # not once per layer, nor again when recomputed


def test_q_k_and_v_enter_the_tensor_parallel_region_once(single_process):
    """One all-reduce of the input gradient for the three projections (the query layer's query
    comes from its own input, the position's query embedding)."""

    class Counting(LayerFactory):
        entered = 0

        def tensor_parallel_input(self, x):
            Counting.entered += 1
            return x

    config = _tiny(num_layers=3)
    model = PanguAlpha(config, Counting())
    initialize_parameters(model.named_parameters(), config, seed=1)
    model(torch.randint(0, 200, (1, 8)))
    assert Counting.entered == (config.num_layers - 1) * 1 + 2


def test_megatron_column_linears_leave_a_shared_input_to_the_caller(single_process):
    from pangu.config import ParallelConfig
    from pangu.parallel.deepspeed.megatron import MegatronLayers, init_parallel_state
    from pangu.parallel.topology import init_distributed

    init_parallel_state(init_distributed(ParallelConfig()), timeout_minutes=1)
    layers = MegatronLayers(1)
    assert layers.column_linear(8, 8, bias=True, shared_input=True).disable_grad_reduce
    assert not layers.column_linear(8, 8, bias=True).disable_grad_reduce
