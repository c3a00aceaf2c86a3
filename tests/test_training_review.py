"""The model card's review section chosen on validation folds (bids_postop.training.review): the mirror-score
threshold against scikit-learn's ROC curve, and per-fold thresholds and votes on simulated validation folds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from bids_postop.training.review import choose_score_threshold, is_bad_case, uncertainty_section
from bids_postop.training.threshold import ValidationCase

AFFINE = np.eye(4)  # 1 mm³: 175 voxels = the GTR cut-off


@pytest.mark.parametrize("seed", range(8))
def test_score_threshold_is_youden_optimum_of_sklearn_roc_curve(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 40))
    bad = rng.random(n) < 0.4
    bad[0], bad[1] = True, False  # both classes
    scores = np.round(rng.normal(loc=np.where(bad, 0.35, 0.2), scale=0.1), 3)  # rounded: ties happen
    chosen = choose_score_threshold(scores.tolist(), bad.tolist())
    fpr, tpr, _ = roc_curve(bad, scores)
    best_j = float(np.max(tpr - fpr))
    assert chosen["auroc"] == pytest.approx(roc_auc_score(bad, scores))
    if best_j <= 0:
        assert chosen["score_threshold"] is None and "chance" in chosen["how"]
        return
    assert chosen["youden_j"] == pytest.approx(best_j)
    flagged = scores > chosen["score_threshold"]
    assert chosen["sensitivity"] == pytest.approx(flagged[bad].mean())
    assert chosen["specificity"] == pytest.approx((~flagged[~bad]).mean())
    # ties in J go to the higher threshold: no threshold flagging fewer reaches the same J
    higher = sorted({s for s in scores if s > chosen["score_threshold"]})
    for s in higher[1:]:
        f = scores >= s
        assert f[bad].mean() - f[~bad].mean() < best_j - 1e-12


@pytest.mark.parametrize("scores, bad, reason", [
    ([0.1, 0.2, 0.3], [False, False, False], "all good"),
    ([0.1, 0.2, 0.3], [True, True, True], "all bad"),
    ([0.5, 0.4, 0.1, 0.05], [False, False, True, True], "chance"),  # inverted: bad score lower
    ([0.2, 0.2, 0.2], [True, False, False], "all good|chance"),
])
def test_no_score_threshold_when_nothing_separates(scores, bad, reason):
    import re

    chosen = choose_score_threshold(scores, bad)
    assert chosen["score_threshold"] is None
    assert re.search(reason, chosen["how"]) or (reason == "all good|chance" and "chance" in chosen["how"])


def test_perfect_separation_puts_the_threshold_between_the_groups():
    chosen = choose_score_threshold([0.05, 0.1, 0.12, 0.3, 0.4], [False, False, False, True, True])
    assert chosen["score_threshold"] == pytest.approx(0.21)
    assert (chosen["sensitivity"], chosen["specificity"], chosen["youden_j"], chosen["auroc"]) == (1, 1, 1, 1)


def _box(n_voxels: int, value: float) -> np.ndarray:
    p = np.zeros((16, 16, 16), np.float32)
    flat = np.zeros(12 ** 3, np.float32)
    flat[:n_voxels] = value
    p[2:14, 2:14, 2:14] = flat.reshape(12, 12, 12)
    return p


def _case(pid: str, fold: int, truth_voxels: int, probability: np.ndarray, mirror: list[float] | None):
    return ValidationCase(probability, _box(truth_voxels, 1.0) > 0, AFFINE, pid, fold,
                          segmentation={"mirror_scores": mirror} if mirror is not None else {})


def test_uncertainty_section_per_fold_thresholds_votes_and_score_threshold():
    cases = []
    for k in range(4):  # fold 0: confident and right; fold 1: right but timid (0.35); fold 2: dead (all 0)
        truth = 400 if k < 3 else 0
        cases.append(_case(f"sub-0{k}", 0, truth, _box(truth, 0.95), [0.05 + 0.01 * k]))
        cases.append(_case(f"sub-1{k}", 1, truth, _box(truth, 0.35), [0.06 + 0.01 * k]))
        cases.append(_case(f"sub-2{k}", 2, truth, np.zeros((16, 16, 16), np.float32), [0.4 + 0.01 * k]))
    section = uncertainty_section(cases, threshold=0.3)  # the card's (all folds pooled)
    members = section["members"]
    assert members["fold_0"]["votes"] and members["fold_1"]["votes"] and not members["fold_2"]["votes"]
    # every threshold works for fold 0 (the tie goes to 0.5); fold 1 needs <= 0.3 (the tie goes to 0.3)
    assert (members["fold_0"]["threshold"], members["fold_1"]["threshold"], members["fold_2"]["threshold"]) == \
        (0.5, 0.3, 0.5)
    assert members["fold_2"]["validation"] == {"participants": ["sub-20", "sub-21", "sub-22", "sub-23"], "n": 4,
                                               "n_positive": 3, "n_detected": 0, "dice_P": 0.0}
    assert "no residual" in members["fold_2"]["why_not_voting"]
    # at the card's 0.3, fold 2's positives are missed (bad), everything else is right; at 0.5 fold 1's too
    assert [is_bad_case(c, 0.3) for c in cases] == [c.fold == 2 and c.participant_id != "sub-23" for c in cases]
    assert [is_bad_case(c, 0.5) for c in cases] == [c.fold in (1, 2) and c.participant_id[-1] != "3" for c in cases]
    chosen = section["score_threshold_selection"]
    # fold 2 does not vote: its participants are left out of the choice (at inference its score is left out too);
    # folds 0 and 1 are all good at 0.3: nothing to separate
    assert chosen["left_out"] == ["sub-20", "sub-21", "sub-22", "sub-23"]
    assert chosen["n"] == 8 and chosen["n_bad"] == 0 and section["score_threshold"] is None
    assert section["score"] == "mirror_score" and section["version"] == 1
    # at 0.5 fold 1's positives are bad: their scores (0.06-0.08) above fold 0's (0.05-0.08) and fold 1's GTR (0.09)
    at_half = uncertainty_section(cases, threshold=0.5)["score_threshold_selection"]
    assert at_half["n"] == 8 and at_half["n_bad"] == 3 and at_half["score_threshold"] is not None
    flagged = {v["participant_id"] for v in at_half["validation"] if v["mirror_score"] > at_half["score_threshold"]}
    assert at_half["sensitivity"] == sum(p in flagged for p in ("sub-10", "sub-11", "sub-12")) / 3


def test_no_score_threshold_without_mirror_scores():
    cases = [_case("sub-01", 0, 400, _box(400, 0.9), None), _case("sub-02", 1, 0, _box(0, 0.9), None)]
    section = uncertainty_section(cases, threshold=0.5)
    assert section["score_threshold"] is None
    assert "without a mirror score" in section["score_threshold_selection"]["how"]
    assert set(section["members"]) == {"fold_0", "fold_1"}


def test_when_no_fold_votes_every_participant_chooses_the_score_threshold():
    """Every fold dead on its validation participants: at inference every fold then counts (a card cannot leave
    none), so the score threshold is chosen on all of them, not reported as missing."""
    cases = []
    for fold in (0, 1):
        for k in range(3):
            truth = 400 if k < 2 else 0
            cases.append(_case(f"sub-{fold}{k}", fold, truth, np.zeros((16, 16, 16), np.float32),
                               [0.3 + 0.1 * k if truth else 0.0]))
    section = uncertainty_section(cases, threshold=0.5)
    assert not any(m["votes"] for m in section["members"].values())
    chosen = section["score_threshold_selection"]
    assert chosen["n"] == 6 and chosen["n_bad"] == 4 and "left_out" not in chosen
    assert len(chosen["validation"]) == 6 and section["score_threshold"] is not None
