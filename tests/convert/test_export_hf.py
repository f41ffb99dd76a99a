"""Export to the Hugging Face GPTPangu layout and back.

The exported tensors are run through an independent forward of the GPTPangu port written here
from the port's modeling code (h[-1] is the query layer fed by wqe; ln_f just before it; causal
scores replaced by -1e4; lm_head tied), so the layout is checked, not only the round trip.
Loading the export with transformers (the shipped code): tests/convert/test_hf_transformers.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import pangu
from pangu.checkpoint.store import CheckpointError, TensorReader, TensorWriter, sha256_file
from pangu.config import ModelConfig
from pangu.convert import huggingface as hf_module
from pangu.convert.huggingface import export_hf, hf_names, import_hf
from pangu.convert.importer import import_mindspore
from pangu.convert.mindspore.ckpt import write_mindspore_ckpt
from pangu.model import declaration
from tests.helpers import RELEASE
from tests.model.numpy_pangu import random_ms_params

LAYERS, HIDDEN, HEADS, FFN, SEQ = 3, 32, 4, 96, 16
TOKENIZER = RELEASE / "vocab.model"


def _weights(
    tmp_path: Path, *, vocab=300, activation="gelu", final_ln="before", tokenizer=None, seed=0, seq=SEQ, sharp=False
) -> Path:
    """A random model imported from MindSpore names. `sharp`: the other matrices x24 and the word and
    position embeddings x3 too, so that the blocks, not the input embedding, decide the next token
    (greedy generation does not just repeat a token) and activations are large enough that a small
    slip shows (fast GELU's 1.702 as 1.7 moves logits of std ~1.3 by ~1e-3)."""
    params = random_ms_params(LAYERS, HIDDEN, HEADS, FFN, vocab, seq, np.random.default_rng(seed))
    for name in params:  # sharpen the attention (the initial scales leave it nearly uniform)
        if ".attention.dense" in name or name.endswith("top_query_embedding.embedding_table"):
            params[name] = params[name] * 30
        elif sharp and name.endswith("embedding_table"):
            params[name] = params[name] * 3
        elif sharp and name.endswith(".weight"):
            params[name] = params[name] * 24
    src = tmp_path / f"weights-{seed}.ckpt"
    write_mindspore_ckpt(src, params.items())
    return import_mindspore(
        src,
        tmp_path / f"pangu-{seed}-{activation}-{final_ln}",
        num_heads=HEADS,
        activation=activation,
        final_layernorm=final_ln,
        tokenizer=tokenizer,
    )


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def gptpangu_logits(t: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """GPTPanguForCausalLM's forward (no cache, no padding mask, eval mode), from the port's code."""
    n, heads, eps = config["num_layers"], config["num_heads"], config["layer_norm_epsilon"]
    act = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}[config["activation_function"]]
    t = {k: v.double() for k, v in t.items()}
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).expand(batch, seq)

    def ln(x, prefix):
        return F.layer_norm(x, x.shape[-1:], t[prefix + ".weight"], t[prefix + ".bias"], eps)

    def linear(x, prefix):  # nn.Linear: weight [out, in]
        return x @ t[prefix + ".weight"].T + t[prefix + ".bias"]

    def split(x):
        return x.view(batch, seq, heads, -1).transpose(1, 2)

    hidden = t["transformer.wte.weight"][input_ids] + t["transformer.wpe.weight"][position_ids]
    query_embeds = t["transformer.wqe.weight"][position_ids]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    for i in range(n):
        p = f"transformer.h.{i}."
        if i == n - 1:
            hidden = ln(hidden, "transformer.ln_f")
        residual = hidden
        x = ln(hidden, p + "ln_1")
        q = split(linear(query_embeds if i == n - 1 else x, p + "attn.q_proj"))
        k, v = split(linear(x, p + "attn.k_proj")), split(linear(x, p + "attn.v_proj"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(v.shape[-1])
        scores = torch.where(causal, scores, torch.tensor(-1e4, dtype=scores.dtype))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, -1)
        hidden = residual + linear(context, p + "attn.c_proj")
        hidden = hidden + linear(act(linear(ln(hidden, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return hidden @ t["lm_head.weight"].T


def _pangu_logits(checkpoint: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model, _ = pangu.load(checkpoint)
    with torch.no_grad():
        return model(input_ids)


def test_export_layout_config_and_port_forward(tmp_path):
    weights = _weights(tmp_path, vocab=40000, tokenizer=TOKENIZER)
    out = export_hf(weights, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "configuration_pangu.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_pangu.py",
        "tokenization_pangu.py",
        "tokenizer_config.json",
        "vocab.model",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTPanguForCausalLM"] and config["model_type"] == "gpt_pangu"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pangu.GPTPanguForCausalLM"
    assert config["final_layernorm"] == "before" and (config["eos_token_id"], config["pad_token_id"]) == (9, 6)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"] == ["tokenization_pangu.GPTPanguTokenizer", None]
    for name in ("configuration_pangu.py", "modeling_pangu.py", "tokenization_pangu.py"):  # the package's own code
        assert (out / name).read_bytes() == (Path(hf_module.__file__).parent / "hf_code" / name).read_bytes()
    assert (
        config["num_layers"],
        config["hidden_size"],
        config["num_heads"],
        config["intermediate_size"],
        config["vocab_size"],
        config["max_position_embeddings"],
    ) == (LAYERS, HIDDEN, HEADS, FFN, 40000, SEQ)
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32"
    tensors = _hf_tensors(out)
    assert set(tensors) == set(hf_names(LAYERS).values()) | {"lm_head.weight"}
    assert set(hf_names(LAYERS)) == {p.name for p in declaration.parameters(ModelConfig(num_layers=LAYERS))}
    assert "transformer.h.2.attn.q_proj.weight" in tensors and "transformer.h.3.ln_1.weight" not in tensors
    assert tensors["transformer.wte.weight"].shape == (40000, HIDDEN)  # unpadded, as the port's config says
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (FFN, HIDDEN)  # nn.Linear [out, in]
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    assert (out / "vocab.model").read_bytes() == TOKENIZER.read_bytes()

    input_ids = torch.from_numpy(np.random.default_rng(3).integers(0, 40000, size=(2, SEQ)))
    expected = _pangu_logits(weights, input_ids).double()
    torch.testing.assert_close(gptpangu_logits(tensors, config, input_ids), expected, rtol=1e-4, atol=1e-4)


def test_sharded_export_round_trips_to_the_same_logits(tmp_path):
    weights = _weights(tmp_path)
    out = export_hf(weights, tmp_path / "hf", shard_bytes=40_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(p.stat().st_size <= 40_000 + 4096 for p in shards)  # no tensor here is larger than a shard
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _hf_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, file in index["weight_map"].items():
        with safe_open(out / file, framework="pt") as f:
            assert name in f.keys()

    back = import_hf(out, tmp_path / "back")
    input_ids = torch.from_numpy(np.random.default_rng(4).integers(0, 300, size=(2, SEQ)))
    torch.testing.assert_close(_pangu_logits(back, input_ids), _pangu_logits(weights, input_ids), rtol=0, atol=0)
    original, returned = TensorReader(weights / "tensors"), TensorReader(back / "tensors")
    assert original.names() == returned.names()
    for name in original.names():
        assert torch.equal(original.read(name), returned.read(name)), name


def _as_tensor_parallel(weights: Path, out: Path) -> Path:
    """The same model as a 2-way tensor-parallel training checkpoint: every tensor cut in two along
    dimension 0 across two stores, plus an optimizer state the export must ignore."""
    manifest = json.loads((weights / "manifest.json").read_text())
    reader = TensorReader(weights / "tensors")
    (out / "tensors").mkdir(parents=True)
    writers = [TensorWriter(out / "tensors", f"pp0-tp{rank}") for rank in range(2)]
    for name in sorted(reader.names()):
        full = reader.read(name)
        half = full.shape[0] // 2
        for rank, (start, stop) in enumerate([(0, half), (half, full.shape[0])]):
            index = (slice(start, stop),) + tuple(slice(0, n) for n in full.shape[1:])
            writers[rank].add(name, "weight", full[start:stop], tuple(full.shape), index)
            writers[rank].add(name, "exp_avg", torch.ones_like(full[start:stop]), tuple(full.shape), index)
    files = {}
    for writer in writers:
        files.update({f"tensors/{k}": v for k, v in writer.close().items()})
    manifest.update(kind="training", step=7, layout={"dp": 1, "tp": 2, "pp": 1}, files=files)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert all(sha256_file(out / rel) == info["sha256"] for rel, info in files.items())
    return out


def test_export_reads_any_layout(tmp_path):
    weights = _weights(tmp_path)
    _as_tensor_parallel(weights, tmp_path / "run" / "checkpoints" / "step_00000007")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000007")
    a = _hf_tensors(export_hf(weights, tmp_path / "a"))
    b = _hf_tensors(export_hf(tmp_path / "run", tmp_path / "b"))  # a run directory resolves to its latest
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_fast_gelu_is_recorded_as_quick_gelu(tmp_path):
    weights = _weights(tmp_path, activation="fast_gelu")
    out = export_hf(weights, tmp_path / "hf", dtype="float16")
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "quick_gelu" and config["torch_dtype"] == "float16"
    tensors = _hf_tensors(out)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    input_ids = torch.from_numpy(np.random.default_rng(5).integers(0, 300, size=(1, SEQ)))
    torch.testing.assert_close(
        gptpangu_logits(tensors, config, input_ids), _pangu_logits(weights, input_ids).double(), rtol=2e-2, atol=2e-3
    )
    back = import_hf(out, tmp_path / "back")
    model, _ = pangu.load(back)
    assert model.config.activation == "fast_gelu"


def test_padded_vocabulary_and_untied_head_options(tmp_path):
    weights = _weights(tmp_path)
    out = export_hf(weights, tmp_path / "hf", pad_vocab=True, tie_lm_head=False)
    config = json.loads((out / "config.json").read_text())
    tensors = _hf_tensors(out)
    assert "lm_head.weight" not in tensors
    assert config["vocab_size"] == 384 and config["pangu_vocab_size"] == 300
    assert tensors["transformer.wte.weight"].shape == (384, HIDDEN)
    assert not tensors["transformer.wte.weight"][300:].any()
    model, _ = pangu.load(import_hf(out, tmp_path / "back"))
    assert model.config.vocab_size == 300


def test_final_layernorm_after_is_recorded_and_read_back(tmp_path):
    weights = _weights(tmp_path, final_ln="after")
    out = export_hf(weights, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["final_layernorm"] == "after"
    assert "vocab.model" not in {p.name for p in out.iterdir()}  # the checkpoint carries no tokenizer
    back, _ = pangu.load(import_hf(out, tmp_path / "back"))
    assert back.config.final_layernorm == "after"
    input_ids = torch.from_numpy(np.random.default_rng(8).integers(0, 300, size=(2, SEQ)))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids), _pangu_logits(weights, input_ids), rtol=0, atol=0)


def _scale_invariant_weights(out: Path) -> Path:
    from pangu.checkpoint.weights import write_weights
    from pangu.model.init import initialize_parameters
    from pangu.model.pangu_alpha import PanguAlpha

    config = ModelConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_heads=HEADS,
        vocab_size=300,
        seq_length=SEQ,
        scale_invariant=True,
        final_layernorm="after",
    )
    model = PanguAlpha(config)
    initialize_parameters(model.named_parameters(), config, seed=0)
    return write_weights(out, config, model.state_dict().items())


def test_unrepresentable_checkpoints_bad_tokenizers_and_existing_output_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="scale-invariant"):
        export_hf(_scale_invariant_weights(tmp_path / "si"), tmp_path / "hf")
    weights = _weights(tmp_path, seed=1)  # 300 pieces: the released tokenizer's ids do not fit
    with pytest.raises(CheckpointError, match="40000 pieces, the model only 300"):
        export_hf(weights, tmp_path / "hf", tokenizer=TOKENIZER)
    (tmp_path / "not-sentencepiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        export_hf(weights, tmp_path / "hf", tokenizer=tmp_path / "not-sentencepiece.model")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(weights, tmp_path / "taken")
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".tmp_hf").exists()


def test_default_dtype_is_the_one_holding_most_bytes(tmp_path):
    # an imported release: fp16 blocks, fp32 embeddings from the .npy files
    params = random_ms_params(LAYERS, HIDDEN, HEADS, FFN, 40, SEQ, np.random.default_rng(6))  # blocks dominate
    params = {n: a if "embedding" in n else a.astype(np.float16) for n, a in params.items()}
    write_mindspore_ckpt(tmp_path / "mixed.ckpt", params.items())
    weights = import_mindspore(tmp_path / "mixed.ckpt", tmp_path / "pangu", num_heads=HEADS)
    out = export_hf(weights, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert {t.dtype for t in _hf_tensors(out).values()} == {torch.float16}
