"""Choice of the probability threshold on the validation folds.

The paper says only that each model uses "the best threshold determined from the validation studies": the
rule below is the app's, and the model card records which rule chose the threshold and, for every candidate,
the scores of every rule. For every threshold 0.1, 0.2, …, 0.9 each validation participant's own-fold
probability is binarised, components smaller than ``min_component_voxels`` removed (as at inference), and
the participant classified as in :func:`bids_postop.evaluation.classification.patient_outcome` (positive =
residual ≥ 0.175 ml; TP needs Dice ≥ 0.01). Rules (``--threshold-rule``):

- ``dice_f1`` (default): (mean Dice over every validation participant + patient-wise F1) / 2, two empty
  masks scoring Dice 1. Source: the study authors' validation code (raidionicsval,
  ``best_segmentation_probability_threshold_analysis_postop`` in github.com/dbouget/validation_metrics_computation:
  it maximises (mean Dice + patient-wise F1) / 2 over the thresholds 0.1…0.9, its Dice smoothed by ε = 0.1 so
  that two empty masks score 1). Adapted: positives follow the 0.175 ml cut-off (raidionicsval: any voxel).
- ``dice_positive``: mean Dice over reference-positive participants (Dice-P); the current raidionicsval
  maximises a mean Dice alone.
- ``dice_recall``: (mean Dice over detected positives + patient-wise recall) / 2, the rule of bids_postop 0.1
  (the shipped demo models were chosen with it).
- ``balanced_accuracy``: patient-wise (recall + specificity) / 2, ties broken by Dice-P.

The best score wins (ties: the threshold closest to 0.5); when no threshold has a score ≥ 0.05 (no
positive participant, nothing detected) the default 0.5 is kept and the reason recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bids_postop.core.postprocess import GTR_CUTOFF_ML, MIN_COMPONENT_VOXELS, Grid, remove_small_components, volume_ml
from bids_postop.evaluation.classification import Counts, is_positive, patient_outcome
from bids_postop.evaluation.metrics import dice

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
DEFAULT_THRESHOLD = 0.5
MIN_MEANINGFUL_SCORE = 0.05
Rule = Literal["dice_f1", "dice_positive", "dice_recall", "balanced_accuracy"]
DEFAULT_RULE: Rule = "dice_f1"
RULES: dict[str, str] = {
    "dice_f1": "(mean Dice over all validation participants, two empty masks scoring 1, + patient-wise F1) / 2 "
               "(the study authors' validation code, raidionicsval's best_segmentation_probability_threshold_"
               "analysis_postop; the paper itself names no rule)",
    "dice_positive": "mean Dice over reference-positive participants (Dice-P)",
    "dice_recall": "(mean Dice over detected positive participants + patient-wise recall) / 2 (bids_postop 0.1's "
                   "rule, used for the shipped demo models)",
    "balanced_accuracy": "patient-wise balanced accuracy (recall + specificity) / 2, ties broken by Dice-P",
}


@dataclass(frozen=True)
class ValidationCase:
    """One validation participant: its own fold's probability and the manual mask on the same grid (x, y, z);
    ``grid`` is that grid's affine (or voxel volume in mm³: :func:`bids_postop.core.postprocess.volume_ml`)."""

    probability: np.ndarray
    truth: np.ndarray
    grid: Grid
    participant_id: str = ""
    fold: int | None = None
    segmentation: Mapping[str, Any] = field(default_factory=dict)  # what the backend ran (folds, mirroring, …)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def case_at(case: ValidationCase, threshold: float, *, min_component_voxels: int, cutoff_ml: float,
             gtr_inclusive: bool) -> dict[str, Any]:
    """One participant at ``threshold``: Dice, patient-wise outcome, reference and predicted GTR/RT."""
    truth = np.asarray(case.truth) > 0
    pred = remove_small_components(np.asarray(case.probability) >= threshold, min_voxels=min_component_voxels)
    d = dice(pred, truth)
    true_ml, pred_ml = volume_ml(truth, case.grid), volume_ml(pred, case.grid)
    kw = {"cutoff_ml": cutoff_ml, "gtr_inclusive": gtr_inclusive}
    return {"dice": d, "outcome": patient_outcome(true_ml, pred_ml, d, **kw), "positive": is_positive(true_ml, **kw),
            "predicted_positive": is_positive(pred_ml, **kw), "nonempty": bool(truth.any() and pred.any())}


