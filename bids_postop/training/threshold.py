"""Choice of the probability threshold on the validation folds (the study's validation procedure).

For every threshold 0.1, 0.2, …, 0.9 the validation probabilities are binarised, components smaller than
``min_component_voxels`` removed (as at inference), and scored with
``(mean Dice over detected positives + patient-wise recall) / 2``:

- a *positive* patient has a manual residual volume at or above the GTR cut-off (0.175 ml);
- patient-wise recall = TP / positives, TP as in :func:`bids_postop.evaluation.classification.patient_outcome`
  (prediction positive too, and Dice ≥ 0.01);
- *detected positives* (``dice_over="detected"``, default) are those TP patients; ``dice_over="nonempty"``
  counts every case with non-empty truth and prediction (what the first demo models were chosen with).

The best score wins (ties: the threshold closest to 0.5); when no threshold has a score ≥ 0.05 (no
positive patient, or nothing detected) the default 0.5 is kept and the reason recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bids_postop.core.postprocess import GTR_CUTOFF_ML, MIN_COMPONENT_VOXELS, remove_small_components, volume_ml
from bids_postop.evaluation.classification import is_positive, patient_outcome
from bids_postop.evaluation.metrics import dice

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
DEFAULT_THRESHOLD = 0.5
MIN_MEANINGFUL_SCORE = 0.05


@dataclass(frozen=True)
class ValidationCase:
    """One validation patient: probability and manual mask on the same grid (x, y, z), voxel sizes in mm."""

    probability: np.ndarray
    truth: np.ndarray
    voxel_sizes_mm: tuple[float, float, float]
    participant_id: str = ""


def score_threshold(cases: Sequence[ValidationCase], threshold: float, *,
                    min_component_voxels: int = MIN_COMPONENT_VOXELS, cutoff_ml: float = GTR_CUTOFF_ML,
                    gtr_inclusive: bool = False, dice_over: Literal["detected", "nonempty"] = "detected",
                    ) -> dict[str, Any]:
    """One row of the threshold table: mean Dice, recall, score (``None`` when undefined)."""
    dices: list[float] = []
    tp = positives = 0
    for case in cases:
        truth = np.asarray(case.truth) > 0
        pred = remove_small_components(np.asarray(case.probability) >= threshold, min_voxels=min_component_voxels)
        d = dice(pred, truth)
        true_ml, pred_ml = volume_ml(truth, case.voxel_sizes_mm), volume_ml(pred, case.voxel_sizes_mm)
        outcome = patient_outcome(true_ml, pred_ml, d, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
        if is_positive(true_ml, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive):
            positives += 1
        if outcome == "TP":
            tp += 1
        counted = outcome == "TP" if dice_over == "detected" else bool(truth.any() and pred.any())
        if counted and d is not None:
            dices.append(d)
    mean_dice = float(np.mean(dices)) if dices else None
    recall = tp / positives if positives else None
    score = (mean_dice + recall) / 2 if mean_dice is not None and recall is not None else None
    return {"threshold": float(threshold), "mean_dice": mean_dice, "recall": recall, "score": score,
            "n_dice": len(dices), "n_positive": positives}


def choose_threshold(cases: Sequence[ValidationCase], *, thresholds: Sequence[float] = THRESHOLDS,
                     min_component_voxels: int = MIN_COMPONENT_VOXELS, cutoff_ml: float = GTR_CUTOFF_ML,
                     gtr_inclusive: bool = False, dice_over: Literal["detected", "nonempty"] = "detected",
                     ) -> dict[str, Any]:
    """The best threshold, how it was chosen, and the whole table."""
    rows = [score_threshold(cases, t, min_component_voxels=min_component_voxels, cutoff_ml=cutoff_ml,
                            gtr_inclusive=gtr_inclusive, dice_over=dice_over) for t in thresholds]
    valid = [r for r in rows if r["score"] is not None]
    what = "detected positive patients" if dice_over == "detected" else "cases with non-empty truth and prediction"
    how = (f"maximised (mean Dice over {what} + patient-wise recall) / 2 over "
           f"{', '.join(f'{t:g}' for t in thresholds)} on {len(cases)} validation case(s), after removing "
           f"components < {min_component_voxels} voxels; positive = residual >= {cutoff_ml} ml")
    if not valid or max(r["score"] for r in valid) < MIN_MEANINGFUL_SCORE:
        return {"threshold": DEFAULT_THRESHOLD, "table": rows,
                "how": f"no threshold scored >= {MIN_MEANINGFUL_SCORE} on the validation cases (no positive "
                       f"patient, or none detected): default {DEFAULT_THRESHOLD}"}
    best = max(valid, key=lambda r: (round(r["score"], 6), -abs(r["threshold"] - DEFAULT_THRESHOLD)))
    return {"threshold": best["threshold"], "score": best["score"], "how": how, "table": rows}
