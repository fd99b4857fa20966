"""A question-only ("blind") baseline for the comparison's test items, and every finished system paired with it.

Run from the folder that holds runs/compare-systems: ``python docs/results/systems/blind_prior.py``.

Each test question is answered (``compactvl.controls``, which ``compactvl demo --compare`` now reports itself) with
the most common answer that exactly the same question text has in the training data the systems trained on
(synthvqa train n=2700 distractors 0, easy-vqa train n=900, seed 0; ties: the alphabetically first answer), else
with the most common answer of that set's training data. No image is looked at.
The same prior from the whole easy-vqa train split (a stronger prior than the systems saw) is printed too.
"""
import json
from collections import defaultdict
from pathlib import Path

from compactvl.controls import fit_question_prior
from compactvl.data import get_dataset, question_answers
from compactvl.stats import paired_comparison, wilson_interval

RUNS = Path("runs/compare-systems")
REFERENCE = RUNS / "16" / "pixel_shuffle_mlp" / "eval" / "as_trained"  # any finished system: the items and answers
SETS = ("synthvqa-test-distractors0", "easyvqa-test")


def prior(pairs):
    """question text -> its most common training answer, and the set's most common answer (the fallback)."""
    p = fit_question_prior(pairs)
    return p.table, p.fallback


def rows_of(d: Path, name: str):
    return [json.loads(x) for x in open(d / name / "predictions.jsonl")]


def score(name, table, fallback):
    rows = rows_of(REFERENCE, name)
    hit = [table.get(r["question"], fallback) == r["answer"] for r in rows]
    lo, hi = wilson_interval(sum(hit), len(rows))
    cats = defaultdict(list)
    for r, h in zip(rows, hit):
        cats[r["category"]].append(h)
    per = " ".join(f"{c} {sum(v) / len(v):.2f}" for c, v in sorted(cats.items()))
    print(f"{name}: blind {sum(hit) / len(rows):.3f} [{lo:.3f}, {hi:.3f}] (n={len(rows)}; "
          f"{sum(r['question'] in table for r in rows)} question texts seen in training) {per}")


syn = question_answers(get_dataset("synthvqa", split="train", n=2700, seed=0, distractors=0))
ez = question_answers(get_dataset("easyvqa", split="train", n=900, seed=0))
tables = {"synthvqa-test-distractors0": prior(syn), "easyvqa-test": prior(ez)}
for name, (table, fallback) in tables.items():
    score(name, table, fallback)
print("the same from the whole easy-vqa train split:")
score("easyvqa-test", *prior(question_answers(get_dataset("easyvqa", split="train"))))

print("\n| budget | system | synthvqa: system − blind | easy-vqa: system − blind | easy-vqa agreement with blind |")
print("|---|---|---|---|---|")
for budget in ("16", "4"):
    for d in sorted((RUNS / budget).iterdir()):
        if not (d / "results.json").exists():
            continue
        cells = []
        for name, (table, fallback) in tables.items():
            rows = rows_of(d / "eval" / "as_trained", name)
            blind = [table.get(r["question"], fallback) for r in rows]
            c = paired_comparison([p == r["answer"] for p, r in zip(blind, rows)], [r["correct"] for r in rows],
                                  blind, [r["prediction"] for r in rows])
            lo, hi = c.ci95
            noise = " (noise)" if lo <= 0 <= hi else f", McNemar p = {c.mcnemar_p:.2g}"
            cells.append(f"{c.difference:+.3f} [{lo:+.3f}, {hi:+.3f}]{noise}")
        print(f"| {budget} | {d.name} | {cells[0]} | {cells[1]} | {c.agreement:.2f} |")
