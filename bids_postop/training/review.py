"""The model card's ``uncertainty`` section, chosen on the validation folds (issue #20).

Two things the review flag (:mod:`bids_postop.core.uncertainty`) needs from training, both chosen on the own-fold
validation predictions that also choose the probability threshold (:mod:`bids_postop.training.threshold`):

- **Each fold member's own probability threshold**: the same rule as the ensemble's, on that fold's own validation
  participants. A fold whose probabilities run lower or higher than the others' is then called at its own level
  instead of the ensemble's (measured: a fold that never reached the ensemble's 0.9 called GTR for everyone and
  flagged every patient). A fold that found no residual in any reference-positive validation participant at its
  own threshold is written ``"votes": false``: at inference it stays in the ensemble, the map and the score, but
  not in the GTR/RT agreement rule, since it has shown no ability to contradict an RT call.
- **The mirror-score threshold** (``score_threshold``): each validation participant's mirror score (its own fold's
  network, :func:`bids_postop.core.uncertainty.mirror_disagreement`, the same quantity each fold's network gives
  a new patient) against "bad" — a wrong GTR/RT call or Dice < 0.5 on a reference-positive participant, at the
  card's threshold (the definition of the group level's review table, :mod:`bids_postop.evaluation.review`). The
  threshold maximises Youden's J (sensitivity + specificity − 1) over the midpoints between consecutive distinct
  scores; ties go to the higher threshold (fewer flags). The validation participants of a non-voting fold are
  left out (at inference that fold's score is left out of the mean). No threshold (``null``, with the reason) when the
  validation set has no bad or no good participant, no score, or no threshold with J > 0.

With few validation participants the threshold is rough; the card keeps its sensitivity, specificity, J, AUROC
and counts so that a user can judge it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from bids_postop.core.postprocess import GTR_CUTOFF_ML, MIN_COMPONENT_VOXELS
from bids_postop.evaluation.review import auroc, is_bad
from bids_postop.training.threshold import DEFAULT_RULE, ValidationCase, case_at, choose_threshold

LOG = logging.getLogger("bids_postop.training")
SECTION_VERSION = 1
SCORE_RULE = ("maximised Youden's J (sensitivity + specificity - 1) for 'wrong GTR/RT call or Dice < 0.5' over the "
              "midpoints between consecutive distinct mirror scores of the validation participants (each predicted "
              "by its own fold's network); ties: the higher threshold")


def choose_score_threshold(scores: Sequence[float], bad: Sequence[bool]) -> dict[str, Any]:
    """The mirror-score threshold that best separates ``bad`` from good (flag when score > threshold).

    Returns ``score_threshold`` (``None`` when none separates), ``how``, and on the validation set: ``n``,
    ``n_bad``, ``sensitivity``, ``specificity``, ``youden_j``, ``auroc``.
    """
    scores = [float(s) for s in scores]
    bad = [bool(b) for b in bad]
    if len(scores) != len(bad):
        raise ValueError(f"{len(scores)} scores for {len(bad)} labels")
    n_bad = sum(bad)
    out: dict[str, Any] = {"rule": SCORE_RULE, "n": len(scores), "n_bad": n_bad,
                           "auroc": auroc(scores, bad) if scores else None, "score_threshold": None,
                           "sensitivity": None, "specificity": None, "youden_j": None}
    if not n_bad or n_bad == len(scores):
        return {**out, "how": f"not chosen: the validation participants are all {'good' if not n_bad else 'bad'} "
                              f"({n_bad} bad of {len(scores)}), nothing to separate"}
    distinct = sorted(set(scores))
    best: tuple[float, float, float, float] | None = None  # (J, threshold, sensitivity, specificity)
    for low, high in zip(distinct, distinct[1:], strict=False):
        threshold = (low + high) / 2
        flagged = [s > threshold for s in scores]
        sensitivity = sum(f and b for f, b in zip(flagged, bad, strict=True)) / n_bad
        specificity = sum(not f and not b for f, b in zip(flagged, bad, strict=True)) / (len(scores) - n_bad)
        j = sensitivity + specificity - 1
        if best is None or j > best[0] + 1e-12 or (abs(j - best[0]) <= 1e-12 and threshold > best[1]):
            best = (j, threshold, sensitivity, specificity)
    if best is None or best[0] <= 0:
        return {**out, "how": "not chosen: no mirror-score threshold separates the bad validation participants "
                              "from the good ones better than chance (Youden's J <= 0)"}
    j, threshold, sensitivity, specificity = best
    return {**out, "score_threshold": round(threshold, 6), "sensitivity": sensitivity, "specificity": specificity,
            "youden_j": j, "how": SCORE_RULE}


def is_bad_case(case: ValidationCase, threshold: float, *, min_component_voxels: int = MIN_COMPONENT_VOXELS,
                cutoff_ml: float = GTR_CUTOFF_ML, gtr_inclusive: bool = False) -> bool:
    """Wrong GTR/RT call, or Dice < 0.5 on a reference-positive participant, at ``threshold``."""
    at = case_at(case, threshold, min_component_voxels=min_component_voxels, cutoff_ml=cutoff_ml,
                 gtr_inclusive=gtr_inclusive)
    return is_bad({"predicted_status": at["predicted_positive"], "true_status": at["positive"],
                   "in_P": at["positive"], "dice": at["dice"]})  # the group level's review table's definition


def member_settings(cases: Sequence[ValidationCase], *, rule: str = DEFAULT_RULE,
                    min_component_voxels: int = MIN_COMPONENT_VOXELS, cutoff_ml: float = GTR_CUTOFF_ML,
                    gtr_inclusive: bool = False) -> dict[str, dict[str, Any]]:
    """``fold_k`` → its own threshold (``rule`` on its own validation participants), what that threshold gives
    there, and whether it votes."""
    out = {}
    for fold in sorted({c.fold for c in cases if c.fold is not None}):
        own = [c for c in cases if c.fold == fold]
        chosen = choose_threshold(own, rule=rule, min_component_voxels=min_component_voxels, cutoff_ml=cutoff_ml,
                                  gtr_inclusive=gtr_inclusive)
        row = next(r for r in chosen["table"] if r["threshold"] == chosen["threshold"])  # 0.5 is on the grid
        positives, detected = row["n_positive"], row["TP"]
        votes = not (positives > 0 and detected == 0)
        out[f"fold_{fold}"] = {
            "threshold": chosen["threshold"], "how": chosen["how"], "votes": votes,
            "validation": {"participants": [c.participant_id for c in own], "n": len(own), "n_positive": positives,
                           "n_detected": detected, "dice_P": row["dice_P"]},
            **({} if votes else {"why_not_voting": f"found no residual in any of its {positives} reference-positive "
                                                   f"validation participant(s) at its threshold"})}
    return out


def uncertainty_section(cases: Sequence[ValidationCase], *, threshold: float, rule: str = DEFAULT_RULE,
                        min_component_voxels: int = MIN_COMPONENT_VOXELS, cutoff_ml: float = GTR_CUTOFF_ML,
                        gtr_inclusive: bool = False) -> dict[str, Any]:
    """The card's ``uncertainty`` section from the own-fold validation predictions (``threshold``: the card's)."""
    kw = dict(min_component_voxels=min_component_voxels, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
    members = member_settings(cases, rule=rule, **kw)
    # at inference a non-voting fold's score is left out of the mean: its validation participants are left out here
    votes = [members.get(f"fold_{c.fold}", {}).get("votes", True) for c in cases]
    if not any(votes):  # no fold votes: inference then counts every fold (ReviewSettings.for_members), so does this
        votes = [True] * len(cases)
    voting = [c for c, v in zip(cases, votes, strict=True) if v]
    scores = [c.segmentation.get("mirror_scores") for c in voting]
    if not voting or any(not s for s in scores):
        selection: dict[str, Any] = {
            "rule": SCORE_RULE, "score_threshold": None, "n": len(cases),
            "how": "not chosen: validation predictions without a mirror score (no test-time mirroring, e.g. "
                   "AGU-Net or Raidionics models): the score rule is not applied at inference"}
    else:
        per_case = [float(np.mean(s)) for s in scores]
        bad = [is_bad_case(c, threshold, **kw) for c in voting]
        selection = choose_score_threshold(per_case, bad)
        selection["validation"] = [{"participant_id": c.participant_id, "fold": c.fold, "mirror_score": s, "bad": b}
                                   for c, s, b in zip(voting, per_case, bad, strict=True)]
        if not all(votes):
            selection["left_out"] = sorted(c.participant_id for c, v in zip(cases, votes, strict=True) if not v)
    return {"version": SECTION_VERSION, "score": "mirror_score", "score_threshold": selection["score_threshold"],
            "score_threshold_selection": selection, "members": members}


def review_card_section(config: str, val_cases, *, threshold: float, rule: str) -> dict:
    """The card's ``uncertainty`` section (per-fold thresholds and votes, the mirror-score threshold), logged."""
    section = uncertainty_section(val_cases, threshold=threshold, rule=rule)
    for name, member in section["members"].items():
        LOG.info("[%s] review flag: %s threshold %.2f%s", config, name, member["threshold"],
                 "" if member["votes"] else f", not voting ({member['why_not_voting']})")
    chosen = section["score_threshold_selection"]
    if section["score_threshold"] is None:
        LOG.info("[%s] review flag: no mirror-score threshold (%s)", config, chosen["how"])
    else:
        LOG.info("[%s] review flag: mirror-score threshold %.4f (validation: sensitivity %.2f, specificity %.2f, "
                 "%d bad of %d)", config, section["score_threshold"], chosen["sensitivity"], chosen["specificity"],
                 chosen["n_bad"], chosen["n"])
    return section
