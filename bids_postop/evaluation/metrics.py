"""Overlap and surface metrics between two binary masks on the same voxel grid (numpy/scipy only).

Definitions (SPEC.md, "Metric definitions"):

- Dice ``D = 2|A∩B| / (|A| + |B|)``; undefined (``None``) when both masks are empty — the study reports
  Dice only on groups whose ground truth is positive, where it is always defined (an empty prediction
  scores 0).
- Jaccard from Dice, ``J = D / (2 − D)``.
- HD95 as in MedPy (``medpy.metric.binary.hd95``) and the study's validation code: the surface of a mask
  is ``mask XOR binary_erosion(mask)`` with the 3-D connectivity-1 structuring element (outside the
  image counts as background); the distances from every surface voxel of A to the nearest surface voxel
  of B and from B to A are pooled, and the 95th percentile (numpy's linear interpolation) is taken, in mm
  with the voxel spacing. Undefined when either mask is empty. (MONAI and DeepMind's surface-distance
  take the larger of the two directed 95th percentiles instead.)

HD95 is computed by Euclidean distance transforms on the bounding box of both masks grown by one voxel:
every surface voxel lies inside it, and the one-voxel margin (or the image border, which erosion already
treats as background) keeps the erosion identical to the one on the full grid, so the value equals
MedPy's on the full image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_postop.core.postprocess import volume_ml

BOTH_EMPTY = "both masks empty"
PREDICTION_EMPTY = "prediction empty"
REFERENCE_EMPTY = "reference empty"


@dataclass(frozen=True)
class Value:
    """A metric value, or ``None`` with the reason why it is undefined."""

    value: float | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.reason is None):
            raise ValueError("a Value holds either a number or a reason, not both nor neither")


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice coefficient of two masks of equal shape; ``None`` when both are empty."""
    a, b = _as_bool(a), _as_bool(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return None
    return 2.0 * int(np.count_nonzero(a & b)) / total


def jaccard_from_dice(d: float | None) -> float | None:
    """Jaccard index ``J = D / (2 − D)`` (``None`` passes through)."""
    if d is None:
        return None
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"Dice must lie in [0, 1]; got {d}")
    return d / (2.0 - d)


def bounding_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel of ``masks``, grown by ``margin`` voxels
    and clipped to the grid; ``None`` when all masks are empty."""
    union = _as_bool(masks[0])
    if len(masks) > 1:
        union = union | _as_bool(masks[1])  # a new array: the inputs are never modified
        for mask in masks[2:]:
            union |= _as_bool(mask)
    last = np.flatnonzero(union.any(axis=tuple(range(union.ndim - 1))))  # contiguous reductions only: fast
    if last.size == 0:
        return None
    head = union.any(axis=-1)  # projection on the other axes, one pass
    ranges = []
    for axis in range(head.ndim):
        hits = np.flatnonzero(head.any(axis=tuple(i for i in range(head.ndim) if i != axis)))
        ranges.append((int(hits[0]), int(hits[-1])))
    ranges.append((int(last[0]), int(last[-1])))
    return tuple(slice(max(lo - margin, 0), min(hi + 1 + margin, n)) for (lo, hi), n in zip(ranges, union.shape,
                                                                                            strict=True))


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask XOR erosion(mask)``, connectivity-1 structuring element, border = background."""
    mask = _as_bool(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Both masks must be non-empty and share a shape; ``spacing`` is the voxel size per array axis.
    """
    surf_b = surface(b)
    dt = ndimage.distance_transform_edt(~surf_b, sampling=np.asarray(spacing, dtype=np.float64))
    return dt[surface(a)]


def _check(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool(a), _as_bool(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if len(spacing) != a.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing must hold {a.ndim} positive voxel sizes (mm); got {tuple(spacing)}")
    return a, b


def hausdorff_percentile(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], *,
                         percentile: float = 95.0) -> Value:
    """Percentile of the pooled symmetric surface distances (mm), MedPy's definition; cropped to the
    bounding box of both masks (+1 voxel) for speed."""
    a, b = _check(prediction, reference, spacing)
    empty_a, empty_b = not a.any(), not b.any()
    if empty_a or empty_b:
        reason = BOTH_EMPTY if empty_a and empty_b else PREDICTION_EMPTY if empty_a else REFERENCE_EMPTY
        return Value(None, f"HD undefined: {reason}")
    box = bounding_box(a, b, margin=1) or tuple(slice(None) for _ in a.shape)  # never None: both non-empty
    a, b = a[box], b[box]
    pooled = np.concatenate([surface_distances(a, b, spacing), surface_distances(b, a, spacing)])
    return Value(float(np.percentile(pooled, percentile)))


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> Value:
    """95 % Hausdorff distance (mm) as in MedPy; ``Value(None, reason)`` when either mask is empty."""
    return hausdorff_percentile(prediction, reference, spacing, percentile=95.0)


@dataclass(frozen=True)
class PairMetrics:
    """Prediction against one reference annotation on the same grid."""

    predicted_volume_ml: float
    true_volume_ml: float
    dice: Value
    hd95_mm: Value

    @property
    def volume_error_ml(self) -> float:
        """Predicted − true volume (ml)."""
        return self.predicted_volume_ml - self.true_volume_ml


def compare_masks(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], *,
                  grid: np.ndarray | float | None = None) -> PairMetrics:
    """Volumes (ml), Dice and HD95 of ``prediction`` against ``reference`` (same shape; ``spacing`` in mm).

    ``grid``: the masks' affine (volumes use ``|det(affine)|`` per voxel: right on sheared grids) or voxel
    volume in mm³; default the product of ``spacing``. Volumes are rounded to 1e-6 ml
    (:func:`bids_postop.core.postprocess.volume_ml`).
    """
    a, b = _check(prediction, reference, spacing)
    voxel = grid if grid is not None else (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    d = dice(a, b)
    return PairMetrics(
        predicted_volume_ml=volume_ml(a, voxel),
        true_volume_ml=volume_ml(b, voxel),
        dice=Value(d) if d is not None else Value(None, f"Dice undefined: {BOTH_EMPTY}"),
        hd95_mm=hd95(a, b, spacing),
    )
