"""Answer normalization and accuracy, in the spirit of the VQA evaluation script.

``normalize_answer`` lowercases, drops punctuation (keeping decimal points and joining thousands separators),
removes the articles a/an/the and maps number words to digits, so "Two." and "2" and "the red" and "Red!"
compare equal. ``exact_match`` compares normalized strings; ``vqa_accuracy`` is the usual min(1, matches/3)
over several human answers; ``accuracy_report`` gives overall and per-category accuracy.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InputError

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBERS["none"] = "0"  # as the VQA evaluation does
_ARTICLES = {"a", "an", "the"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point
_PUNCT = re.compile(r"[^\w\s.]|_")


def normalize_answer(s: str) -> str:
    """Canonical form of an answer: ``"  The TWO dogs!"`` → ``"2 dogs"``, ``"1,000."`` → ``"1000"``."""
    s = str(s).lower().strip()
    s = _THOUSANDS.sub("", s).replace("'", "").replace("\u2019", "")
    s = _PUNCT.sub(" ", _PERIOD.sub(" ", s))
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, gold: str | Sequence[str]) -> bool:
    """True when the normalized prediction equals the (or any of the) normalized gold answer(s)."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    p = normalize_answer(pred)
    return any(p == normalize_answer(g) for g in golds)


def vqa_accuracy(pred: str, gold_answers: Sequence[str]) -> float:
    """VQA accuracy: min(1, #human answers equal to the prediction / 3)."""
    if isinstance(gold_answers, str) or not gold_answers:
        raise InputError("vqa_accuracy needs a non-empty list of human answers; pass exact_match for a single one")
    p = normalize_answer(pred)
    return min(1.0, sum(p == normalize_answer(g) for g in gold_answers) / 3)


def accuracy_report(preds: Sequence[str], golds: Sequence[str | Sequence[str]],
                    categories: Sequence[str | None] | None = None) -> dict:
    """Exact-match accuracy overall and per category.

    Returns ``{"overall": float, "n": int, "correct": int,
    "per_category": {category: {"accuracy": float, "n": int, "correct": int}}}``; samples whose category is
    None count only in the overall figure.
    """
    if len(preds) != len(golds):
        raise InputError(f"accuracy_report got {len(preds)} predictions but {len(golds)} gold answers; "
                         "pass one prediction per sample")
    if categories is not None and len(categories) != len(golds):
        raise InputError(f"accuracy_report got {len(categories)} categories for {len(golds)} samples; "
                         "pass one category (or None) per sample")
    if not golds:
        raise InputError("accuracy_report got no samples; evaluate at least one sample")
    hits = [exact_match(p, g) for p, g in zip(preds, golds)]
    per: dict[str, dict] = {}
    for hit, cat in zip(hits, categories or [None] * len(hits)):
        if cat is None:
            continue
        d = per.setdefault(cat, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += hit
    for d in per.values():
        d["accuracy"] = d["correct"] / d["n"]
    return {"overall": sum(hits) / len(hits), "n": len(hits), "correct": sum(hits),
            "per_category": dict(sorted(per.items()))}
