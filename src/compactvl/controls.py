"""The question-only control of a comparison: what its test sets reward without looking at the image.

A model that never sees the image can score far above chance when a test set's wording gives its answer away (on
easy-vqa, "is there a circle ...?" is mostly "yes" or "no" by its words alone). The control answers each test
question with the answer that the same question text has most often in the training data the systems trained on
(ties: the alphabetically first), and a question never seen in training with the training data's most common
answer. No image and no model are involved. It is scored on exactly the items a system was scored on, so that each
system is paired with it item by item (:func:`compactvl.evaluate.compare_results`): a system that does not beat it
outside the noise has not shown, on that set, that it uses the image.

``compactvl demo --compare`` reports it beside every system (docs/results/systems/README.md has what it showed).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from .data import accuracy_report, exact_match, question_answers
from .errors import InputError
from .evaluate import EvalResult
from .stats import wilson_interval
from .train import build_train_data

QUESTION_ONLY = "question-only (no image)"  # its name in tables and charts


@dataclass(frozen=True)
class QuestionPrior:
    """Question text -> its most common training answer, and the most common training answer (``fallback``)."""

    table: dict[str, str]
    fallback: str
    pairs: int  # the training (question, answer) pairs it was fitted on

    def answer(self, question: str) -> str:
        return self.table.get(question, self.fallback)

    def seen(self, questions: Iterable[str]) -> int:
        """How many of ``questions`` appear word for word in the training data."""
        return sum(q in self.table for q in questions)


def _most_common(counts: Counter) -> str:
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def fit_question_prior(pairs: Iterable[tuple[str, str | None]]) -> QuestionPrior:
    """The prior of (question, answer) pairs; pairs without a text answer (a multi-turn record) are left out."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    for question, answer in pairs:
        if isinstance(answer, str) and answer.strip():
            by_question[question][answer] += 1
    if not by_question:
        raise InputError("the training data has no question with a text answer, so a question-only control has "
                         "nothing to learn from; it needs question-answer training data (synthvqa, easy-vqa or a "
                         "LLaVA file whose records end with an answer)")
    overall = sum(by_question.values(), Counter())
    return QuestionPrior({q: _most_common(c) for q, c in by_question.items()}, _most_common(overall),
                         sum(overall.values()))


_PRIORS: dict[str, QuestionPrior] = {}  # one per training data in this process: a comparison writes its report often


def question_prior(train_specs: Sequence[dict]) -> QuestionPrior:
    """The prior of the training data that resolved ``data.train`` entries name (read without any image)."""
    key = json.dumps(list(train_specs), sort_keys=True, default=str)
    if key not in _PRIORS:
        _PRIORS[key] = fit_question_prior(question_answers(build_train_data(train_specs)))
    return _PRIORS[key]


def question_only_result(prior: QuestionPrior, reference: EvalResult) -> EvalResult:
    """``prior`` answering the items of ``reference`` (a system's results with their predictions), scored as
    ``compactvl.evaluate`` scores them, with the same per-category chance levels."""
    rows = reference.predictions
    if not rows:
        raise InputError(f"the results of {reference.dataset} hold no predictions, so the question-only control "
                         "cannot be scored on its items; evaluate again (compactvl keeps predictions.jsonl)")
    if any("vqa_accuracy" in r for r in rows):
        raise InputError(f"{reference.dataset} is scored against several human answers per item, which its results "
                         "do not keep; the question-only control is scored on single-answer sets only")
    preds = [prior.answer(r["question"]) for r in rows]
    report = accuracy_report(preds, [r["answer"] for r in rows], [r["category"] for r in rows])
    chance = {c: v.get("chance") for c, v in reference.per_category.items()}
    per = {c: {**v, "ci95": list(wilson_interval(v["correct"], v["n"])), "chance": chance.get(c)}
           for c, v in report["per_category"].items()}
    scored = [{"id": r["id"], "question": r["question"], "prediction": p, "answer": r["answer"],
               "category": r["category"], "correct": exact_match(p, r["answer"])} for r, p in zip(rows, preds)]
    return EvalResult(dataset=reference.dataset, n=report["n"], correct=report["correct"],
                      accuracy=report["overall"], per_category=per, chance=reference.chance,
                      ci95=wilson_interval(report["correct"], report["n"]), predictions=scored)
