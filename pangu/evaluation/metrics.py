"""Metrics of the evaluation harness: CMRC2018-style exact match and F1, accuracy with confidence
intervals.

EM and F1 follow the official CMRC2018 evaluation script (`cmrc2018_evaluate.py`):

- text is lower-cased and stripped;
- *mixed segmentation*: every Chinese character (U+4E00..U+9FA5, the script's range) is a
  segment of its own; the runs of other characters between them are split further (the script
  uses nltk's word tokenizer; here: on whitespace and punctuation);
- punctuation is dropped: the script's list of special characters (``-:_*^/\\~`+=`` and the
  Chinese ones ``，。：？！“”；’《》……·、「」（）－～『』``), and, since it splits ASCII punctuation
  off as separate tokens that then take part in the match, every other Unicode punctuation
  character too (a deliberate simplification: a stray "," or "." never counts), except a "." or
  "," between two digits ("2.6", "1,000" stay one number, as nltk keeps them);
- F1 of one (prediction, reference) pair is computed on the *longest common substring* of the two
  segment lists (not the bag of tokens as in SQuAD): precision = lcs / len(prediction),
  recall = lcs / len(reference); no common segment gives 0 (as in the script, also when both
  are empty);
- EM: the punctuation-free strings are equal;
- an example's score is the maximum over its references; a task's is the mean over examples
  (reported in [0, 1]; the official script prints percentages).
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections.abc import Sequence

import numpy as np

# the official script's special characters (sp_char); "……" is two "…", each removed
CMRC_SPECIAL_CHARACTERS = frozenset("-:_*^/\\~`+=，。：？！“”；’《》…·、「」（）－～『』")
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def is_punctuation(char: str) -> bool:
    return (
        char in CMRC_SPECIAL_CHARACTERS
        or unicodedata.category(char).startswith("P")
        or (char.isascii() and not char.isalnum() and not char.isspace())
    )


def _dropped(text: str, i: int) -> bool:
    """Is text[i] punctuation to drop? A '.' or ',' between two digits is part of a number
    ("2.6", "1,000"), as nltk's tokenizer keeps it."""
    char = text[i]
    if char in ".," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
        return False
    return is_punctuation(char)


def mixed_segmentation(text: str) -> list[str]:
    """CMRC2018 mixed segmentation with punctuation removed: one segment per Chinese character,
    other runs split on whitespace and punctuation. 'PanGu-α模型2.6B版，v1' ->
    ['pangu', 'α', '模', '型', '2.6b', '版', 'v1']."""
    text = str(text).lower().strip()
    segments: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            segments.append("".join(run))
            run.clear()

    for i, char in enumerate(text):
        if _CJK.match(char):
            flush()
            segments.append(char)
        elif char.isspace() or _dropped(text, i):
            flush()
        else:
            run.append(char)
    flush()
    return segments


def remove_punctuation(text: str) -> str:
    """Lower-cased, stripped, without punctuation (the EM normalisation; inner spaces stay, as in
    the official script)."""
    text = str(text).lower().strip()
    return "".join(char for i, char in enumerate(text) if not _dropped(text, i))


def longest_common_substring(a: Sequence, b: Sequence) -> int:
    """Length of the longest contiguous run shared by the two sequences (dynamic programming,
    as the official script's find_lcs)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def f1_score(prediction: str, reference: str) -> float:
    pred, ref = mixed_segmentation(prediction), mixed_segmentation(reference)
    common = longest_common_substring(ref, pred)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(remove_punctuation(prediction) == remove_punctuation(reference))


def max_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("an example needs at least one reference answer")
    return max(metric(prediction, reference) for reference in references)


def cmrc_scores(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """{"em", "f1"} of one prediction, each the maximum over the references."""
    return {
        "em": max_over_references(exact_match, prediction, references),
        "f1": max_over_references(f1_score, prediction, references),
    }


# ---------------------------------------------------------------------------------------------
# Confidence intervals


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good at small n and near 0 or 1)."""
    if n <= 0:
        return (0.0, 1.0)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return (low, high)


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded: the same values give the same interval)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))


def accuracy_summary(correct: Sequence[bool], confidence: float = 0.95) -> dict:
    n, k = len(correct), int(sum(bool(c) for c in correct))
    low, high = wilson_interval(k, n, confidence)
    return {
        "accuracy": k / n if n else float("nan"),
        "correct": k,
        "examples": n,
        "accuracy_ci": [low, high],
        "ci": f"Wilson {confidence:.0%}",
    }


def mean_summary(name: str, values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> dict:
    low, high = bootstrap_interval(values, confidence, seed=seed)
    return {name: float(np.mean(values)) if len(values) else float("nan"), f"{name}_ci": [low, high]}
