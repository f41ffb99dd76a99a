"""Tasks turned into work for a scorer: `Prompter.prepare(task)` encodes every example (with
its seeded shots) into the rows to score (classification candidates, perplexity windows) or the
prompts to continue (generation), as a `Prepared`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pangu.evaluation.tasks import (
    Task,
    TaskError,
    example_key,
    fill,
    label_of,
    read_examples,
    references_of,
    sample_shots,
)


@dataclass
class Row:
    """Token ids; the tokens at positions [start, end) are scored (each predicted from the ones
    before it, so start >= 1)."""

    ids: list[int]
    start: int
    end: int


@dataclass
class Prepared:
    """A task turned into work: examples, their gold answers, and the rows / prompts to run."""

    task: Task
    indices: list[int]  # which examples of the data file
    labels: list[Any] = field(default_factory=list)  # classification: gold candidate index; generation: references
    label_names: list[str] = field(default_factory=list)
    candidates: list[list[str]] = field(default_factory=list)  # classification: candidate labels per example
    rows: list[list[Row]] = field(default_factory=list)  # classification: one row per candidate; perplexity: windows
    prompts: list[list[int]] = field(default_factory=list)  # generation
    shots: list[list[int]] = field(default_factory=list)
    characters: int = 0
    documents: int = 0


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Prompter:
    """Builds the rows and prompts of a task with a tokenizer, PanGu's way: the whole filled text
    is encoded at once (jieba segments across the template's seams exactly as in training), and the
    spans are found by encoding the text up to each boundary and taking the longest common prefix
    of token ids; where a token straddles a boundary it is counted in the candidate's span."""

    def __init__(self, tokenizer, seq_length: int, seed: int = 1234):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.seed = seed
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tokenizer.encode(text) if text else []
            if len(self._cache) > 100_000:
                self._cache.clear()
        return ids

    def prepare(self, task: Task, max_examples: int | None = None) -> Prepared:
        examples = read_examples(task.data, task)
        if task.kind == "perplexity":
            return self._perplexity(task, examples)
        skipping = task.kind == "classification" and task.skip_labels
        keep = [i for i, e in enumerate(examples) if not (skipping and label_of(e, task, i) in task.skip_labels)]
        limit = max_examples if max_examples is not None else task.max_examples
        if limit and limit < len(keep):
            chosen = np.random.default_rng([self.seed, 7]).choice(len(keep), size=limit, replace=False)
            keep = [keep[i] for i in sorted(chosen)]
        if not keep:
            raise TaskError(f"task {task.name!r}: {task.data} holds no examples")
        pool = read_examples(task.shots_from, task) if task.shots_from else examples
        same_pool = task.shots_from is None
        pool_keys: dict[str, list[int]] = {}
        unusable: list[int] = []  # demonstrations need a gold label among the candidates
        if task.shots:
            for j, example in enumerate(pool):
                pool_keys.setdefault(example_key(example), []).append(j)
            if task.kind == "classification" and task.skip_labels:
                unusable = [j for j, e in enumerate(pool) if str(e.get(task.label_field)) in task.skip_labels]
        prepared = Prepared(task, keep)
        label_set = self._label_set(task, examples)
        for i in keep:
            example = examples[i]
            excluded = pool_keys.get(example_key(example), []) + ([i] if same_pool else []) + unusable
            shots = sample_shots(len(pool), task.shots, i, self.seed, excluded)
            prepared.shots.append(shots)
            demos = [self._demo(task, pool[j], j, label_set) for j in shots]
            context = task.instruction + "".join(demo + task.shot_separator for demo in demos)
            if task.kind == "classification":
                self._classification(task, example, i, context, label_set, prepared)
            else:
                head, _ = fill(task.template, example, task, i)
                ids = self._with_eod(task, self.encode(context + head))
                # the prompt keeps its end; it leaves room for max_new_tokens, but takes at least
                # half of the model's window (generation stops at the window's end)
                room = self.seq_length - min(task.max_new_tokens, self.seq_length // 2)
                prepared.prompts.append(ids[-room:])
                prepared.labels.append(references_of(example, task, i))
        return prepared

    def _with_eod(self, task: Task, ids: list[int]) -> list[int]:
        return [self.tokenizer.eod_id] + ids if task.prepend_eod else list(ids)

    def _label_set(self, task: Task, examples: list[dict]) -> dict[str, str] | None:
        if task.kind != "classification" or task.candidates_field:
            return None
        if task.candidates_from_data:
            values = sorted({label_of(e, task, i) for i, e in enumerate(examples)} - set(task.skip_labels))
            return {v: v for v in values}
        return task.candidates

    def _candidates(
        self, task: Task, example: dict, index: int, label_set: dict[str, str] | None
    ) -> tuple[list[str], list[str], int]:
        """(labels, texts, gold position) of an example's candidates."""
        if label_set is not None:
            labels, texts = list(label_set), list(label_set.values())
            gold = label_of(example, task, index)
            if gold not in label_set:
                raise TaskError(
                    f"task {task.name!r}: example {index} has label {gold!r}, not one of the "
                    f"candidates {labels} (leave such examples out with skip_labels)"
                )
            return labels, texts, labels.index(gold)
        texts = example.get(task.candidates_field)
        if not isinstance(texts, list) or len(texts) < 2:
            raise TaskError(
                f"task {task.name!r}: example {index}: {task.candidates_field!r} must list at "
                f"least two candidate texts, got {texts!r}"
            )
        texts = [str(t) for t in texts]
        gold = example.get(task.label_field)
        if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(texts):
            position = gold
        elif str(gold) in texts:
            position = texts.index(str(gold))
        else:
            raise TaskError(
                f"task {task.name!r}: example {index}: label {gold!r} is neither an index into "
                f"nor one of its candidates {texts}"
            )
        return texts, texts, position

    def _demo(self, task: Task, example: dict, index: int, label_set: dict[str, str] | None) -> str:
        if task.kind == "classification":
            _, texts, gold = self._candidates(task, example, index, label_set)
            head, tail = fill(task.template, example, task, index)
            return head + texts[gold] + tail
        head, _ = fill(task.template, example, task, index)
        return head + references_of(example, task, index)[0]

    def _classification(
        self, task: Task, example: dict, index: int, context: str, label_set: dict[str, str] | None, prepared: Prepared
    ) -> None:
        labels, texts, gold = self._candidates(task, example, index, label_set)
        head, tail = fill(task.template, example, task, index)
        head_ids = self.encode(context + head)
        context_ids = self.encode(context)
        rows = []
        for text in texts:
            whole = self.encode(context + head + text + tail)
            upto = self.encode(context + head + text)
            start = _lcp(head_ids, whole)
            common = _lcp(upto, whole)
            end = common if common == len(upto) else common + 1  # a token straddling the seam belongs to it
            end = max(end, start + 1)
            begin = min(_lcp(context_ids, whole), start)  # where the example starts, after the shots
            shift = 1 if task.prepend_eod else 0
            ids = self._with_eod(task, whole)
            span = {"candidate": (start, end), "candidate_to_end": (start, len(whole)), "example": (begin, len(whole))}[
                task.score_span
            ]
            rows.append(Row(ids, span[0] + shift, span[1] + shift))
        self._truncate(task, index, rows)
        prepared.rows.append(rows)
        prepared.labels.append(gold)
        prepared.label_names.append(labels[gold])
        prepared.candidates.append(labels)

    def _truncate(self, task: Task, index: int, rows: list[Row]) -> None:
        """Cuts the same number of tokens off the left of every candidate's row so that the longest
        fits (seq_length + 1 tokens: seq_length inputs, the last one only a target)."""
        cut = max(len(r.ids) for r in rows) - (self.seq_length + 1)
        if cut <= 0:
            for r in rows:
                r.start = max(r.start, 1)
            return
        for r in rows:
            r.ids = r.ids[cut:]
            start, r.end = r.start - cut, r.end - cut
            # the whole example may lose its beginning (long texts); a candidate span must fit whole
            if r.end <= max(start, 1) or (start < 1 and task.score_span != "example"):
                raise TaskError(
                    f"task {task.name!r}: example {index}: the scored span ({task.score_span}) does "
                    f"not fit into the model's {self.seq_length} tokens; use fewer shots or a shorter "
                    f"template"
                )
            r.start = max(start, 1)

    def _perplexity(self, task: Task, examples: list[dict]) -> Prepared:
        prepared = Prepared(task, list(range(len(examples))))
        stream = [self.tokenizer.eod_id] if task.prepend_eod else []
        for i, example in enumerate(examples):
            if task.text_field not in example:
                raise TaskError(f"task {task.name!r}: document {i} has no field {task.text_field!r}")
            text = str(example[task.text_field])
            stream += self.tokenizer.encode(text) + [self.tokenizer.eod_id]
            prepared.characters += len(text)
        prepared.documents = len(examples)
        if len(stream) < 2:
            raise TaskError(f"task {task.name!r}: {task.data} holds no text")
        window, stride = self.seq_length + 1, task.stride or self.seq_length
        if stride > self.seq_length:
            raise TaskError(
                f"task {task.name!r}: stride = {stride} is not allowed: expected at most the "
                f"sequence length {self.seq_length}"
            )
        rows, scored_until, begin = [], 1, 0
        while scored_until < len(stream):
            end = min(begin + window, len(stream))
            rows.append(Row(stream[begin:end], scored_until - begin, end - begin))
            scored_until, begin = end, begin + stride
        prepared.rows = [rows]
        return prepared
