"""Task definitions: small YAML/JSON files naming a local data file, a prompt template, the
candidates or references, the number of shots and how to score.

    name: sentiment
    kind: classification            # classification | generation | perplexity
    data: builtin:heldout_reviews     # the builtin corpus's held-out reviews (pangu/data/builtin.py)
    template: "评论：{text}\\n这是一条{candidate}评。"
    candidates: {positive: 好, negative: 差}   # label value -> the words filled in for {candidate}
    label: label                    # the field holding the gold label
    shots: 0
    score: {span: candidate, reduce: mean}

Every key is checked on load; errors name the task file, the key and what is allowed. Data
paths are relative to the task file; `${prepared_dir}` is the config's data.prepared_dir and
other `${VAR}`s are environment variables; `builtin:heldout_reviews` is the builtin corpus's
held-out reviews, asked of the builtin source. `--task NAME=PATH` replaces the data file.

This module also turns a task and a tokenizer into scoring requests (token rows with the span to
score) and generation prompts; pangu/evaluation/harness.py runs them through a scorer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from pangu.schema import ConfigError, from_dict

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"  # pangu/tasks: the builtin task definitions
KINDS = ("classification", "generation", "perplexity")
SPANS = ("candidate", "candidate_to_end", "example")
REDUCES = ("mean", "sum")
# the headline metrics of each kind (the result keys that training logs as task/NAME/METRIC)
METRICS = {"classification": ["accuracy"], "generation": ["em", "f1"], "perplexity": ["ppl"]}
_FIELD = re.compile(r"\{(\w+)\}")


class TaskError(ConfigError):
    """A task definition or its data is unusable; the message names the file and the field."""


@dataclass
class Task:
    name: str
    kind: str
    data: Path
    template: str = ""
    instruction: str = ""  # text before the shots and the example
    # classification
    candidates: dict[str, str] | None = None  # label value -> text filled in for {candidate}
    candidates_from_data: bool = False  # candidates = the distinct label values of the data file
    candidates_field: str = ""  # or: each example lists its own candidate texts in this field
    label_field: str = "label"
    skip_labels: list[str] = field(default_factory=list)  # examples with these labels are left out
    score_span: str = "candidate"  # candidate | candidate_to_end | example
    score_reduce: str = "mean"  # mean | sum of the token losses over the span
    # generation
    references_field: str = "answers"
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    # perplexity
    text_field: str = "text"
    stride: int = 0  # window step in tokens; 0 = the model's sequence length (no overlap)
    # all kinds
    shots: int = 0
    shots_from: Path | None = None  # the pool of demonstrations; default: the data file itself
    shot_separator: str = "\n"
    prepend_eod: bool = True  # start every row with the document separator, as in the packed stream
    max_examples: int = 0  # 0 = all; else a seeded random subset of this size
    metrics: list[str] = field(default_factory=list)  # headline metrics; default: all of METRICS[kind]
    source: str = "<memory>"

    @property
    def headline(self) -> list[str]:
        return self.metrics or METRICS[self.kind]

    def replace(self, **changes: Any) -> Task:
        task = dataclasses.replace(self, **changes)
        task.validate()
        return task

    def validate(self) -> None:
        where = f"task {self.name!r} ({self.source})"
        _check(self.kind in KINDS, where, "kind", self.kind, f"one of {list(KINDS)}")
        _check(self.shots >= 0, where, "shots", self.shots, ">= 0")
        _check(self.max_examples >= 0, where, "max_examples", self.max_examples, ">= 0")
        _check(
            set(self.metrics) <= set(METRICS.get(self.kind, [])),
            where,
            "metric",
            self.metrics,
            f"a subset of {METRICS.get(self.kind)} for kind {self.kind!r}",
        )
        if self.kind == "classification":
            fields = _FIELD.findall(self.template)
            _check(
                fields.count("candidate") == 1,
                where,
                "template",
                self.template,
                "a template with exactly one {candidate}",
            )
            ways = [self.candidates is not None, self.candidates_from_data, bool(self.candidates_field)]
            _check(
                sum(ways) == 1,
                where,
                "candidates",
                self.candidates,
                "a mapping {label: text}, a list of label texts, 'from_data', or candidates_field",
            )
            if self.candidates is not None:
                _check(
                    len(self.candidates) >= 2 and all(isinstance(v, str) and v for v in self.candidates.values()),
                    where,
                    "candidates",
                    self.candidates,
                    "at least two non-empty candidate texts",
                )
            _check(self.score_span in SPANS, where, "score.span", self.score_span, f"one of {list(SPANS)}")
            _check(self.score_reduce in REDUCES, where, "score.reduce", self.score_reduce, f"one of {list(REDUCES)}")
        elif self.kind == "generation":
            _check(
                "candidate" not in _FIELD.findall(self.template),
                where,
                "template",
                self.template,
                "a prompt without {candidate} (the answer is generated after it)",
            )
            _check(self.max_new_tokens >= 1, where, "generation.max_new_tokens", self.max_new_tokens, ">= 1")
        else:
            _check(self.stride >= 0, where, "stride", self.stride, ">= 0")
            _check(self.shots == 0, where, "shots", self.shots, "0 for a perplexity task")


# ---------------------------------------------------------------------------------------------
# Loading task files


@dataclass
class ScoreSpec:
    span: Literal["candidate", "candidate_to_end", "example"] = "candidate"
    reduce: Literal["mean", "sum"] = "mean"


@dataclass
class GenerationSpec:
    max_new_tokens: int = 32
    stop: list[str] | str = field(default_factory=lambda: ["\n"])


@dataclass
class TaskFile:
    """What a task file (tasks/*.yaml, .json) may hold, read by the strict typed loader of configs
    (unknown keys and wrong types fail naming the key); `task_from_dict` turns it into a `Task`."""

    name: str
    kind: Literal["classification", "generation", "perplexity"]
    data: str = ""  # required unless given as --task NAME=DATA
    description: str = ""
    template: str = ""
    instruction: str = ""
    candidates: dict[str, str] | list[str] | Literal["from_data"] | None = None
    candidates_field: str = ""
    label: str = "label"
    skip_labels: list[str] = field(default_factory=list)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    references: str = "answers"
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    text_field: str = "text"
    stride: int = 0
    shots: int = 0
    shots_from: str = ""
    shot_separator: str = "\n"
    prepend_eod: bool = True
    max_examples: int = 0
    metric: list[str] | str = field(default_factory=list)


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) if TASKS_DIR.is_dir() else []


def resolve_task_file(name: str) -> Path:
    """A task file path, or the name of a builtin definition in pangu/tasks/."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path
    builtin = TASKS_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    raise TaskError(
        f"task {name!r}: no such task file and no builtin task of that name (builtin: "
        f"{', '.join(available_tasks()) or 'none'}); pass a .yaml/.json task file"
    )


def load_task(spec: str | Path, *, prepared_dir: str | Path | None = None, **changes: Any) -> Task:
    """Load `spec`: a task file, a builtin task name, or `NAME_OR_FILE=DATA_FILE` (another data
    file for the same definition). `changes` override fields (e.g. shots=5)."""
    spec = str(spec)
    data_override = None
    if "=" in spec:
        spec, data_override = spec.split("=", 1)
    path = resolve_task_file(spec)
    text = _read_text(path, "task file ")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise TaskError(f"task file {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(raw, dict):
        raise TaskError(f"task file {str(path)!r} must hold a mapping, got {type(raw).__name__}")
    task = task_from_dict(
        raw, source=str(path), base_dir=path.parent, prepared_dir=prepared_dir, data_override=data_override
    )
    return task.replace(**changes) if changes else task


def task_from_dict(
    raw: dict,
    *,
    source: str = "<memory>",
    base_dir: str | Path = ".",
    prepared_dir: str | Path | None = None,
    data_override: str | None = None,
) -> Task:
    where = f"task file {source!r}"
    try:
        spec = from_dict(TaskFile, _keys_as_text(raw), "", "the task file")
    except ConfigError as err:
        raise TaskError(f"{where}: {err}") from None
    if not spec.data and data_override is None:
        raise TaskError(f"{where}: missing 'data' (a .jsonl/.json/.txt file)")
    base_dir = Path(base_dir)
    data = (
        _path(data_override, Path("."), prepared_dir, where, "data")
        if data_override is not None
        else _path(spec.data, base_dir, prepared_dir, where, "data")
    )
    candidates = spec.candidates
    task = Task(
        name=spec.name,
        kind=spec.kind,
        data=data,
        source=source,
        template=spec.template,
        instruction=spec.instruction,
        candidates=dict(zip(candidates, candidates))
        if isinstance(candidates, list)
        else (candidates if isinstance(candidates, dict) else None),
        candidates_from_data=candidates == "from_data",
        candidates_field=spec.candidates_field,
        label_field=spec.label,
        skip_labels=spec.skip_labels,
        score_span=spec.score.span,
        score_reduce=spec.score.reduce,
        references_field=spec.references,
        max_new_tokens=spec.generation.max_new_tokens,
        stop=_as_list(spec.generation.stop),
        text_field=spec.text_field,
        stride=spec.stride,
        shots=spec.shots,
        shots_from=_path(spec.shots_from, base_dir, prepared_dir, where, "shots_from") if spec.shots_from else None,
        shot_separator=spec.shot_separator,
        prepend_eod=spec.prepend_eod,
        max_examples=spec.max_examples,
        metrics=_as_list(spec.metric),
    )
    task.validate()
    return task


def _keys_as_text(raw: dict) -> dict:
    """YAML reads `0: 负面` with an integer key; labels are text."""
    candidates = raw.get("candidates")
    if isinstance(candidates, dict):
        raw = {**raw, "candidates": {str(k): v for k, v in candidates.items()}}
    if isinstance(raw.get("skip_labels"), list):
        raw = {**raw, "skip_labels": [str(v) for v in raw["skip_labels"]]}
    return raw


def _as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check(ok: bool, where: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise TaskError(f"{where}: {key} = {value!r} is not allowed: expected {allowed}")


BUILTIN_HELDOUT_REVIEWS = "builtin:heldout_reviews"


def _path(value: Any, base_dir: Path, prepared_dir: str | Path | None, where: str, key: str) -> Path:
    text = str(value)
    if text == BUILTIN_HELDOUT_REVIEWS:
        return Path(text)
    if "${prepared_dir}" in text:
        if prepared_dir is None:
            raise TaskError(f"{where}: {key} = {text!r} needs the config's data.prepared_dir: pass --config")
        text = text.replace("${prepared_dir}", str(Path(prepared_dir).resolve()))  # relative to the cwd, as in configs
    expanded = os.path.expanduser(os.path.expandvars(text))
    missing = re.findall(r"\$\{?(\w+)\}?", expanded)
    if missing:
        raise TaskError(
            f"{where}: {key} = {text!r}: environment variable(s) {missing} not set; set them "
            f"or pass the data file as --task NAME=PATH"
        )
    path = Path(expanded)
    return path if path.is_absolute() else base_dir / path


# ---------------------------------------------------------------------------------------------
# Data


def read_examples(path: Path, task: Task | None = None) -> list[dict]:
    """Examples of a data file: .jsonl (one object a line; also CLUE's .json files, which are JSON
    lines), .json (a list, or SQuAD/CMRC2018 {"data": [{"paragraphs": [{"context", "qas"}]}]},
    flattened to {"id", "context", "question", "answers"}), or .txt (one document a line, as
    {"text": line})."""
    where = f"task {task.name!r}: " if task else ""
    if str(path) == BUILTIN_HELDOUT_REVIEWS:
        from pangu.data.builtin import heldout_reviews

        return [{"text": review.text, "label": review.label} for review in heldout_reviews()]
    if not path.is_file():
        raise TaskError(f"{where}data file {str(path)!r} does not exist")
    text = _read_text(path, f"{where}data file ")
    if path.suffix == ".txt":
        field_name = task.text_field if task else "text"
        return [{field_name: line} for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None  # CLUE ships JSON lines under .json
        if isinstance(value, dict) and "data" in value:
            return _flatten_squad(value["data"], path)
        if isinstance(value, list):
            return _objects(value, path, where)
        if isinstance(value, dict):
            raise TaskError(
                f"{where}{path}: a JSON object without 'data'; expected a list of examples, "
                f"SQuAD/CMRC2018 format or JSON lines"
            )
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                examples.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TaskError(f"{where}{path}:{number}: not a JSON object ({err.msg})") from None
    return _objects(examples, path, where)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(f"{what}{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _objects(examples: list, path: Path, where: str) -> list[dict]:
    """The examples, each checked to be a JSON object."""
    for number, example in enumerate(examples, 1):
        if not isinstance(example, dict):
            raise TaskError(f"{where}{path}: example {number} is a {type(example).__name__}, not a JSON object")
    return examples


def _flatten_squad(articles: list, path: Path) -> list[dict]:
    out = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [a["text"] if isinstance(a, dict) else str(a) for a in qa.get("answers", [])]
                out.append(
                    {
                        "id": qa.get("id", str(len(out))),
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": answers,
                    }
                )
    if not out:
        raise TaskError(f"{path}: SQuAD/CMRC2018 file without questions")
    return out


def fill(template: str, example: dict, task: Task, index: int, candidate: str | None = None) -> tuple[str, str]:
    """(text before {candidate}, text after it) of the template filled with the example's fields
    (everything in the first part when there is no {candidate})."""

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key not in example:
            raise TaskError(
                f"task {task.name!r} ({task.source}): example {index} of {task.data} has no field "
                f"{key!r} used in the template (fields: {sorted(example)})"
            )
        return str(example[key])

    head, found, tail = template.partition("{candidate}")
    return _FIELD.sub(value, head), _FIELD.sub(value, tail) if found else ""


def references_of(example: dict, task: Task, index: int) -> list[str]:
    if task.references_field not in example:
        raise TaskError(
            f"task {task.name!r}: example {index} has no references field "
            f"{task.references_field!r} (fields: {sorted(example)})"
        )
    value = example[task.references_field]
    values = value if isinstance(value, list) else [value]
    out = [v["text"] if isinstance(v, dict) else str(v) for v in values]
    if not out:
        raise TaskError(f"task {task.name!r}: example {index} has no reference answer")
    return out


def label_of(example: dict, task: Task, index: int) -> str:
    if task.label_field not in example:
        raise TaskError(
            f"task {task.name!r}: example {index} has no label field {task.label_field!r} (fields: {sorted(example)})"
        )
    return str(example[task.label_field])


def sample_shots(pool_size: int, shots: int, index: int, seed: int, excluded: Sequence[int] = ()) -> list[int]:
    """Indices of `shots` demonstrations for example `index`: a permutation of the pool drawn from a
    generator seeded by (seed, index), minus `excluded` (the example itself and its duplicates).
    The same (seed, index) always gives the same shots, whatever else is evaluated."""
    if shots == 0:
        return []
    excluded = set(excluded)
    order = np.random.default_rng([seed, index]).permutation(pool_size)
    picked: list[int] = []
    for i in order.tolist():
        if i not in excluded:
            picked.append(i)
            if len(picked) == shots:
                break
    if len(picked) < shots:
        raise TaskError(f"{shots} shots asked for, but the pool has only {len(picked)} other examples")
    return picked


def example_key(example: dict) -> str:
    return json.dumps(example, sort_keys=True, ensure_ascii=False)
