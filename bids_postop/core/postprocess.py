"""Post-processing of a residual-tumour probability map, and the measures derived from the mask.

SPEC.md, steps 5–6: binarise at the model's threshold, remove connected components smaller than 20
voxels, residual volume in ml (voxel count × |det(affine)| / 1000, rounded to 1e-6 ml), gross total
resection (GTR) below 0.175 ml, residual tumour (RT) at or above it, and the extent of resection when the
pre-operative tumour volume is known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

GTR_CUTOFF_ML = 0.175
MIN_COMPONENT_VOXELS = 20

ResectionStatus = Literal["GTR", "RT"]


def binarize(probability: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of voxels whose probability is at or above ``threshold`` (0 < threshold < 1)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1); got {threshold}")
    return np.asarray(probability) >= threshold


def remove_small_components(mask: np.ndarray, *, min_voxels: int = MIN_COMPONENT_VOXELS,
                            connectivity: Literal[6, 18, 26] = 26) -> np.ndarray:
    """Drop connected components with fewer than ``min_voxels`` voxels (3-D, 26-connected by default).

    Voxel counts, not volumes: the study's rule is in voxels of the post-op T1w-CE grid.
    """
    import cc3d  # light C extension; imported here to keep module import cheap

    mask = np.asarray(mask, dtype=bool)
    if min_voxels <= 1 or not mask.any():
        return mask.copy()
    # a one-voxel border: cc3d 4.1.1 fails ("maximum length exception") on arrays with a 1-voxel axis
    padded = np.pad(mask, 1)
    kept = cc3d.dust(padded, threshold=min_voxels, connectivity=connectivity, in_place=False)
    return kept[1:-1, 1:-1, 1:-1].astype(bool)


VOLUME_DECIMALS = 6  # volumes are rounded to 1e-6 ml (1 nl), before any comparison with the GTR cut-off

# What ``volume_ml`` and ``postprocess_probability`` take for the grid: the image's affine (4×4, or its 3×3
# part), the voxel volume in mm³, or (older callers) the three voxel sizes in mm.
Grid = np.ndarray | float | tuple[float, float, float] | list[float]


def voxel_volume_mm3(grid: Grid) -> float:
    """Volume of one voxel in mm³: ``|det(affine[:3, :3])|`` for an affine (right for oblique and sheared
    grids, where the product of the column norms is not), the number itself for a voxel volume, the product
    for three voxel sizes."""
    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim == 0:
        return float(abs(arr))
    if arr.shape in ((4, 4), (3, 3)):
        return float(abs(np.linalg.det(arr[:3, :3])))
    if arr.shape == (3,):
        return float(abs(np.prod(arr)))
    raise ValueError(f"expected an affine (4x4 or 3x3), a voxel volume (mm3) or three voxel sizes (mm); got an "
                     f"array of shape {arr.shape}")


def volume_ml(mask: np.ndarray, grid: Grid) -> float:
    """Volume in ml: voxel count × voxel volume (mm³, ``|det(affine)|``) / 1000, rounded to 1e-6 ml.

    ``grid`` is the mask's affine (preferred), its voxel volume in mm³, or its three voxel sizes. The
    rounding makes the GTR/RT decision independent of floating-point noise: on a grid tilted by 7°, 175
    voxels of 1 mm³ are 0.175 ml (RT), not 0.17499999 ml (GTR).
    """
    return round(float(np.count_nonzero(mask)) * voxel_volume_mm3(grid) / 1000.0, VOLUME_DECIMALS)


def classify_resection(residual_ml: float, *, cutoff_ml: float = GTR_CUTOFF_ML,
                       gtr_inclusive: bool = False) -> ResectionStatus:
    """GTR or RT from the residual volume.

    Default follows the paper's text: GTR when ``residual_ml < cutoff_ml``. ``gtr_inclusive=True``
    follows the study's validation code instead (GTR when ``residual_ml <= cutoff_ml``); the two differ
    only at exactly the cut-off.
    """
    is_gtr = residual_ml <= cutoff_ml if gtr_inclusive else residual_ml < cutoff_ml
    return "GTR" if is_gtr else "RT"


def extent_of_resection(preop_ml: float | None, residual_ml: float) -> float | None:
    """EOR in percent, ``100 × (preop − residual) / preop``; ``None`` when the pre-op volume is unknown or 0.

    Not clipped: a negative value (residual larger than the pre-operative tumour) is reported as is,
    since it flags a registration or segmentation problem worth seeing.
    """
    if preop_ml is None or preop_ml <= 0:
        return None
    return 100.0 * (preop_ml - residual_ml) / preop_ml


def _count_components(mask: np.ndarray) -> int:
    import cc3d

    if not mask.any():
        return 0
    return int(cc3d.connected_components(np.pad(mask, 1), connectivity=26, return_N=True)[1])


@dataclass(frozen=True)
class ResidualMeasures:
    """What post-processing reports for one post-operative session."""

    threshold: float
    min_component_voxels: int
    voxels_above_threshold: int
    components_removed: int
    residual_voxels: int
    residual_volume_ml: float
    resection_status: ResectionStatus
    gtr_cutoff_ml: float
    gtr_rule: str
    preop_volume_ml: float | None
    eor_percent: float | None
    gtr_inclusive: bool = False  # True: exactly the cut-off is GTR (the study's code); False: RT (the paper's text)
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


def postprocess_probability(probability: np.ndarray, grid: Grid, *,
                            threshold: float, min_component_voxels: int = MIN_COMPONENT_VOXELS,
                            cutoff_ml: float = GTR_CUTOFF_ML, gtr_inclusive: bool = False,
                            preop_volume_ml: float | None = None) -> tuple[np.ndarray, ResidualMeasures]:
    """Threshold, remove specks, measure and classify.

    ``probability`` is the residual-tumour probability on the post-op T1w-CE grid, shape (x, y, z);
    ``grid`` is that grid's affine (or its voxel volume in mm³, or its voxel sizes: :func:`volume_ml`).
    Returns the uint8 residual mask (same shape) and the measures.
    """
    above = binarize(probability, threshold)
    kept = remove_small_components(above, min_voxels=min_component_voxels)
    n_before, n_after = _count_components(above), _count_components(kept)
    residual = volume_ml(kept, grid)
    notes = []
    voxel_mm3 = voxel_volume_mm3(grid)
    smallest_kept_ml = min_component_voxels * voxel_mm3 / 1000.0
    if min_component_voxels > 1 and smallest_kept_ml >= cutoff_ml:
        # coarse voxels: the speck filter alone can turn a residual above the GTR cut-off into "GTR"
        notes.append(f"voxels of {voxel_mm3:.2f} mm3: components under {min_component_voxels} voxels "
                     f"({smallest_kept_ml:.3f} ml) are removed, which is at or above the GTR cut-off of "
                     f"{cutoff_ml} ml; GTR calls on this grid are unreliable")
    measures = ResidualMeasures(
        threshold=float(threshold),
        min_component_voxels=int(min_component_voxels),
        voxels_above_threshold=int(above.sum()),
        components_removed=n_before - n_after,
        residual_voxels=int(kept.sum()),
        residual_volume_ml=residual,
        resection_status=classify_resection(residual, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive),
        gtr_cutoff_ml=float(cutoff_ml),
        gtr_rule=f"GTR if residual {'<=' if gtr_inclusive else '<'} {cutoff_ml} ml",
        preop_volume_ml=preop_volume_ml,
        eor_percent=extent_of_resection(preop_volume_ml, residual),
        gtr_inclusive=bool(gtr_inclusive),
        notes=tuple(notes),
    )
    return kept.astype(np.uint8), measures
