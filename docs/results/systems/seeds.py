"""The same systems trained with another seed, paired item by item with their seed-0 runs and with each other.

Run from the folder that holds runs/compare-systems and runs/compare-systems-seed1:
``python docs/results/systems/seeds.py pixel_shuffle_mlp,leomini_no_mmoe``.
"""
import sys
from pathlib import Path

from compactvl.evaluate import compare_results, read_results

SETS = ("synthvqa-test-distractors0", "easyvqa-test")
SEED0, SEED1 = Path("runs/compare-systems/16"), Path("runs/compare-systems-seed1/16")


def paired(root_a: Path, a: str, root_b: Path, b: str, name: str) -> str:
    c = compare_results(*(read_results(r / x / "eval" / "as_trained" / name) for r, x in ((root_a, a), (root_b, b))))
    lo, hi = c.ci95
    noise = " (noise)" if lo <= 0 <= hi else f", McNemar p = {c.mcnemar_p:.2g}"
    return (f"{c.accuracy_a:.3f} -> {c.accuracy_b:.3f}: {c.difference:+.3f} [{lo:+.3f}, {hi:+.3f}]{noise}, "
            f"agreement {c.agreement:.2f}")


systems = sys.argv[1].split(",")
for s in systems:
    for name in SETS:
        print(f"{s}, seed 1 - seed 0, {name}: {paired(SEED0, s, SEED1, s, name)}")
for root in (SEED0, SEED1):
    for s in systems[1:]:
        for name in SETS:
            print(f"{root}: {s} - {systems[0]}, {name}: {paired(root, systems[0], root, s, name)}")
