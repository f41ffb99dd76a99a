"""Zero/few-shot evaluation harness: metrics on hand-made cases, ranking, spans and shots with a
fake scorer, every task file on its tiny example data, (2,2,2) and (4,2,1) engines against one
process, and a tiny model trained on the sentiment task's own examples that the harness must see."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pangu.evaluation.harness import evaluate_tasks, span_score
from pangu.evaluation.metrics import (
    bootstrap_interval,
    cmrc_scores,
    exact_match,
    f1_score,
    mixed_segmentation,
    wilson_interval,
)
from pangu.evaluation.prompts import Prompter
from pangu.evaluation.scoring import Scorer
from pangu.evaluation.tasks import TaskError, available_tasks, load_task, read_examples, sample_shots, task_from_dict
from tests.helpers import PROBES, REPO, TASK_DATA, run_pretrain, tiny_overrides

EXAMPLES = TASK_DATA
PROBE = PROBES / "evaluation_probe.py"
# each builtin/CLUE-shaped task definition with its tiny example data file
EXAMPLE_TASKS = {
    "sentiment": "sentiment.jsonl",
    "tnews": "tnews.json",
    "iflytek": "iflytek.json",
    "ocnli": "ocnli.json",
    "cmrc2018": "cmrc2018.json",
    "webqa": "webqa.jsonl",
    "text_ppl": "text.txt",
}


def example_spec(name: str) -> str:
    return f"{name}={EXAMPLES / EXAMPLE_TASKS[name]}"


# ---------------------------------------------------------------------------------------------
# Metrics


def test_mixed_segmentation_splits_cjk_characters_and_drops_punctuation():
    assert mixed_segmentation("北京，天安门！") == ["北", "京", "天", "安", "门"]
    assert mixed_segmentation("PanGu-α模型2.6B版, v1") == ["pangu", "α", "模", "型", "2.6b", "版", "v1"]
    assert mixed_segmentation("  The Eiffel Tower.") == ["the", "eiffel", "tower"]
    assert mixed_segmentation("《红楼梦》") == ["红", "楼", "梦"]
    assert mixed_segmentation("……") == []


@pytest.mark.parametrize(
    "prediction, reference, em, f1",
    [
        ("北京", "北京", 1.0, 1.0),
        ("北京。", "北京", 1.0, 1.0),  # punctuation dropped
        ("“北京”", "北京", 1.0, 1.0),
        ("北京天安门", "天安门广场", 0.0, 0.6),  # LCS 天安门: p = r = 3/5
        ("京北", "北京", 0.0, 0.5),  # longest common SUBSTRING, not bag of tokens
        ("上海", "北京", 0.0, 0.0),
        ("", "北京", 0.0, 0.0),
        ("the Eiffel Tower", "Eiffel Tower", 0.0, 0.8),  # p = 2/3, r = 1
        ("EIFFEL tower!", "eiffel tower", 1.0, 1.0),  # lower-cased
        ("2009年2月22日", "2009年2月22日", 1.0, 1.0),
        ("2009年2月", "2009年2月22日", 0.0, 0.8),  # [2009 年 2 月] in [2009 年 2 月 22 日]: p 1, r 4/6
        ("iPhone 6的价格", "iphone 6", 0.0, 2 * (2 / 5) * 1 / (2 / 5 + 1)),  # mixed text
    ],
)
def test_exact_match_and_f1_on_known_pairs(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert f1_score(prediction, reference) == pytest.approx(f1)


def test_scores_take_the_best_reference():
    assert cmrc_scores("十二个月", ["12个月", "十二个月"]) == {"em": 1.0, "f1": 1.0}
    assert cmrc_scores("保禄", ["圣名保禄", "保禄"])["em"] == 1.0
    scores = cmrc_scores("圣名", ["圣名保禄", "保禄"])
    assert scores["em"] == 0.0 and scores["f1"] == pytest.approx(2 / 3)  # p = 1, r = 2/4


def test_confidence_intervals():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(95, 100) == pytest.approx((0.8883, 0.9785), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    values = [0.0, 1.0, 0.5, 0.25, 1.0]
    low, high = bootstrap_interval(values, seed=3)
    assert (low, high) == bootstrap_interval(values, seed=3) and low < np.mean(values) < high


# ---------------------------------------------------------------------------------------------
# A fake tokenizer (greedy longest match over characters and a few merged words) and scorer


class FakeTokenizer:
    eod_id, pad_id = 0, 1

    def __init__(self, merges=()):
        self.vocab = {word: 1000 + i for i, word in enumerate(merges)}
        self.inverse = {v: k for k, v in self.vocab.items()}

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            word = next((w for w in sorted(self.vocab, key=len, reverse=True) if text.startswith(w, i)), None)
            if word:
                ids.append(self.vocab[word])
                i += len(word)
            else:
                ids.append(ord(text[i]) + 10_000)
                i += 1
        return ids

    def decode(self, ids) -> str:
        return "".join(self.inverse.get(i) or chr(i - 10_000) for i in ids if i >= 1000)


class FakeScorer(Scorer):
    """Token t costs costs[t] (default 1); generation answers from a table keyed by prompt text."""

    def __init__(self, tokenizer, costs=None, answers=None, seq_length=256):
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.costs = {tokenizer.encode(k)[0]: v for k, v in (costs or {}).items()}
        self.answers = answers or {}
        self.rows_seen = []

    def token_losses(self, rows):
        self.rows_seen += rows
        return [np.array([self.costs.get(t, 1.0) for t in row[1:]], dtype=np.float32) for row in rows]

    def generate(self, prompts, max_new_tokens, stop):
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            answer = next((a for q, a in self.answers.items() if text.endswith(q)), "不知道")
            out.append(self.tokenizer.encode(answer + "\n之后的话")[:max_new_tokens])
        return out


def sentiment_task(**changes):
    return load_task(example_spec("sentiment"), **changes)


def test_ranking_picks_the_candidate_with_the_lower_loss():
    tok = FakeTokenizer()
    task = sentiment_task()
    results = evaluate_tasks(FakeScorer(tok, {"差": 0.5, "好": 2.0}), [task], tok, details=True)["sentiment"]
    assert {r["prediction"] for r in results["details"]} == {"negative"}
    assert results["accuracy"] == 0.5 and results["correct"] == 3 and results["chance"] == 0.5
    for record in results["details"]:
        assert record["scores"] == pytest.approx([2.0, 0.5])  # [positive, negative], the candidate's token only
    results = evaluate_tasks(FakeScorer(tok, {"差": 2.0, "好": 0.5}), [task], tok)["sentiment"]
    assert results["accuracy"] == 0.5 and results["per_label"]["positive"] == {"examples": 3, "correct": 3}


def test_reduce_mean_or_sum_and_the_scored_span():
    tok = FakeTokenizer()
    raw = {
        "name": "t",
        "kind": "classification",
        "data": str(EXAMPLES / "sentiment.jsonl"),
        "template": "评论：{text}\n这是一条{candidate}评。",
        "candidates": {"positive": "好好", "negative": "差"},
    }
    costs = {"好": 0.4, "差": 0.7}
    by_mean = evaluate_tasks(FakeScorer(tok, costs), [task_from_dict(raw)], tok, details=True)["t"]["details"]
    assert by_mean[0]["scores"] == pytest.approx([0.4, 0.7])
    by_sum = evaluate_tasks(
        FakeScorer(tok, costs), [task_from_dict({**raw, "score": {"reduce": "sum"}})], tok, details=True
    )["t"]["details"]
    assert by_sum[0]["scores"] == pytest.approx([0.8, 0.7]) and by_sum[0]["prediction"] == "negative"
    # the whole example: every token after the (prepended) separator, with the shots left out
    task = task_from_dict({**raw, "score": {"span": "example", "reduce": "sum"}, "shots": 1})
    prepared = Prompter(tok, 256).prepare(task)
    text = "评论：房间很干净，服务也很周到，下次还会再来。\n这是一条好好评。"
    row = prepared.rows[0][0]
    assert tok.decode(row.ids[row.start : row.end]) == text and row.end == len(row.ids)
    assert tok.decode(row.ids[1 : row.start]).endswith("评。\n")  # one demonstration, then the separator
    assert row.ids[0] == tok.eod_id
    to_end = Prompter(tok, 256).prepare(task.replace(score_span="candidate_to_end")).rows[0][0]
    assert tok.decode(to_end.ids[to_end.start : to_end.end]) == "好好评。"


def test_a_token_straddling_the_candidate_seam_belongs_to_the_candidate():
    tok = FakeTokenizer(merges=["好评", "差评"])  # as jieba + BPE do with real text
    prepared = Prompter(tok, 256).prepare(sentiment_task())
    for row, word in zip(prepared.rows[0], ["好评", "差评"]):
        assert tok.decode(row.ids[row.start : row.end]) == word


def test_truncation_keeps_the_span_and_cuts_every_candidate_alike():
    tok = FakeTokenizer()
    prepared = Prompter(tok, 16).prepare(sentiment_task(score_span="candidate_to_end"))
    for rows in prepared.rows:
        assert {len(r.ids) for r in rows} == {17}
        assert {tok.decode(r.ids[: r.start]) for r in rows}.__len__() == 1  # the same (cut) context
        assert [tok.decode(r.ids[r.start : r.end]) for r in rows] == ["好评。", "差评。"]
    with pytest.raises(TaskError, match="does not fit"):
        Prompter(tok, 2).prepare(sentiment_task(score_span="candidate_to_end"))


def test_span_score_indexing():
    losses = np.array([1.0, 2.0, 3.0, 4.0])  # of tokens 1..4
    assert span_score(losses, 2, 4, "sum") == 5.0 and span_score(losses, 2, 4, "mean") == 2.5


# ---------------------------------------------------------------------------------------------
# Shots


def test_shot_sampling_is_deterministic_and_excludes_the_query():
    for index in range(20):
        shots = sample_shots(20, 5, index, seed=7, excluded=[index])
        assert shots == sample_shots(20, 5, index, seed=7, excluded=[index])
        assert index not in shots and len(set(shots)) == 5
    assert sample_shots(20, 5, 3, seed=7, excluded=[3]) != sample_shots(20, 5, 3, seed=8, excluded=[3])
    assert sample_shots(20, 0, 3, seed=7) == []
    assert sample_shots(2, 1, 0, seed=1, excluded=[0]) == [1]
    with pytest.raises(TaskError, match="only 1 other"):
        sample_shots(2, 2, 0, seed=1, excluded=[0])


def test_prompts_use_seeded_shots_without_the_example_or_its_duplicates(tmp_path):
    tok = FakeTokenizer()
    lines = (EXAMPLES / "sentiment.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "dup.jsonl"
    data.write_text("\n".join(lines + [lines[0]]) + "\n", encoding="utf-8")  # example 6 repeats example 0
    task = load_task(f"sentiment={data}", shots=3)
    first = Prompter(tok, 512, seed=5).prepare(task)
    assert first.shots == Prompter(tok, 512, seed=5).prepare(task).shots
    assert first.shots != Prompter(tok, 512, seed=6).prepare(task).shots
    for index, shots in zip(first.indices, first.shots):
        assert index not in shots and len(shots) == 3
        if index in (0, 6):
            assert not {0, 6} & set(shots)
    # an example keeps its shots whatever subset is evaluated
    subset = Prompter(tok, 512, seed=5).prepare(task, max_examples=3)
    for index, shots in zip(subset.indices, subset.shots):
        assert shots == first.shots[first.indices.index(index)]
    # demonstrations carry their gold label word
    row = first.rows[0][0]
    assert tok.decode(row.ids[: row.start]).count("评。\n") == 3


# ---------------------------------------------------------------------------------------------
# Task files


def test_every_task_file_is_known_and_loads():
    assert set(EXAMPLE_TASKS) <= set(available_tasks())
    for name in EXAMPLE_TASKS:
        task = load_task(example_spec(name))
        assert task.data == EXAMPLES / EXAMPLE_TASKS[name]
    sentiment = load_task("sentiment")  # the builtin source's held-out reviews: no prepared directory needed
    examples = read_examples(sentiment.data, sentiment)
    assert len(examples) > 1000 and {e["label"] for e in examples} == {"positive", "negative"}


@pytest.mark.parametrize("shots", [0, 1])
def test_every_task_runs_on_its_example_file(shots):
    tok = FakeTokenizer()
    answers = {"问：中国的首都是哪个城市？\n答：": "北京", "问：范廷颂是何时去世的？\n答：": "2009年2月22日。"}
    scorer = FakeScorer(tok, answers=answers)
    results = evaluate_tasks(scorer, [example_spec(n) for n in EXAMPLE_TASKS], tok, shots=shots, details=True)
    assert set(results) == set(EXAMPLE_TASKS)
    assert results["ocnli"]["examples"] == 5  # the "-" example is left out
    assert results["iflytek"]["chance"] == pytest.approx(1 / 3)  # candidates from the data
    assert results["tnews"]["examples"] == 5 and results["tnews"]["chance"] == pytest.approx(1 / 15)
    assert results["cmrc2018"]["examples"] == 5 and results["cmrc2018"]["em"] == pytest.approx(1 / 5)
    assert results["cmrc2018"]["details"][0]["prediction"] == "2009年2月22日。"  # cut at the stop string
    assert results["webqa"]["em"] == pytest.approx(1 / 4) and results["webqa"]["f1"] == pytest.approx(1 / 4)
    text = results["text_ppl"]
    assert text["loss"] == 1.0 and text["documents"] == 3 and "shots" not in text
    for name in ("sentiment", "tnews", "iflytek", "ocnli"):
        result = results[name]
        low, high = result["accuracy_ci"]
        assert result["shots"] == shots and 0 <= low <= result["accuracy"] <= high <= 1


def test_perplexity_windows_score_every_token_once():
    tok = FakeTokenizer()
    text = (EXAMPLES / "text.txt").read_text(encoding="utf-8").splitlines()
    stream_tokens = sum(len(line) + 1 for line in text)  # each document and its separator (+ the leading one)
    for stride in (0, 5, 16):
        task = load_task(example_spec("text_ppl")).replace(stride=stride)
        prepared = Prompter(tok, 16).prepare(task)
        rows = prepared.rows[0]
        assert sum(r.end - r.start for r in rows) == stream_tokens
        assert all(len(r.ids) <= 17 and r.start >= 1 for r in rows)
        if stride == 5:
            assert all(r.start >= 12 for r in rows[1:])  # each window sees >= 11 tokens of context


def test_task_errors_name_the_problem(tmp_path, monkeypatch):
    base = {
        "name": "t",
        "kind": "classification",
        "data": str(EXAMPLES / "sentiment.jsonl"),
        "template": "{text}{candidate}",
        "candidates": ["positive", "negative"],
    }
    with pytest.raises(TaskError, match="unknown key"):
        task_from_dict({**base, "shot": 1})
    with pytest.raises(TaskError, match="kind"):
        task_from_dict({**base, "kind": "ranking"})
    with pytest.raises(TaskError, match="exactly one"):
        task_from_dict({**base, "template": "{text}"})
    with pytest.raises(TaskError, match="no field 'review'"):
        Prompter(FakeTokenizer(), 64).prepare(task_from_dict({**base, "template": "{review}{candidate}"}))
    with pytest.raises(TaskError, match="not one of the candidates"):
        Prompter(FakeTokenizer(), 64).prepare(task_from_dict({**base, "candidates": {"positive": "好", "x": "差"}}))
    with pytest.raises(TaskError, match="CLUE_DIR"):
        monkeypatch.delenv("CLUE_DIR", raising=False)
        load_task("tnews")
    with pytest.raises(TaskError, match="no builtin task"):
        load_task("no_such_task")
    with pytest.raises(TaskError, match="does not exist"):
        Prompter(FakeTokenizer(), 64).prepare(load_task(f"sentiment={tmp_path / 'missing.jsonl'}"))


# ---------------------------------------------------------------------------------------------
# A trained tiny model: one process, and the pipeline engine under (2,2,2) and (4,2,1)

PARITY_TASKS = [example_spec("sentiment"), example_spec("ocnli"), example_spec("iflytek"), example_spec("text_ppl")]
GENERATION_TASKS = [example_spec("webqa"), example_spec("cmrc2018"), example_spec("tnews")]  # + scoring at pp = 1


def harness_args(corpus: Path, run: Path, tp: int, pp: int, tasks: list[str], predictions: Path, *extra: str):
    overrides = tiny_overrides(corpus, run, f"parallel.tp={tp}", f"parallel.pp={pp}")
    return [
        *overrides,
        "--checkpoint",
        str(run),
        "--task",
        *tasks,
        "--shots",
        "1",
        "--batch-size",
        "2",
        "--predictions",
        str(predictions),
        *extra,
    ]


@pytest.fixture(scope="session")
def engine_predictions(tiny_corpus, straight_run, tmp_path_factory) -> dict[str, Path]:
    """Both layouts evaluated in one 8-process job (gloo on the CPU)."""
    out = tmp_path_factory.mktemp("engine_eval")
    files = {"222": out / "scores_222.jsonl", "421": out / "generation_421.jsonl"}
    commands = [
        harness_args(tiny_corpus, straight_run, 2, 2, PARITY_TASKS, files["222"]),
        harness_args(tiny_corpus, straight_run, 2, 1, GENERATION_TASKS, files["421"]),
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=8",
        str(PROBE),
        *map(json.dumps, commands),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "(dp, tp, pp) = (2, 2, 2)" in done.stdout and "(dp, tp, pp) = (4, 2, 1)" in done.stdout
    return files


def _records(path: Path) -> dict[tuple[str, int], dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {(r["task"], r.get("index", r.get("window"))): r for r in records}


@pytest.mark.slow
@pytest.mark.distributed
def test_engine_layouts_score_and_generate_like_one_process(straight_run, engine_predictions):
    import pangu

    model, tokenizer = pangu.load(straight_run)
    single = evaluate_tasks(model, PARITY_TASKS + GENERATION_TASKS, tokenizer, shots=1, batch_size=3, details=True)
    expected = {
        (name, r.get("index", r.get("window"))): (result["kind"], r)
        for name, result in single.items()
        for r in result["details"]
    }
    for layout, path in engine_predictions.items():
        records = _records(path)
        tasks = PARITY_TASKS if layout == "222" else GENERATION_TASKS
        assert {task for task, _ in records} == {spec.split("=")[0] for spec in tasks}
        assert len(records) == sum(len(single[spec.split("=")[0]]["details"]) for spec in tasks)
        for key, theirs in records.items():
            kind, ours = expected[key]
            if kind == "classification":
                assert theirs["scores"] == pytest.approx(ours["scores"], rel=1e-5), (layout, key)
                assert theirs["prediction"] == ours["prediction"], (layout, key)
            elif kind == "perplexity":
                assert theirs["loss_sum"] == pytest.approx(ours["loss_sum"], rel=1e-5), (layout, key)
            else:
                assert theirs["prediction"] == ours["prediction"], (layout, key)


@pytest.mark.slow
def test_tasks_during_training_are_logged_and_leave_training_unchanged(tiny_corpus, straight_run, tmp_path):
    """train.eval_tasks are scored through the training engine at every validation (steps 3 and 6
    here): their results land in metrics.jsonl, and the losses are bitwise those of the run
    without them (scoring runs in eval mode and draws no random numbers)."""
    from tests.helpers import losses

    tasks = f"[{example_spec('sentiment')}, {example_spec('text_ppl')}]"
    out = tmp_path / "with_tasks"
    done = run_pretrain(tiny_overrides(tiny_corpus, out, f"train.eval_tasks={tasks}", "train.eval_task_examples=6"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == losses(straight_run)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "task/sentiment/accuracy" in r}
    assert sorted(scored) == [3, 6]
    # the last step's scores are those of the final checkpoint, evaluated on its own
    import pangu
    from pangu.config import load_config

    seed = load_config(out / "config.yaml").train.seed
    model, tokenizer = pangu.load(out)
    alone = evaluate_tasks(
        model, [example_spec("sentiment"), example_spec("text_ppl")], tokenizer, seed=seed, max_examples=6
    )
    assert scored[6]["task/sentiment/accuracy"] == alone["sentiment"]["accuracy"]
    assert scored[6]["task/text_ppl/ppl"] == pytest.approx(alone["text_ppl"]["ppl"], rel=1e-5)

    missing = run_pretrain(tiny_overrides(tiny_corpus, tmp_path / "missing", "train.eval_tasks=[no_such_task]"))
    assert missing.returncode == 2 and "no_such_task" in missing.stderr
    assert not (tmp_path / "missing").exists()  # refused before anything was written


@pytest.mark.slow
def test_trained_model_runs_every_task_file(straight_run):
    import pangu

    model, tokenizer = pangu.load(straight_run)
    results = evaluate_tasks(model, [example_spec(n) for n in EXAMPLE_TASKS], tokenizer, batch_size=4)
    assert set(results) == set(EXAMPLE_TASKS)
    assert math.isfinite(results["text_ppl"]["ppl"]) and results["text_ppl"]["ppl"] > 1
    # the windows' losses are the model's: one window, compared with a direct forward pass
    import torch
    import torch.nn.functional as F

    prepared = Prompter(tokenizer, model.config.seq_length).prepare(load_task(example_spec("text_ppl")))
    row = prepared.rows[0][0]
    ids = torch.tensor([row.ids])
    with torch.no_grad():
        losses = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
    single = evaluate_tasks(model, [load_task(example_spec("text_ppl"))], tokenizer, details=True)["text_ppl"]
    assert single["details"][0]["loss_sum"] == pytest.approx(float(losses[row.start - 1 : row.end - 1].sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The harness sees a signal: a tiny model trained on the sentiment task's own examples


@pytest.mark.slow
def test_tiny_model_trained_on_the_sentiment_examples_scores_high(tmp_path):
    """The builtin sentiment definition, its template filled with the gold label word for 80 short
    held-out reviews: that corpus is prepared (its own small tokenizer), a tiny model is trained on
    it with EOD reset (each review seen from position 0, as the harness shows it), and the
    harness must find the labels again. Evaluated: the reviews the model saw whole in one training
    sample (packing cuts a few between two samples; their label was never next to their text)."""
    import pangu
    from pangu.config import load_config
    from pangu.data.builtin import heldout_reviews
    from pangu.data.cleaning import normalize_whitespace
    from pangu.data.prepare import is_validation_document, load_prepared, prepare
    from pangu.evaluation.tasks import fill

    task = load_task("sentiment", prepared_dir=tmp_path)
    reviews = [r for r in heldout_reviews() if 8 <= len(r.text) <= 24 and "\n" not in r.text]
    picked = [r for r in reviews if r.label == "positive"][:40] + [r for r in reviews if r.label == "negative"][:40]
    lines, trained = [], []
    for review in picked:
        example = {"text": review.text, "label": review.label}
        head, tail = fill(task.template, example, task, 0)
        lines.append(head + task.candidates[review.label] + tail)
        if not is_validation_document(normalize_whitespace(lines[-1]), 0.2):
            trained.append((example, lines[-1]))
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8"
    )
    corpus, out = tmp_path / "prepared", tmp_path / "run"
    data_settings = [
        f"data.sources=[{{kind: jsonl, path: {tmp_path / 'train.jsonl'}}}]",
        "data.tokenizer.kind=train",
        "data.tokenizer.vocab_size=1200",
        f"data.prepared_dir={corpus}",
        "data.valid_fraction=0.2",
        "data.eod_reset=true",
        "data.num_proc=1",
    ]
    # prepared for the model it trains (prepare refuses a result that could not train its config's)
    config = load_config(None, [*data_settings, "model.seq_length=128", "train.global_batch_size=8"])
    prepare(config, progress=False)
    result = run_pretrain(
        tiny_overrides(
            corpus,
            out,
            "data.eod_reset=true",
            "model.num_layers=2",
            "model.hidden_size=128",
            "model.vocab_size=1200",
            "model.seq_length=128",
            "model.dropout=0.0",
            "train.steps=200",
            "train.micro_batch_size=8",
            "train.global_batch_size=8",
            "train.eval_interval=0",
            "train.log_interval=50",
            "optim.lr=0.01",
            "optim.warmup_steps=20",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]

    model, tokenizer = pangu.load(out)
    samples = [list(sample) for sample in load_prepared(corpus, "train", 128)[0]]

    def seen_whole(ids: list[int]) -> bool:
        return any(sample[k : k + len(ids)] == ids for sample in samples for k in range(len(sample) - len(ids) + 1))

    examples = [example for example, line in trained if seen_whole(tokenizer.encode(line))]
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    results = evaluate_tasks(model, [load_task(f"sentiment={data}")], config=config, batch_size=16)["sentiment"]
    assert results["examples"] == len(examples) >= 40
    assert {label: c["examples"] >= 15 for label, c in results["per_label"].items()} == {
        "positive": True,
        "negative": True,
    }
    assert results["accuracy"] >= 0.95, results


@pytest.mark.parametrize(
    "where, content, message",
    [
        ("task", b"\xff\xfe garbage", "task file .* is not UTF-8 text"),
        ("data", b"\xff\xfe garbage", "data file .* is not UTF-8 text"),
        ("data", b'{"text": "a", "label": "1"}\n7\n', "example 2 is a int, not a JSON object"),
        ("data", b"[1, 2]", "example 1 is a int, not a JSON object"),
    ],
    ids=["task file not UTF-8", "data file not UTF-8", "a line not an object", "a list of numbers"],
)
def test_a_damaged_task_or_data_file_is_one_clear_error(tmp_path, where, content, message):
    task_file = tmp_path / "task.yaml"
    data_file = tmp_path / ("data.json" if content.startswith(b"[") else "data.jsonl")
    if where == "task":
        task_file.write_bytes(content)
        spec = str(task_file)
    else:
        data_file.write_bytes(content)
        spec = f"sentiment={data_file}"
    with pytest.raises(TaskError, match=message):
        task = load_task(spec)
        read_examples(task.data, task)
