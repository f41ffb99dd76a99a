"""Zero/few-shot evaluation: `pangu evaluate --config CFG --checkpoint DIR --task TASK...`.

- classification: each candidate filled into the template; the candidate whose scored span has
  the lowest loss (mean or sum of token losses) wins; accuracy with a Wilson interval;
- generation: greedy continuation of the prompt, cut at a stop string; CMRC2018 EM and F1
  (max over references), EM with a Wilson interval, F1 with a bootstrap interval;
- perplexity: token loss and perplexity of a text file in windows of the model's length, and
  the perplexity per character (comparable across tokenizers).

One process (`pangu.load`, the default) or any (dp, tp, pp) layout through the pipeline engine
(under torchrun, or with --engine). `evaluate_tasks(model_or_engine, tasks, ...)` is the API.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import numpy as np

from pangu.evaluation.metrics import accuracy_summary, cmrc_scores, mean_summary, wilson_interval
from pangu.evaluation.prompts import Prepared, Prompter
from pangu.evaluation.tasks import Task, load_task

# torch and the scorers are imported where used: `add_arguments` is called while the `pangu`
# command builds its parser, which must stay fast


def make_scorer(model_or_engine, *, tokenizer, config=None, topology=None, batch_size: int = 8):
    """A scorer for a `PanguAlpha`, a training engine (pangu.parallel.engine; needs `config` and `topology`,
    as the trainer holds them), or anything that already is a `Scorer`."""
    from pangu.evaluation.scoring import EngineScorer, ModelScorer, Scorer
    from pangu.parallel.engine import Engine

    if isinstance(model_or_engine, Scorer):
        return model_or_engine
    if isinstance(model_or_engine, Engine):
        if config is None or topology is None:
            raise ValueError("scoring through the pipeline engine needs its config and topology")
        return EngineScorer(model_or_engine, config, topology, pad_id=tokenizer.pad_id, eod_id=tokenizer.eod_id)
    eod_reset = bool(config.data.eod_reset) if config is not None else False
    return ModelScorer(
        model_or_engine, pad_id=tokenizer.pad_id, eod_id=tokenizer.eod_id, eod_reset=eod_reset, batch_size=batch_size
    )


def evaluate_tasks(
    model_or_engine,
    tasks,
    tokenizer=None,
    *,
    config=None,
    topology=None,
    batch_size: int = 8,
    seed: int = 1234,
    shots: int | None = None,
    max_examples: int | None = None,
    details: bool = False,
    log=None,
) -> dict[str, dict]:
    """{task name: results} for each task (a `Task`, a task file, a builtin name or NAME=DATA).

    `model_or_engine`: a `PanguAlpha` (one process), the trainer's pipeline engine (then pass
    `config` and `topology`; every rank must call, rank 0 gets the results and the
    other ranks an empty dict), or a `Scorer`.
    `tokenizer` defaults to the one of `config.data.prepared_dir`. `shots` and `max_examples`
    override the task files'. With `details`, each result carries its per-example records.
    """
    if tokenizer is None:
        if config is None:
            raise ValueError("evaluate_tasks needs a tokenizer, or a config whose data.prepared_dir has one")
        from pangu.data.prepare import load_tokenizer

        tokenizer = load_tokenizer(config.data.prepared_dir)
    _check_vocabulary(model_or_engine, tokenizer, config)
    scorer = make_scorer(model_or_engine, tokenizer=tokenizer, config=config, topology=topology, batch_size=batch_size)
    prepared_dir = config.data.prepared_dir if config is not None else None
    loaded = [t if isinstance(t, Task) else load_task(t, prepared_dir=prepared_dir) for t in tasks]
    if shots is not None:
        loaded = [t.replace(shots=shots) if t.kind != "perplexity" else t for t in loaded]
    prompter = Prompter(tokenizer, scorer.seq_length, seed=seed)
    results: dict[str, dict] = {}
    for task in loaded:
        start = time.perf_counter()
        prepared = prompter.prepare(task, max_examples)
        if task.kind == "classification":
            result = _classification(prepared, scorer)
        elif task.kind == "generation":
            result = _generation(prepared, scorer, tokenizer, seed)
        else:
            result = _perplexity(prepared, scorer)
        if result is None:  # a rank other than 0 of an engine: the results are on rank 0
            continue
        result = {
            "kind": task.kind,
            **({"shots": task.shots} if task.kind != "perplexity" else {}),
            **result,
            "seconds": round(time.perf_counter() - start, 2),
        }
        if not details:
            result.pop("details", None)
        name = task.name if task.name not in results else f"{task.name}#{len(results)}"
        results[name] = result
        if log is not None:
            log(f"{name}: {summary_line(result)}")
    return results


def _check_vocabulary(model_or_engine, tokenizer, config) -> None:
    """A tokenizer of another vocabulary size than the network's cannot be its own (its ids would
    mean other pieces): refused (checkpoint/belonging.py), for a model or an engine."""
    from pangu.checkpoint.belonging import TrainedWith, UsedWith
    from pangu.parallel.engine import Engine

    if isinstance(model_or_engine, Engine):
        model = config.model
    else:
        model = getattr(model_or_engine, "config", None)  # a PanguAlpha; a Scorer has none
    if model is not None:
        TrainedWith("the model", model).check_tokenizer(UsedWith.of_tokenizer(tokenizer, "the tokenizer given"))


def span_score(losses: np.ndarray, start: int, end: int, reduce: str) -> float:
    """The loss of tokens [start, end) of a row from its per-token losses (losses[j] is token j+1's)."""
    values = np.asarray(losses[start - 1 : end - 1], dtype=np.float64)
    return float(values.sum() if reduce == "sum" else values.mean())


def _classification(prepared: Prepared, scorer) -> dict | None:
    task = prepared.task
    flat = [row for rows in prepared.rows for row in rows]
    losses = scorer.token_losses([row.ids for row in flat])
    if losses is None:
        return None
    records, correct, k = [], [], 0
    per_label: dict[str, list[int]] = {}
    for index, rows, gold, labels in zip(prepared.indices, prepared.rows, prepared.labels, prepared.candidates):
        scores = [span_score(losses[k + c], row.start, row.end, task.score_reduce) for c, row in enumerate(rows)]
        k += len(rows)
        prediction = int(np.argmin(scores))  # ties: the first candidate
        correct.append(prediction == gold)
        counts = per_label.setdefault(labels[gold], [0, 0])
        counts[0] += 1
        counts[1] += prediction == gold
        records.append(
            {
                "index": index,
                "label": labels[gold],
                "prediction": labels[prediction],
                "correct": prediction == gold,
                "scores": scores,
            }
        )
    majority = Counter(prepared.label_names).most_common(1)[0][1] / len(prepared.label_names)
    sizes = {len(rows) for rows in prepared.rows}
    result = accuracy_summary(correct)
    result.update(
        {
            "chance": 1 / sizes.pop() if len(sizes) == 1 else None,
            "majority": majority,
            "score": {"span": task.score_span, "reduce": task.score_reduce},
            "per_label": {label: {"examples": n, "correct": c} for label, (n, c) in sorted(per_label.items())},
            "details": records,
        }
    )
    return result


def _generation(prepared: Prepared, scorer, tokenizer, seed: int) -> dict | None:
    task = prepared.task

    def stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(s and s in text for s in task.stop)

    outputs = scorer.generate(prepared.prompts, task.max_new_tokens, stop)
    if outputs is None:
        return None
    records, ems, f1s = [], [], []
    for index, ids, references in zip(prepared.indices, outputs, prepared.labels):
        text = tokenizer.decode(ids)
        for s in task.stop:
            if s:
                text = text.split(s, 1)[0]
        text = text.strip()
        scores = cmrc_scores(text, references)
        ems.append(scores["em"])
        f1s.append(scores["f1"])
        records.append({"index": index, "prediction": text, "references": references, **scores})
    em_low, em_high = wilson_interval(int(sum(ems)), len(ems))
    return {
        "examples": len(records),
        "em": float(np.mean(ems)),
        "em_ci": [em_low, em_high],
        **mean_summary("f1", f1s, seed=seed),
        "ci": "Wilson 95% (em), bootstrap 95% (f1)",
        "details": records,
    }


def _perplexity(prepared: Prepared, scorer) -> dict | None:
    rows = prepared.rows[0]
    losses = scorer.token_losses([row.ids for row in rows])
    if losses is None:
        return None
    total = sum(float(np.sum(loss[row.start - 1 : row.end - 1], dtype=np.float64)) for row, loss in zip(rows, losses))
    tokens = sum(row.end - row.start for row in rows)
    return {
        "documents": prepared.documents,
        "tokens": tokens,
        "characters": prepared.characters,
        "windows": len(rows),
        "loss": total / tokens,
        "ppl": math.exp(min(total / tokens, 50.0)),
        "char_ppl": math.exp(min(total / max(prepared.characters, 1), 50.0)),
        "details": [
            {
                "window": i,
                "loss_sum": float(np.sum(loss[r.start - 1 : r.end - 1], dtype=np.float64)),
                "tokens": r.end - r.start,
            }
            for i, (r, loss) in enumerate(zip(rows, losses))
        ],
    }


def summary_line(result: dict) -> str:
    if result["kind"] == "classification":
        low, high = result["accuracy_ci"]
        return (
            f"accuracy {result['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, {result['examples']} examples, "
            f"{result['shots']}-shot, majority {result['majority']:.4f})"
        )
    if result["kind"] == "generation":
        return (
            f"EM {result['em']:.4f} F1 {result['f1']:.4f} (95% CI {result['f1_ci'][0]:.4f}-"
            f"{result['f1_ci'][1]:.4f}, {result['examples']} examples, {result['shots']}-shot)"
        )
    return (
        f"loss {result['loss']:.4f} ppl {result['ppl']:.2f} char ppl {result['char_ppl']:.2f} "
        f"({result['tokens']} tokens)"
    )


# ---------------------------------------------------------------------------------------------
# Building the pipeline engine for evaluation


def build_eval_engine(config, checkpoint_path, micro_batch_size: int | None = None):
    """(engine, config, topology): the training engine of `config`'s parallel layout, built as
    the trainer builds it, with the weights of `checkpoint_path` (any layout). The model section
    comes from the checkpoint; the micro-batch size (default train.micro_batch_size) sets the
    evaluation shapes."""
    import torch

    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.training import load_checkpoint
    from pangu.parallel.engine import build_engine
    from pangu.parallel.topology import init_distributed

    topology = init_distributed(config.parallel)
    torch.manual_seed(config.train.seed)
    path = fmt.resolve(checkpoint_path)
    manifest = fmt.read_manifest(path)
    mb = micro_batch_size or config.train.micro_batch_size
    config = dataclasses.replace(
        config,
        model=manifest.model,
        train=dataclasses.replace(config.train, micro_batch_size=mb, global_batch_size=mb * topology.dp),
    )
    config.validate()
    engine = build_engine(config, topology)
    load_checkpoint(path, engine, topology, config, weights_only=True)
    return engine, config, topology


def tokenizer_for(trained, config):
    """The tokenizer a checkpoint carries (checked against the one it was trained with), else the one
    of config's prepared data, once found to be the one its network was trained with (`trained`: the
    checkpoint's belonging.TrainedWith)."""
    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.belonging import UsedWith
    from pangu.data.prepare import load_tokenizer
    from pangu.data.tokenizer import TOKENIZER_FILE, PanguTokenizer

    path = trained.checkpoint
    carried = fmt.read_tokenizer(path, fmt.read_manifest(path))
    if carried is not None:
        tokenizer, name = PanguTokenizer(carried, str(path / TOKENIZER_FILE)), f"the tokenizer {path} carries"
    else:
        prepared_dir = config.data.prepared_dir
        tokenizer, name = load_tokenizer(prepared_dir), f"the tokenizer of data.prepared_dir = {prepared_dir!r}"
    trained.check_tokenizer(UsedWith.of_tokenizer(tokenizer, name))
    return tokenizer