def _f1(counts: Counts) -> float | None:
    den = 2 * counts.tp + counts.fp + counts.fn
    return 2 * counts.tp / den if den else None


def _rule_scores(row: dict[str, Any]) -> dict[str, float | None]:
    def half(a: float | None, b: float | None) -> float | None:
        return (a + b) / 2 if a is not None and b is not None else None

    return {"dice_f1": half(row["dice_all"], row["f1"]), "dice_positive": row["dice_P"],
            "dice_recall": half(row["dice_detected"], row["recall"]), "balanced_accuracy": row["balanced_accuracy"]}


def score_threshold(cases: Sequence[ValidationCase], threshold: float, *,
                    min_component_voxels: int = MIN_COMPONENT_VOXELS, cutoff_ml: float = GTR_CUTOFF_ML,
                    gtr_inclusive: bool = False) -> dict[str, Any]:
    """One row of the threshold table: Dice over all / positive / detected participants, patient-wise counts,
    recall, precision, specificity, balanced accuracy, F1 and every rule's score (``None`` when undefined)."""
    per = [case_at(c, threshold, min_component_voxels=min_component_voxels, cutoff_ml=cutoff_ml,
                    gtr_inclusive=gtr_inclusive) for c in cases]
    counts = Counts.of(p["outcome"] for p in per)
    row: dict[str, Any] = {
        "threshold": float(threshold), "n": len(per), "n_positive": sum(p["positive"] for p in per),
        "dice_all": _mean([1.0 if p["dice"] is None else p["dice"] for p in per]),
        "dice_P": _mean([p["dice"] for p in per if p["positive"] and p["dice"] is not None]),
        "dice_detected": _mean([p["dice"] for p in per if p["outcome"] == "TP" and p["dice"] is not None]),
        **counts.as_dict(), "f1": _f1(counts)}
    row["scores"] = _rule_scores(row)
    return row


def choose_threshold(cases: Sequence[ValidationCase], *, rule: str = DEFAULT_RULE,
                     thresholds: Sequence[float] = THRESHOLDS, min_component_voxels: int = MIN_COMPONENT_VOXELS,
                     cutoff_ml: float = GTR_CUTOFF_ML, gtr_inclusive: bool = False) -> dict[str, Any]:
    """The best threshold under ``rule``, how it was chosen, and the whole table (every rule's scores)."""
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; allowed: {', '.join(RULES)}")
    rows = [score_threshold(cases, t, min_component_voxels=min_component_voxels, cutoff_ml=cutoff_ml,
                            gtr_inclusive=gtr_inclusive) for t in thresholds]
    for r in rows:
        r["score"] = r["scores"][rule]
    how = (f"maximised {RULES[rule]} over {', '.join(f'{t:g}' for t in thresholds)} on {len(cases)} validation "
           f"participant(s), each predicted by its own fold's model, after removing components < "
           f"{min_component_voxels} voxels; positive = residual {'>' if gtr_inclusive else '>='} {cutoff_ml} ml")
    base = {"rule": rule, "rule_description": RULES[rule], "rules": dict(RULES), "table": rows}
    valid = [r for r in rows if r["score"] is not None]
    if not valid or max(r["score"] for r in valid) < MIN_MEANINGFUL_SCORE:
        return {**base, "threshold": DEFAULT_THRESHOLD,
                "how": f"no threshold scored >= {MIN_MEANINGFUL_SCORE} under rule {rule} on the validation "
                       f"participants (no positive participant, or none detected): default {DEFAULT_THRESHOLD}"}

    def key(r: dict) -> tuple:
        tie = r["dice_P"] if rule == "balanced_accuracy" and r["dice_P"] is not None else 0.0
        return round(r["score"], 6), round(tie, 6), -abs(r["threshold"] - DEFAULT_THRESHOLD)

    best = max(valid, key=key)
    return {**base, "threshold": best["threshold"], "score": best["score"], "how": how}
