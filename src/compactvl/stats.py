"""Uncertainty for accuracies and for comparisons of two runs on the same items.

- :func:`wilson_interval`: the 95 % Wilson score interval of a proportion k / n (Wilson 1927). It stays inside
  [0, 1] and behaves at k = 0 or k = n, where the normal ("Wald") interval collapses to a point.
- :func:`paired_comparison`: two runs scored on the same items (a compressed model against the same model
  uncompressed). It reports:
  - the accuracy difference b − a, with a 95 % paired bootstrap percentile interval (items resampled together,
    seeded, so the figure is reproducible);
  - the exact two-sided McNemar p-value on the discordant items;
  - the agreement, the fraction of items whose two answers are identical (this needs no labels).

A difference whose interval contains 0 is reported as such: it is inside the noise at this n.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import InputError

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``k / n`` (95 % for the default ``z``); (0, 1) when n = 0."""
    if n < 0 or not 0 <= k <= n:
        raise InputError(f"a proportion needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends (floats leave ~1e-17 otherwise)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact(b01: int, b10: int) -> float:
    """Two-sided exact McNemar p-value: the discordant items split ``b01`` (only the second run right) /
    ``b10`` (only the first right), tested against Binomial(b01 + b10, 1/2)."""
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_b - accuracy_a
    ci95: tuple[float, float]  # paired bootstrap percentile interval of the difference
    mcnemar_p: float
    only_a_right: int
    only_b_right: int
    agreement: float  # identical answers / n

    @property
    def within_noise(self) -> bool:
        """True when the 95 % interval of the difference contains 0."""
        return self.ci95[0] <= 0.0 <= self.ci95[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        d["within_noise"] = self.within_noise
        return d

    def describe(self) -> str:
        verdict = "within the noise" if self.within_noise else "outside the noise"
        return (f"{self.difference:+.3f} [{self.ci95[0]:+.3f}, {self.ci95[1]:+.3f}] ({verdict}; McNemar p = "
                f"{self.mcnemar_p:.3g}, n = {self.n}), agreement {self.agreement:.3f}")


def paired_comparison(correct_a: Sequence[bool], correct_b: Sequence[bool], answers_a: Sequence[str] | None = None,
                      answers_b: Sequence[str] | None = None, resamples: int = 2000,
                      seed: int = 0) -> PairedComparison:
    """Compare run b with run a on the same items (same order). ``answers_*`` give the agreement; without them
    it is the agreement of the verdicts (right / wrong)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise InputError(f"a paired comparison needs the same non-empty list of items in both runs; got {a.size} "
                         f"and {b.size} verdicts")
    n = a.size
    d = b.astype(np.int64) - a.astype(np.int64)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(resamples, n))].sum(axis=1) / n  # exact multiples of 1/n, like the mean
    lo, hi = np.quantile(boots, [0.025, 0.975], method="inverted_cdf")  # resampled values, no interpolation
    if answers_a is not None and answers_b is not None:
        if len(answers_a) != n or len(answers_b) != n:
            raise InputError(f"got {len(answers_a)} and {len(answers_b)} answers for {n} items")
        agree = sum(x == y for x, y in zip(answers_a, answers_b)) / n
    else:
        agree = float((a == b).mean())
    only_b, only_a = int((b & ~a).sum()), int((a & ~b).sum())
    return PairedComparison(n, float(a.mean()), float(b.mean()), float(d.sum() / n), (float(lo), float(hi)),
                            mcnemar_exact(only_b, only_a), only_a, only_b, float(agree))


def retention(correct_base: Sequence[bool], correct_method: Sequence[bool], resamples: int = 2000,
              seed: int = 0) -> tuple[float | None, tuple[float, float] | None]:
    """Accuracy retention, method accuracy / base accuracy on the same items, with a 95 % paired bootstrap
    percentile interval (items resampled together; resamples where the base scores 0 are dropped). (None, None)
    when the base scores 0."""
    a = np.asarray(correct_base, dtype=np.int64)
    b = np.asarray(correct_method, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise InputError(f"retention needs the same non-empty list of items in both runs; got {a.size} and {b.size}")
    if a.sum() == 0:
        return None, None
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    sa, sb = a[idx].sum(axis=1), b[idx].sum(axis=1)
    ratios = sb[sa > 0] / sa[sa > 0]
    lo, hi = np.quantile(ratios, [0.025, 0.975], method="inverted_cdf")
    return float(b.sum() / a.sum()), (float(lo), float(hi))
