"""Tests and summaries against independent references (statsmodels, hand-computed ranks, raw samples)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bids_postop.evaluation.stats import (
    mann_whitney,
    mean_sd,
    median,
    normal_interval,
    pooled_mean_sd,
    tukey_hsd,
    weighted_mean,
)

GROUPS = {
    "A": [0.51, 0.62, 0.48, 0.70, 0.55, 0.66, 0.43],
    "B": [0.61, 0.72, 0.58, 0.80, 0.75, 0.69],
    "C": [0.31, 0.42, 0.38, 0.50, 0.45, 0.29, 0.40, 0.47],
}


def test_tukey_matches_statsmodels():
    multicomp = pytest.importorskip("statsmodels.stats.multicomp")
    endog = np.concatenate([GROUPS[g] for g in GROUPS])
    labels = np.concatenate([[g] * len(GROUPS[g]) for g in GROUPS])
    ref = multicomp.pairwise_tukeyhsd(endog, labels, alpha=0.05)
    got = {(r.group_a, r.group_b): r for r in tukey_hsd(GROUPS, metric="Dice")}
    pairs = [(ref.groupsunique[i], ref.groupsunique[j]) for i, j in zip(*np.triu_indices(3, 1), strict=True)]
    for (g1, g2), meandiff, p, low, high in zip(pairs, ref.meandiffs, ref.pvalues, ref.confint[:, 0],
                                                 ref.confint[:, 1], strict=True):
        r = got[(g1, g2)]  # statsmodels reports mean(g2) - mean(g1); we report mean(a) - mean(b)
        assert r.estimate == pytest.approx(-meandiff, abs=1e-9)
        assert r.p_value == pytest.approx(p, abs=1e-3)
        assert (r.ci_low, r.ci_high) == pytest.approx((-high, -low), abs=1e-3)
        assert r.significant == (p < 0.05) and r.metric == "Dice"


def test_tukey_leaves_out_small_groups_with_a_reason():
    res = tukey_hsd({"A": GROUPS["A"], "B": GROUPS["B"], "tiny": [0.5, None]})
    assert {(r.group_a, r.group_b) for r in res if r.p_value is not None} == {("A", "B")}
    assert any(r.group_a == "tiny" and "fewer than 2" in r.reason for r in res)
    assert tukey_hsd({"A": GROUPS["A"]}) == []


def u_by_hand(x, y):
    ranks = stats.rankdata(np.concatenate([x, y]))
    return ranks[: len(x)].sum() - len(x) * (len(x) + 1) / 2


def test_mann_whitney_against_ranks_and_normal_approximation():
    x, y = GROUPS["A"] + [None], GROUPS["C"]
    r = mann_whitney(x, y, name_a="model", name_b="raters", metric="Jaccard")
    xs = GROUPS["A"]
    assert r.n_a == 7 and r.n_b == 8  # None left out
    assert r.statistic == pytest.approx(u_by_hand(xs, y))
    assert r.estimate == pytest.approx(np.median(xs) - np.median(y))
    # with ties, scipy uses the normal approximation with tie and continuity correction: redo it by hand
    tied_x, tied_y = [0.5, 0.5, 0.6, 0.7, 0.7, 0.9], [0.4, 0.5, 0.5, 0.6, 0.3, 0.3, 0.2]
    r = mann_whitney(tied_x, tied_y, name_a="a", name_b="b")
    n1, n2 = len(tied_x), len(tied_y)
    u = u_by_hand(tied_x, tied_y)
    _, counts = np.unique(tied_x + tied_y, return_counts=True)
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - (counts**3 - counts).sum() / (n * (n - 1))))
    z = (abs(u - n1 * n2 / 2) - 0.5) / sigma
    assert r.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)


def test_mann_whitney_without_values_gives_a_reason():
    r = mann_whitney([None], [0.5], name_a="a", name_b="b")
    assert r.p_value is None and "no defined value" in r.reason


@pytest.mark.parametrize("seed", range(4))
def test_pooled_mean_sd_equals_the_combined_sample(seed):
    rng = np.random.default_rng(seed)
    folds = [rng.normal(0.5, 0.2, size=int(n)) for n in rng.integers(1, 30, size=5)]
    means = [f.mean() for f in folds]
    sds = [f.std(ddof=1) if f.size > 1 else None for f in folds]
    mean, sd = pooled_mean_sd(means, sds, [f.size for f in folds])
    everything = np.concatenate(folds)
    assert mean == pytest.approx(everything.mean(), abs=1e-12)
    assert sd == pytest.approx(everything.std(ddof=1), abs=1e-9)


def test_normal_interval_from_fold_estimates():
    estimates = [0.52, 0.58, 0.49, 0.61, 0.55]
    mean, sd, low, high = normal_interval(estimates)
    ref_low, ref_high = stats.norm.interval(0.95, loc=np.mean(estimates), scale=stats.sem(estimates))
    assert mean == pytest.approx(np.mean(estimates)) and sd == pytest.approx(np.std(estimates, ddof=1))
    assert (low, high) == pytest.approx((ref_low, ref_high))
    assert normal_interval([0.5]) == (0.5, None, None, None)
    assert normal_interval([]) == (None, None, None, None)


def test_means_leave_out_undefined_values():
    assert mean_sd([1.0, None, 3.0, float("nan")]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([None]) == (None, None)
    assert mean_sd([2.0]) == (2.0, None)
    assert median([None, 1.0, 5.0, 2.0]) == 2.0
    assert weighted_mean([0.5, 1.0], [3, 1]) == pytest.approx(0.625)
