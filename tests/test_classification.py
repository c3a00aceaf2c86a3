"""Patient-wise classification at the 0.175 ml edge, scores, and BCa bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bids_postop.evaluation.classification import Counts, bootstrap_scores, is_positive, patient_outcome
from bids_postop.evaluation.metrics import compare_masks


def mask_with(n_voxels: int, *, start: int = 0, shape=(20, 20, 20)) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), bool)
    flat[start:start + n_voxels] = True
    return flat.reshape(shape)


# true voxels, predicted voxels, predicted offset (voxels), inclusive rule, expected outcome — 1 mm³ voxels,
# so 175 voxels are exactly 0.175 ml
EDGE_CASES = [
    (175, 175, 0, False, "TP"),     # exactly at the cut-off: RT under the paper's rule (< 0.175 is GTR)
    (175, 175, 0, True, "TN"),      # ... and GTR under the study code's rule (<= 0.175 is GTR)
    (174, 174, 0, False, "TN"),
    (176, 176, 0, True, "TP"),
    (175, 174, 0, False, "FN"),
    (174, 175, 0, False, "FP"),
    (176, 175, 0, True, "FN"),
    (175, 176, 0, True, "FP"),
    (0, 0, 0, False, "TN"),         # empty truth and prediction
    (200, 0, 0, False, "FN"),       # empty prediction
    (0, 200, 0, False, "FP"),       # empty truth
    (200, 200, 4000, False, "FN"),  # both positive, no overlap (Dice 0 < 0.01): the tumour was missed
]


@pytest.mark.parametrize(("n_true", "n_pred", "offset", "inclusive", "expected"), EDGE_CASES)
def test_outcomes_on_hand_made_masks_at_the_edge(n_true, n_pred, offset, inclusive, expected):
    truth, pred = mask_with(n_true), mask_with(n_pred, start=offset)
    m = compare_masks(pred, truth, (1.0, 1.0, 1.0))
    assert m.true_volume_ml == n_true / 1000
    got = patient_outcome(m.true_volume_ml, m.predicted_volume_ml, m.dice.value, cutoff_ml=0.175,
                          gtr_inclusive=inclusive)
    assert got == expected


def test_edge_with_anisotropic_voxels():
    # 700 voxels of 0.5 x 0.5 x 1 mm = 0.175 ml exactly
    truth = mask_with(700)
    m = compare_masks(truth, truth, (0.5, 0.5, 1.0))
    assert m.true_volume_ml == 0.175
    assert is_positive(m.true_volume_ml) and not is_positive(m.true_volume_ml, gtr_inclusive=True)


@pytest.mark.parametrize(("dice", "expected"), [(0.01, "TP"), (0.0099999, "FN"), (None, "FN"), (1.0, "TP")])
def test_true_positive_needs_dice_of_at_least_0_01(dice, expected):
    assert patient_outcome(1.0, 1.0, dice) == expected


def test_counts_and_scores():
    c = Counts.of(["TP"] * 6 + ["FN"] * 2 + ["TN"] * 3 + ["FP"] * 1)
    assert (c.tp, c.fn, c.tn, c.fp, c.n) == (6, 2, 3, 1, 12)
    assert c.recall == pytest.approx(6 / 8)
    assert c.precision == pytest.approx(6 / 7)
    assert c.specificity == pytest.approx(3 / 4)
    assert c.balanced_accuracy == pytest.approx((6 / 8 + 3 / 4) / 2)


def test_undefined_scores_are_none():
    c = Counts.of(["TP", "TP"])
    assert c.specificity is None and c.balanced_accuracy is None and c.recall == 1.0
    assert Counts.of([]).recall is None
    with pytest.raises(ValueError, match="unknown outcomes"):
        Counts.of(["TP", "maybe"])


def outcomes(seed: int, n: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return list(rng.choice(["TP", "FN", "TN", "FP"], size=n, p=[0.45, 0.1, 0.3, 0.15]))


def test_sensitivity_interval_is_scipy_bca_on_the_positive_patients():
    o = outcomes(1)
    got = bootstrap_scores(o, n_resamples=999, seed=5)["recall"]
    hits = np.array([x == "TP" for x in o if x in ("TP", "FN")], float)
    ref = stats.bootstrap((hits,), np.mean, n_resamples=999, method="BCa", random_state=np.random.default_rng(5))
    assert got.estimate == pytest.approx(hits.mean())
    assert (got.low, got.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_balanced_accuracy_interval_agrees_with_a_stratified_percentile_bootstrap():
    o = outcomes(2, n=300)
    got = bootstrap_scores(o, n_resamples=2000, seed=0)["balanced_accuracy"]
    hits = np.array([x == "TP" for x in o if x in ("TP", "FN")], float)
    rej = np.array([x == "TN" for x in o if x in ("TN", "FP")], float)
    rng = np.random.default_rng(99)
    boot = [(rng.choice(hits, hits.size).mean() + rng.choice(rej, rej.size).mean()) / 2 for _ in range(4000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    assert got.estimate == pytest.approx(Counts.of(o).balanced_accuracy)
    assert got.low == pytest.approx(low, abs=0.02) and got.high == pytest.approx(high, abs=0.02)
    assert got.low < got.estimate < got.high


def test_intervals_are_reproducible_and_degenerate_cases_give_reasons():
    o = outcomes(3)
    assert bootstrap_scores(o, n_resamples=500, seed=1) == bootstrap_scores(o, n_resamples=500, seed=1)
    perfect = bootstrap_scores(["TP"] * 10 + ["TN"] * 5 + ["FP"] * 5, n_resamples=200)
    assert perfect["recall"].estimate == 1.0 and perfect["recall"].low is None
    assert "same outcome" in perfect["recall"].reason
    assert perfect["balanced_accuracy"].low is not None  # the negatives vary
    none_negative = bootstrap_scores(["TP", "FN", "TP"], n_resamples=200)
    assert none_negative["specificity"].estimate is None and "no patient" in none_negative["specificity"].reason
