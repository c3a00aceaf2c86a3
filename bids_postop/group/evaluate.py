"""Evaluation of one session: its predicted masks (one per compared dataset) against its manual masks.

Every mask must lie on the grid of the reference annotation (same shape, affine within 0.01 mm); a mask
that does not is reported with the reason, never resampled. Masks are cropped to the bounding box of all
of them (+1 voxel) before any metric, which changes no value (see :mod:`bids_postop.evaluation.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_postop.core.images import grid_mismatch, voxel_sizes
from bids_postop.core.postprocess import classify_resection, volume_ml
from bids_postop.evaluation.classification import is_positive, patient_outcome
from bids_postop.evaluation.interrater import score_patient
from bids_postop.evaluation.metrics import bounding_box, compare_masks
from bids_postop.group.collect import Key, Prediction

# prediction → (cut-off in ml, inclusive rule, where the rule came from)
CutoffRule = Callable[[Prediction], tuple[float, bool, str]]


class MaskError(Exception):
    """A mask of the session cannot be used; the message says why."""


@dataclass
class SessionResult:
    patients: list[dict] = field(default_factory=list)  # one row per compared dataset
    raters: list[dict] = field(default_factory=list)  # inter-rater scores, and rater errors


def _header(path: Path) -> nib.spatialimages.SpatialImage:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for damaged files
        raise MaskError(f"{path}: cannot read as NIfTI ({exc.__class__.__name__}: {exc})") from exc
    if len(img.shape) not in (3, 4) or (len(img.shape) == 4 and img.shape[3] != 1):
        raise MaskError(f"{path}: shape {img.shape}; a 3-D mask is needed")
    return img


def _grid_problem(img: nib.spatialimages.SpatialImage, path: Path, ref: nib.spatialimages.SpatialImage,
                  ref_path: Path) -> str | None:
    mismatch = grid_mismatch(img, ref)
    if mismatch is None:
        return None
    return (f"{path.name} (shape {img.shape[:3]}, voxel sizes {np.round(voxel_sizes(img), 3).tolist()} mm) is not "
            f"on the grid of {ref_path.name} (shape {ref.shape[:3]}, voxel sizes "
            f"{np.round(voxel_sizes(ref), 3).tolist()} mm; {mismatch}); not "
            f"resampled — resample the manual mask onto the post-op T1w-CE grid (nearest neighbour) first")


def _data(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise MaskError(f"{path}: voxel data cannot be read (truncated or corrupt file?): {exc}") from exc
    data = data.reshape(data.shape[:3])
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise MaskError(f"{path}: non-integer values (a probability map?); a binary 0/1 mask is needed")
    if data.min(initial=0) < 0:
        raise MaskError(f"{path}: negative values; a binary 0/1 mask is needed")
    return data > 0


def _base(prediction: Prediction, placement: tuple[str, str, str]) -> dict:
    fold, set_, fold_source = placement
    return {"source": prediction.source, "participant_id": prediction.participant_id,
            "session_id": prediction.session_id, "site": prediction.row.get("site", ""), "fold": fold,
            "set": set_, "fold_source": fold_source, "architecture": prediction.architecture,
            "config": prediction.configuration, "model": prediction.model_name}


def evaluate_session(key: Key, predictions: Mapping[str, Prediction], annotations: Mapping[str, Path], *,
                     reference: str, placement: Mapping[str, tuple[str, str, str]], cutoff_rule: CutoffRule,
                     cutoff_ml: float, gtr_inclusive: bool) -> SessionResult:
    """Metrics of every prediction of one session against its reference annotation, and the inter-rater
    scores (when at least two raters annotated it). ``predictions``: source → prediction; ``placement``:
    source → (fold, set, fold source); ``cutoff_rule`` gives each prediction's GTR rule; ``cutoff_ml`` and
    ``gtr_inclusive`` decide which patients are reference-positive in the inter-rater study."""
    result = SessionResult()
    first = next(iter(predictions))
    session = {"participant_id": f"sub-{key[0]}", "session_id": f"ses-{key[1]}" if key[1] else None,
               "fold": placement[first][0], "site": predictions[first].row.get("site", "")}

    def fail(prediction: Prediction, status: str, reason: str) -> None:
        result.patients.append({**_base(prediction, placement[prediction.source]), "status": status,
                                "reason": reason, "reference_rater": reference})

    if not annotations:
        for p in predictions.values():
            fail(p, "no_reference", "no manual annotation for this session")
        return result
    headers: dict[str, nib.spatialimages.SpatialImage] = {}
    problems: dict[str, str] = {}
    for rater, path in annotations.items():
        try:
            headers[rater] = _header(path)
        except MaskError as exc:
            problems[rater] = str(exc)
    grid_rater = reference if reference in headers else next(iter(sorted(headers)), None)
    if grid_rater is None:
        for p in predictions.values():
            fail(p, "error", problems.get(reference, f"no annotation by the reference rater '{reference}'"))
        return result
    grid, grid_path = headers[grid_rater], annotations[grid_rater]
    arrays: dict[str, np.ndarray] = {}
    for rater, img in headers.items():
        problem = _grid_problem(img, annotations[rater], grid, grid_path)
        try:
            if problem is None:
                arrays[rater] = _data(img, annotations[rater])
        except MaskError as exc:
            problem = str(exc)
        if problem:
            problems[rater] = problem
    preds: dict[str, np.ndarray] = {}
    for source, p in predictions.items():
        try:
            if p.mask is None:
                raise MaskError("no residual mask for this measures TSV (measures JSON 'outputs', or "
                                "anat/*_label-tumor_desc-<desc>_mask.nii.gz beside it)")
            img = _header(p.mask)
            problem = _grid_problem(img, p.mask, grid, grid_path)
            if problem:
                raise MaskError(problem)
            preds[source] = _data(img, p.mask)
        except MaskError as exc:
            fail(p, "error", str(exc))
    for rater, problem in sorted(problems.items()):
        result.raters.append({**session, "annotator": rater, "kind": "rater", "target": "", "status": "error",
                              "reason": problem})

    # every mask empty: one voxel stands for the grid (volumes 0, Dice and HD95 undefined all the same)
    box = bounding_box(*arrays.values(), *preds.values(), margin=1) or (slice(0, 1),) * 3
    arrays = {k: v[box] for k, v in arrays.items()}
    preds = {k: v[box] for k, v in preds.items()}
    spacing = voxel_sizes(grid)
    truth = arrays.get(reference)
    for source, mask in preds.items():
        p = predictions[source]
        if truth is None:
            fail(p, "no_reference", problems.get(reference, f"no usable annotation by the reference rater "
                                                              f"'{reference}'"))
            continue
        m = compare_masks(mask, truth, spacing, grid=grid.affine)  # volumes: |det(affine)| per voxel
        dice = m.dice.value
        row_cutoff, row_inclusive, rule_source = cutoff_rule(p)
        kw = {"cutoff_ml": row_cutoff, "gtr_inclusive": row_inclusive}
        result.patients.append({
            **_base(p, placement[source]), "status": "ok", "reason": None, "reference_rater": reference,
            "gtr_cutoff_ml": row_cutoff, "gtr_inclusive": row_inclusive, "gtr_rule_source": rule_source,
            "predicted_volume_ml": m.predicted_volume_ml, "true_volume_ml": m.true_volume_ml,
            "volume_error_ml": m.volume_error_ml, "abs_volume_error_ml": abs(m.volume_error_ml),
            "dice": dice, "dice_undefined_reason": m.dice.reason, "hd95_mm": m.hd95_mm.value,
            "hd95_undefined_reason": m.hd95_mm.reason,
            "true_status": classify_resection(m.true_volume_ml, **kw),
            "predicted_status": classify_resection(m.predicted_volume_ml, **kw),
            "outcome": patient_outcome(m.true_volume_ml, m.predicted_volume_ml, dice, **kw),
            "in_P": is_positive(m.true_volume_ml, **kw),
            "review_flag": p.uncertainty.get("review_flag"),
            "uncertainty_score": p.uncertainty.get("uncertainty_score"),
            "mirror_score": p.uncertainty.get("mirror_score"),
            "members_kind": p.uncertainty.get("members_kind")})
    if len(arrays) >= 2:
        rows, pool = score_patient(arrays, preds, reference=reference if reference in arrays else None)
        positive = (is_positive(volume_ml(truth, grid.affine), cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
                    if truth is not None else None)
        for row in rows:
            result.raters.append({**session, **row, "status": "ok", "reference_positive": positive,
                                  "consensus_of": "+".join(pool) if row["target"] == "consensus" else reference})
    return result
