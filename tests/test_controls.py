"""The question-only control (``compactvl.controls``): a prior fitted on training (question, answer) pairs, scored on
a system's test items; and ``compactvl.data.question_answers``, which reads those pairs without any image."""
from __future__ import annotations

import pytest
from torch.utils.data import ConcatDataset

from compactvl.controls import fit_question_prior, question_only_result, question_prior
from compactvl.data import get_dataset, question_answers, write_llava
from compactvl.errors import InputError
from compactvl.evaluate import EvalResult
from compactvl.stats import wilson_interval


def test_the_prior_is_each_questions_most_common_answer_ties_alphabetical_else_the_overall_most_common():
    pairs = [("is it red?", "no"), ("is it red?", "yes"), ("is it red?", "yes"),  # yes 2 : no 1
             ("what shape?", "square"), ("what shape?", "circle"),  # a tie: circle comes first
             ("what color?", "red"), ("multi-turn", None), ("blank", " ")]  # no text answer: left out
    p = fit_question_prior(pairs)
    assert p.table == {"is it red?": "yes", "what shape?": "circle", "what color?": "red"}
    assert p.fallback == "yes" and p.pairs == 6  # yes 2, the others 1 each
    assert [p.answer(q) for q in ("is it red?", "never seen")] == ["yes", "yes"]
    assert p.seen(["is it red?", "never seen", "what color?"]) == 2


def test_training_data_without_text_answers_is_a_clear_error():
    with pytest.raises(InputError, match="no question with a text answer.*question-answer training data"):
        fit_question_prior([("describe", None)])


def _result(rows: list[dict], chance: dict[str, float]) -> EvalResult:
    per = {c: {"n": 0, "correct": 0, "accuracy": 0.0, "chance": x} for c, x in chance.items()}
    return EvalResult(dataset="set", n=len(rows), correct=0, accuracy=0.0, per_category=per, chance=0.3,
                      predictions=rows)


def test_the_control_answers_a_systems_items_and_is_scored_like_the_system():
    rows = [{"id": "a", "question": "is it red?", "answer": "Yes", "category": "yes/no", "prediction": "no",
             "correct": False},
            {"id": "b", "question": "is it red?", "answer": "no", "category": "yes/no", "prediction": "no",
             "correct": True},
            {"id": "c", "question": "what shape?", "answer": "circle", "category": "shape", "prediction": "x",
             "correct": False},
            {"id": "d", "question": "unseen?", "answer": "square", "category": "shape", "prediction": "x",
             "correct": False}]
    prior = fit_question_prior([("is it red?", "yes"), ("what shape?", "circle"), ("what shape?", "circle")])
    r = question_only_result(prior, _result(rows, {"yes/no": 0.5, "shape": 0.25}))
    # answers yes, yes, circle, circle (the fallback); exact match after normalisation: a and c are right
    assert [x["prediction"] for x in r.predictions] == ["yes", "yes", "circle", "circle"]
    assert [x["correct"] for x in r.predictions] == [True, False, True, False]
    assert [x["id"] for x in r.predictions] == ["a", "b", "c", "d"]
    assert (r.n, r.correct, r.accuracy, r.ci95) == (4, 2, 0.5, wilson_interval(2, 4))
    assert r.per_category["shape"] == {"n": 2, "correct": 1, "accuracy": 0.5, "ci95": list(wilson_interval(1, 2)),
                                       "chance": 0.25}
    assert r.per_category["yes/no"]["chance"] == 0.5 and r.chance == 0.3


def test_sets_the_control_cannot_score_are_clear_errors():
    prior = fit_question_prior([("q", "a")])
    with pytest.raises(InputError, match="no predictions.*evaluate again"):
        question_only_result(prior, _result([], {}))
    vqa = [{"id": "a", "question": "q", "answer": "a", "category": None, "prediction": "a", "correct": True,
            "vqa_accuracy": 1.0}]
    with pytest.raises(InputError, match="several human answers.*single-answer sets only"):
        question_only_result(prior, _result(vqa, {}))


@pytest.mark.parametrize("kind", ["synthvqa", "synthvqa-describe", "easyvqa", "llava", "concat"])
def test_question_answers_equal_the_samples_own_without_reading_images(kind, tmp_path, monkeypatch):
    syn = get_dataset("synthvqa", split="train", n=25, seed=3)
    if kind == "synthvqa":
        ds = syn
    elif kind == "synthvqa-describe":
        ds = get_dataset("synthvqa", split="train", n=6, task="describe")
    elif kind == "easyvqa":
        pytest.importorskip("easy_vqa")
        ds = get_dataset("easyvqa", split="train", n=30, seed=1)
    elif kind == "llava":
        ds = get_dataset(write_llava([syn[i] for i in range(5)], tmp_path, "set").json_path)
    else:
        ds = ConcatDataset([syn, get_dataset("synthvqa", split="test", n=10, distractors=0)])
    want = [(s.question, s.answer) for s in ds]
    if kind in ("synthvqa", "easyvqa", "llava"):  # these read no image at all
        monkeypatch.setattr("compactvl.data.synthvqa.SynthVQA._render", None)
        monkeypatch.setattr("compactvl.data.llava.Sample.load_images", None)
    assert question_answers(ds) == want and len(want) == len(ds)


def test_the_prior_of_a_configs_training_data_counts_every_training_pair():
    specs = [{"name": "synthvqa", "split": "train", "n": 40, "seed": 0, "image_folder": None,
              "skip_malformed": False, "difficulty": ["small", "medium", "large"], "categories": None,
              "distractors": 0},
             {"name": "synthvqa", "split": "train", "n": 10, "seed": 1, "image_folder": None,
              "skip_malformed": False, "difficulty": ["small"], "categories": ["color"], "distractors": None}]
    p = question_prior(specs)
    pairs = question_answers(get_dataset("synthvqa", split="train", n=40, seed=0, distractors=0)) + question_answers(
        get_dataset("synthvqa", split="train", n=10, seed=1, difficulty="small", categories="color"))
    assert p == fit_question_prior(pairs) and p.pairs == 50
