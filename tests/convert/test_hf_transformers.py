"""`pangu convert export-hf` writes a directory that transformers loads offline, with the code the
export ships (pangu/convert/hf_code): logits equal to pangu's, greedy generation through
transformers' `generate` and its KV cache equal to `pangu generate`'s, and the tokenizer's ids and
decoding equal to pangu's. The first test loads the export in a process where pangu cannot be
imported, as a user without pangu would; the others load it in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) are imported

import numpy as np
import pytest
import torch

import pangu
from pangu.cli import main
from pangu.convert.huggingface import export_hf, import_hf
from pangu.data.tokenizer import PanguTokenizer
from pangu.evaluation.inference import generate_ids
from tests.convert.test_export_hf import TOKENIZER, _weights
from tests.helpers import PROBES

SEQ = 48  # room for a prompt and 20 new tokens
NEW_TOKENS = 20
EOS, PAD = 9, 6
PARAGRAPH = (
    "盘古α是一个中文预训练语言模型。 它能写诗、对对联，也能续写  小说。\n"
    "第二段：模型有 2.6B 和 13B 两种规模,\n\n最后一行 with English words。"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The Hub is never reached, even if huggingface_hub was imported before the environment was set."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _load_hf(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


def _pangu_greedy(model, prompt: list[int]) -> list[int]:
    return generate_ids(model, prompt, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=(EOS,))


def _new_tokens(output: torch.Tensor, prompt_length: int) -> list[int]:
    """transformers keeps the eos it stopped at; pangu does not."""
    new = output[prompt_length:].tolist()
    return new[:-1] if new and new[-1] == EOS else new


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values  # transformers 5 / 4


@pytest.mark.slow  # a fresh process
def test_transformers_loads_the_export_offline_without_pangu(tmp_path):
    weights = _weights(tmp_path, vocab=40000, activation="fast_gelu", seq=SEQ, sharp=True)  # carries no tokenizer
    out = tmp_path / "hf"
    assert main(["convert", "export-hf", str(weights), str(out), "--tokenizer", str(TOKENIZER)]) == 0
    input_ids = np.random.default_rng(11).integers(10, 40000, size=(2, SEQ)).tolist()
    request = {"dir": str(out), "input_ids": input_ids, "prompt": "中国的首都是", "max_new_tokens": NEW_TOKENS}
    request["text"] = PARAGRAPH
    (tmp_path / "request.json").write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    probe = subprocess.run(
        [sys.executable, str(PROBES / "hf_probe.py"), str(tmp_path / "request.json"), str(tmp_path / "result.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert (tmp_path / "modules").is_dir()  # the shipped code ran from transformers' module cache
    got = torch.load(tmp_path / "result.pt")
    assert got["model_class"] == "GPTPanguForCausalLM" and got["dtype"] == "torch.float32"

    model, _ = pangu.load(weights)
    tokenizer = PanguTokenizer.from_file(TOKENIZER)
    with torch.no_grad():
        expected = model(torch.tensor(input_ids))
    assert got["logits"].shape == (2, SEQ, 40000)
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=1e-5)

    prompt = tokenizer.encode("中国的首都是")
    assert got["prompt_ids"] == prompt  # no special token added
    greedy = _pangu_greedy(model, prompt)
    assert len(greedy) == NEW_TOKENS  # no early stop: 20 tokens compared
    assert got["generated"] == greedy and got["generated_no_cache"] == greedy
    assert got["generated_text"] == tokenizer.decode(greedy)
    assert got["cache_is_a_transformers_cache"] and got["cache_class"] == "DynamicCache"
    assert got["cache_length"] == len(prompt)

    ids = tokenizer.encode(PARAGRAPH)
    assert got["text_ids"] == ids
    assert got["text_decoded"] == tokenizer.decode(ids) == unicodedata.normalize("NFKC", PARAGRAPH)
    assert "  " in got["text_decoded"] and "\n\n" in got["text_decoded"]  # spaces and newlines came back
    assert got["special_ids"] == {"eos": EOS, "pad": PAD}
    short, long = got["batch_ids"]
    assert long == ids and short[-len(prompt) :] == prompt  # padded on the left, for generation
    assert set(short[: -len(prompt)]) == {PAD} and got["batch_mask"][0].count(0) == len(ids) - len(prompt)


@pytest.mark.parametrize(
    "activation, final_ln, pad_vocab, tie_lm_head",
    [("gelu", "before", True, True), ("fast_gelu", "after", False, False)],
)
def test_logits_and_greedy_generation_equal_pangu(tmp_path, activation, final_ln, pad_vocab, tie_lm_head):
    weights = _weights(tmp_path, activation=activation, final_ln=final_ln, seq=SEQ, sharp=True)
    out = export_hf(weights, tmp_path / "hf", pad_vocab=pad_vocab, tie_lm_head=tie_lm_head)
    hf = _load_hf(out)
    assert hf.config.final_layernorm == final_ln
    assert hf.config.activation_function == {"gelu": "gelu", "fast_gelu": "quick_gelu"}[activation]
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # tied, whether written or not
    model, _ = pangu.load(weights)
    input_ids = torch.from_numpy(np.random.default_rng(12).integers(10, 300, size=(2, SEQ)))
    with torch.no_grad():
        logits, expected = hf(input_ids).logits, model(input_ids)
    assert logits.shape[-1] == (384 if pad_vocab else 300)
    torch.testing.assert_close(logits[..., :300], expected, rtol=0, atol=1e-5)
    assert torch.all(logits[..., 300:] == -torch.inf)  # the padding rows of the vocabulary are masked

    prompt = [23, 45, 67, 89]
    greedy = _pangu_greedy(model, prompt)
    assert len(greedy) == NEW_TOKENS
    for use_cache in (True, False):
        output = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache)
        assert _new_tokens(output[0], len(prompt)) == greedy, use_cache

    back, _ = pangu.load(import_hf(out, tmp_path / "back"))  # import-hf reads the directory back
    assert (back.config.activation, back.config.final_layernorm, back.config.vocab_size) == (activation, final_ln, 300)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids), expected, rtol=0, atol=0)


def test_kv_cache_steps_and_left_padded_batches_match_pangu(tmp_path):
    from transformers.cache_utils import Cache

    weights = _weights(tmp_path, activation="fast_gelu", seq=SEQ, sharp=True)
    hf = _load_hf(export_hf(weights, tmp_path / "hf"))
    model, _ = pangu.load(weights)
    ids = torch.from_numpy(np.random.default_rng(13).integers(10, 300, size=(1, 12)))
    with torch.no_grad():
        full = model(ids)
        first = hf(ids[:, :8], use_cache=True)
        cache = _cache_of(first)
        assert isinstance(cache, Cache) and cache.get_seq_length() == 8
        two = hf(ids[:, 8:10], past_key_values=cache, use_cache=True)  # several new tokens at once
        one = hf(ids[:, 10:11], past_key_values=_cache_of(two), use_cache=True)
        assert _cache_of(one).get_seq_length() == 11
    steps = torch.cat([first.logits, two.logits, one.logits], dim=1)
    torch.testing.assert_close(steps, full[:, :11], rtol=0, atol=1e-5)

    prompts = [[31, 41, 59, 26, 53, 58, 97], [27, 18, 28]]
    width = max(map(len, prompts))
    batch = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    output = hf.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for row, prompt in zip(output, prompts):
        greedy, new = _pangu_greedy(model, prompt), row[width:].tolist()
        assert new[: len(greedy)] == greedy
        assert len(greedy) == NEW_TOKENS or new[len(greedy)] == EOS  # a row that ended early: eos, then pad
    with pytest.raises(ValueError, match="beyond the 48 positions"):
        hf(torch.full((1, SEQ + 1), 11))


def test_a_trained_tokenizer_with_byte_fallback_encodes_and_decodes_as_pangu(tmp_path):
    from transformers import AutoTokenizer

    from pangu.data.sources import people_daily_file

    lines = people_daily_file().read_text(encoding="utf-8").splitlines()[:300]
    lines = [" ".join(word.rsplit("/", 1)[0] for word in line.split()[1:]) for line in lines]
    trained = PanguTokenizer.train(lines, tmp_path / "trained.model", vocab_size=300)
    weights = _weights(tmp_path, tokenizer=tmp_path / "trained.model")  # 300 pieces, the model's vocabulary
    hf = AutoTokenizer.from_pretrained(export_hf(weights, tmp_path / "hf"), trust_remote_code=True)
    ids = trained.encode(PARAGRAPH)
    assert any(trained.id_to_piece(i).startswith("<0x") for i in ids)  # characters beyond the vocabulary
    assert hf(PARAGRAPH)["input_ids"] == hf.encode(PARAGRAPH) == ids
    assert hf.decode(ids) == trained.decode(ids) == unicodedata.normalize("NFKC", PARAGRAPH)
    assert hf.decode(ids + [EOS], skip_special_tokens=True) == trained.decode(ids)
    assert (hf.eos_token_id, hf.pad_token_id, hf.vocab_size) == (trained.eod_id, trained.pad_id, 300)
