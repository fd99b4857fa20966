"""compactvl.stats against published values and direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from compactvl.errors import InputError
from compactvl.stats import mcnemar_exact, paired_comparison, wilson_interval


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I: 81/263 -> 0.2553 to 0.3662 (method 3, Wilson)
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    # 15/148 -> 0.0624 to 0.1605; 0/10 -> 0 to 0.2775; 10/10 -> 0.7225 to 1 (the same table)
    assert tuple(round(x, 4) for x in wilson_interval(15, 148)) == (0.0624, 0.1605)
    assert tuple(round(x, 4) for x in wilson_interval(0, 10)) == (0.0, 0.2775)
    assert tuple(round(x, 4) for x in wilson_interval(10, 10)) == (0.7225, 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(InputError, match="0 <= k <= n"):
        wilson_interval(5, 3)


def test_mcnemar_exact_is_the_two_sided_binomial_test():
    # 10 discordant items split 2 / 8: p = 2 * P(X <= 2 | Binomial(10, 1/2)) = 2 * 56/1024
    assert mcnemar_exact(2, 8) == pytest.approx(2 * 56 / 1024)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8) and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0


def test_paired_comparison_difference_interval_and_agreement():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.6
    b = a.copy()
    flip = rng.choice(400, 40, replace=False)
    b[flip] = ~b[flip]
    answers_a = ["x" if v else "y" for v in a]
    answers_b = [("x" if v else "y") if i % 7 else "z" for i, v in enumerate(b)]  # some answers differ, same verdict
    c = paired_comparison(a, b, answers_a, answers_b)
    assert c.n == 400 and c.difference == pytest.approx(b.mean() - a.mean())
    assert c.ci95[0] <= c.difference <= c.ci95[1]
    assert c.only_a_right == int((a & ~b).sum()) and c.only_b_right == int((b & ~a).sum())
    assert c.agreement == pytest.approx(np.mean([x == y for x, y in zip(answers_a, answers_b)]))
    # the bootstrap interval is about the normal one for the paired difference at this n
    d = b.astype(float) - a.astype(float)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert c.ci95[1] - c.ci95[0] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert c.within_noise == (c.ci95[0] <= 0 <= c.ci95[1])
    same = paired_comparison(a, a)
    assert same.difference == 0 and same.ci95 == (0.0, 0.0) and same.agreement == 1.0 and same.mcnemar_p == 1.0
    assert paired_comparison(a, b).ci95 == c.ci95  # seeded: the same figures every time
    with pytest.raises(InputError, match="same non-empty list of items"):
        paired_comparison(a, b[:10])


def test_retention_is_the_accuracy_ratio_with_a_paired_interval():
    from compactvl.stats import retention

    rng = np.random.default_rng(2)
    base = rng.random(500) < 0.7
    method = base & (rng.random(500) < 0.8)  # loses about a fifth of the base's right answers
    r, (lo, hi) = retention(base, method)
    assert r == pytest.approx(method.sum() / base.sum()) and lo <= r <= hi and 0.7 < lo < hi < 0.9
    assert retention(base, base)[0] == 1.0 and retention(base, base)[1] == (1.0, 1.0)
    assert retention([False] * 5, [True] * 5) == (None, None)
