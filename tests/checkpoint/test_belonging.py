"""A network and what it is put next to must belong together (pangu/checkpoint/belonging.py), in
every command: the tokenizer it was trained with (evaluate, generate, task scoring, resume,
train.init_from), the function its config computes (every model field but the training-only
ones), and, for a resume, the corpus its data position counts in."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import CheckpointError
from pangu.cli import main
from pangu.config import ModelConfig
from tests.helpers import STEPS, TASK_DATA, losses, run_pretrain, tiny_overrides

# a value other than the default for each ModelConfig field (a new field must be added here, and
# is then checked like the others, or to format.TRAINING_ONLY_FIELDS)
OTHER_VALUES = {
    "num_layers": 5,
    "hidden_size": 96,
    "num_heads": 2,
    "ffn_hidden_size": 100,
    "vocab_size": 601,  # the same padded embedding (640 rows), other logits kept
    "seq_length": 64,
    "activation": "gelu",
    "final_layernorm": "after",
    "dropout": 0.3,
    "attention_dropout": 0.2,
    "layernorm_eps": 1e-6,
    "init_std": 0.01,
    "scale_invariant": True,
}


def test_every_model_field_but_the_training_only_ones_must_match():
    stored = ModelConfig(num_layers=3, hidden_size=64, vocab_size=600, seq_length=32)
    manifest = SimpleNamespace(model=stored)  # what check_model_matches reads of a Manifest
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in OTHER_VALUES.items():
        given = dataclasses.replace(stored, **{name: value})
        if name in fmt.TRAINING_ONLY_FIELDS:
            fmt.check_model_matches(manifest, given, Path("ckpt"))
        else:
            with pytest.raises(CheckpointError, match=rf"model\.{name} = .* but the config has {value!r}"):
                fmt.check_model_matches(manifest, given, Path("ckpt"))
    assert set(fmt.TRAINING_ONLY_FIELDS) == {"dropout", "attention_dropout", "init_std"}
    # 0 means 4 x hidden_size: the same width written two ways is the same function
    fmt.check_model_matches(manifest, dataclasses.replace(stored, ffn_hidden_size=256), Path("ckpt"))
    # every field that differs is named, in one line
    with pytest.raises(CheckpointError) as raised:
        fmt.check_model_matches(manifest, dataclasses.replace(stored, activation="gelu", layernorm_eps=1e-6), Path("c"))
    assert "model.activation" in str(raised.value) and "model.layernorm_eps" in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Commands, on the tests' trained tiny model


def _train_tokenizer(path: Path, lines: slice, vocab_size: int):
    from pangu.data.sources import people_daily_file
    from pangu.data.tokenizer import PanguTokenizer

    raw = people_daily_file().read_text(encoding="utf-8").splitlines()[lines]
    texts = ["".join(token.rsplit("/", 1)[0] for token in line.split()) for line in raw if line.strip()]
    return PanguTokenizer.train(texts, path, vocab_size, "bpe", num_threads=1)


@pytest.fixture(scope="module")
def foreign_tokenizer_corpus(tiny_corpus, tmp_path_factory) -> Path:
    """The tests' corpus with another tokenizer of the same size (trained on other paragraphs) put
    in its place, consistently (meta.json names it): data of another tokenizer, ids all in range."""
    root = tmp_path_factory.mktemp("foreign")
    corpus = root / "prepared"
    shutil.copytree(tiny_corpus, corpus)
    tokenizer = _train_tokenizer(corpus / "tokenizer.model", slice(1500, 3500), 600)
    meta = json.loads((corpus / "meta.json").read_text())
    assert tokenizer.vocab_size == 600 and tokenizer.fingerprint != meta["tokenizer"]["fingerprint"]
    meta["tokenizer"]["fingerprint"] = tokenizer.fingerprint
    (corpus / "meta.json").write_text(json.dumps(meta))
    return corpus


@pytest.fixture(scope="module")
def other_corpus(tiny_corpus, tmp_path_factory) -> Path:
    """Other paragraphs prepared with the tests' corpus's own tokenizer: another corpus, the same
    tokenizer."""
    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.data.sources import people_daily_file

    root = tmp_path_factory.mktemp("other")
    lines = people_daily_file().read_text(encoding="utf-8").splitlines()[1500:3000]
    texts = ["".join(token.rsplit("/", 1)[0] for token in line.split()) for line in lines if line.strip()]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    overrides = [
        f"data.sources=[{{kind: jsonl, path: {root / 'docs.jsonl'}}}]",
        "data.tokenizer.kind=pangu",
        f"data.tokenizer.path={tiny_corpus / 'tokenizer.model'}",
        f"data.prepared_dir={root / 'prepared'}",
        "data.valid_fraction=0.05",
        "data.num_proc=1",
    ]
    prepare(load_config(None, overrides), progress=False)
    return root / "prepared"


def _copy_checkpoint(run: Path, to: Path) -> Path:
    """The newest checkpoint of `run`, copied to `to` (a checkpoint directory of its own)."""
    shutil.copytree(fmt.resolve(run), to)
    return to


def _files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file() and p.name != ".pangu.lock"}


@pytest.mark.slow
def test_evaluate_refuses_data_of_another_tokenizer(straight_run, tiny_corpus, foreign_tokenizer_corpus, capsys):
    """Today's perplexity of a model on data its tokenizer did not write would be a number about
    nothing: refused, where the model's own data is evaluated."""
    checkpoint = ["--checkpoint", str(straight_run), "--max-samples", "8"]
    assert main(["evaluate", *tiny_overrides(foreign_tokenizer_corpus, straight_run), *checkpoint]) == 2
    err = capsys.readouterr().err
    assert "was trained with another tokenizer than the data of data.prepared_dir" in err and "Traceback" not in err
    assert main(["evaluate", *tiny_overrides(tiny_corpus, straight_run), *checkpoint]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n") :])["samples"] == 8
    # a config that computes another function than the checkpoint is refused too, naming the field
    settings = tiny_overrides(tiny_corpus, straight_run, "model.final_layernorm=after", "model.dropout=0.5")
    assert main(["evaluate", *settings, *checkpoint]) == 2
    err = capsys.readouterr().err
    assert "model.final_layernorm = 'before' but the config has 'after'" in err and "dropout" not in err


@pytest.mark.slow
def test_task_scoring_uses_the_checkpoints_tokenizer_or_refuses_the_datas(
    straight_run, tiny_corpus, foreign_tokenizer_corpus, tmp_path, capsys
):
    """A checkpoint that carries no tokenizer is scored with the prepared data's, which must be the
    one it was trained with."""
    bare = _copy_checkpoint(straight_run, tmp_path / "bare")
    (bare / "tokenizer.model").unlink()
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["files"]["tokenizer.model"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    task = ["--task", f"sentiment={TASK_DATA / 'sentiment.jsonl'}", "--max-examples", "4", "--checkpoint", str(bare)]
    assert main(["evaluate", *tiny_overrides(foreign_tokenizer_corpus, tmp_path), *task]) == 2
    err = capsys.readouterr().err
    assert "was trained with another tokenizer than the tokenizer of data.prepared_dir" in err
    assert main(["evaluate", *tiny_overrides(tiny_corpus, tmp_path), *task]) == 0
    assert '"sentiment"' in capsys.readouterr().out


@pytest.mark.slow
def test_generate_refuses_a_tokenizer_its_model_was_not_trained_with(straight_run, foreign_tokenizer_corpus, tmp_path):
    """A checkpoint whose carried tokenizer is not the one its manifest says the weights were
    trained with (copied in from elsewhere) generates nothing."""
    swapped = _copy_checkpoint(straight_run, tmp_path / "swapped")
    shutil.copyfile(foreign_tokenizer_corpus / "tokenizer.model", swapped / "tokenizer.model")
    manifest = json.loads((swapped / "manifest.json").read_text())
    record = fmt.file_entry(swapped / "tokenizer.model")
    manifest["files"]["tokenizer.model"] = {"bytes": record.bytes, "xxh3": record.xxh3}
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    assert main(["generate", "--checkpoint", str(swapped), "--prompt", "中国", "--max-new-tokens", "3"]) == 2


@pytest.mark.slow
def test_task_scoring_refuses_a_tokenizer_of_another_vocabulary(straight_run, tmp_path):
    """The API too: a tokenizer smaller than the model's vocabulary gives ids the model knows, and
    scores about nothing."""
    import pangu
    from pangu.checkpoint.belonging import MismatchError
    from pangu.evaluation.harness import evaluate_tasks

    model, _ = pangu.load(straight_run)
    small = _train_tokenizer(tmp_path / "small.model", slice(0, 1000), 400)
    with pytest.raises(MismatchError, match="vocabulary of 600 pieces, the tokenizer given has 400"):
        evaluate_tasks(model, [f"sentiment={TASK_DATA / 'sentiment.jsonl'}"], small, max_examples=4)


@pytest.mark.slow
def test_a_resume_that_changes_the_function_is_refused(straight_run, tiny_corpus, tmp_path):
    """model.activation and model.final_layernorm change no shape, and today a resume would take
    them silently: refused, naming both, and the run directory is left as it was. A training-only
    field (dropout) may change."""
    out = tmp_path / "changed"
    shutil.copytree(straight_run, out)
    before = _files(out)
    changed = tiny_overrides(tiny_corpus, out, "model.activation=gelu", "model.final_layernorm=after")
    result = run_pretrain(changed)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.activation = 'fast_gelu' but the config has 'gelu'" in result.stderr
    assert "model.final_layernorm = 'before' but the config has 'after'" in result.stderr
    assert "set train.restart=true" in result.stderr
    assert _files(out) == before

    result = run_pretrain(tiny_overrides(tiny_corpus, out, "model.dropout=0.0", f"train.steps={STEPS + 1}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(out))[-1] == STEPS + 1


@pytest.mark.slow
def test_init_from_refuses_another_function_or_another_tokenizer(
    straight_run, tiny_corpus, foreign_tokenizer_corpus, tmp_path
):
    """Starting a new run from a checkpoint's weights takes them only for the same function and
    the tokenizer they were trained with (any corpus: that is what init_from is for)."""
    start = f"train.init_from={straight_run}"
    result = run_pretrain(tiny_overrides(foreign_tokenizer_corpus, tmp_path / "a", start))
    assert result.returncode == 2 and "was trained with another tokenizer" in result.stderr
    result = run_pretrain(tiny_overrides(tiny_corpus, tmp_path / "b", start, "model.final_layernorm=after"))
    assert result.returncode == 2 and "model.final_layernorm = 'before' but the config has 'after'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.slow
def test_a_resume_onto_another_corpus_is_refused_the_same_corpus_elsewhere_is_not(
    straight_run, tiny_corpus, foreign_tokenizer_corpus, other_corpus, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    before = _files(out)
    result = run_pretrain(tiny_overrides(foreign_tokenizer_corpus, out))
    assert result.returncode == 2 and "was trained with another tokenizer" in result.stderr
    result = run_pretrain(tiny_overrides(other_corpus, out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was trained on another corpus than the data of data.prepared_dir" in result.stderr
    assert f"train.init_from={out}/checkpoints/step_{STEPS:08d}" in result.stderr
    assert _files(out) == before

    # the same corpus in another place (copied, as onto another file system) is the same corpus
    moved = tmp_path / "moved"
    shutil.copytree(tiny_corpus, moved)
    result = run_pretrain(tiny_overrides(moved, out, f"train.steps={STEPS + 1}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(out))[-1] == STEPS + 1
