"""Scores of generated answers against reference answers: exact match, token F1 and ANLS.

Three views of "is the answer right", from strict to lenient. Exact match and token F1 compare
answers after `normalize_answer` (case, spacing and a final full stop do not make an answer wrong:
"Red." is "red"); F1 gives partial credit for the right words in another order or with extra words
(SQuAD's bag-of-tokens F1). ANLS (DocVQA's Average Normalized Levenshtein Similarity) gives partial
credit for near-miss spellings, and none once the answer is more than `threshold` different, so a
long wrong answer cannot collect credit from shared letters.

Pure Python: the Levenshtein distance is written here (a dozen lines) because no maintained
edit-distance package is among the project's dependencies, and answers are short.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_FINAL_PUNCTUATION = re.compile(r"[.!?,;:]+$")
METRICS = ("exact_match", "f1", "anls")


def normalize_answer(s: str) -> str:
    """Lower case, whitespace collapsed and stripped, final punctuation (. ! ? , ; : repeated) dropped."""
    s = " ".join(s.lower().split())
    return _FINAL_PUNCTUATION.sub("", s).rstrip()


def _references(references: str | Iterable[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    return refs or [""]


def exact_match(prediction: str, reference: str | list[str]) -> float:
    """1.0 when the normalised prediction equals the normalised reference (any of them), else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _references(reference)))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1.0; one empty: 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str | list[str]) -> float:
    """SQuAD-style F1 of the normalised, whitespace-split tokens (best over references when several)."""
    return max(_f1(prediction, r) for r in _references(reference))


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute one character) that turn `a` into `b`; two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: str | list[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS of one answer: max over references of 1 - NL, where NL is the Levenshtein distance
    over the longer length of the lower-cased, whitespace-collapsed strings, and 0 when NL >= threshold.
    Both strings empty counts as a perfect match (1.0)."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in _references(references):
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        nl = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _mean_scores(rows: list[dict]) -> dict:
    n = len(rows)
    sums = dict.fromkeys(METRICS, 0.0)
    for row in rows:
        sums["exact_match"] += exact_match(row["prediction"], row["reference"])
        sums["f1"] += token_f1(row["prediction"], row["reference"])
        sums["anls"] += anls(row["prediction"], row["reference"])
    return {"count": n, **{k: (v / n if n else 0.0) for k, v in sums.items()}}


def score(rows: list[dict]) -> dict:
    """Means of every metric over `rows` ({dataset, prediction, reference}), overall and per data set:
    {"overall": {"count", "exact_match", "f1", "anls"}, "datasets": {name: {same keys}}}."""
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)
    return {"overall": _mean_scores(rows),
            "datasets": {name: _mean_scores(group) for name, group in sorted(by_dataset.items())}}
