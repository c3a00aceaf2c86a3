"""Checks for binary masks given as input (pre-operative tumour masks, manual annotations)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from bids_postop.core.images import load_3d, same_grid
from bids_postop.errors import InputDataError


def load_binary_mask(path: str | Path, *, what: str = "mask") -> nib.Nifti1Image:
    """Load a mask as uint8 0/1.

    Integer label maps (e.g. BraTS labels 1/2/4) count every non-zero voxel as inside. Raises
    :class:`InputDataError` when the values are not integers (a probability map, say) or the mask is
    empty.
    """
    img = load_3d(path, what=what)
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
            raise InputDataError(f"the {what} holds non-integer values (a probability map?); a binary 0/1 mask "
                                 f"is needed", path)
    if data.min() < 0:
        raise InputDataError(f"the {what} holds negative values; a binary 0/1 mask is needed", path)
    inside = data > 0
    if not inside.any():
        raise InputDataError(f"the {what} is empty (no voxel > 0)", path)
    out = nib.Nifti1Image(inside.astype(np.uint8), img.affine, img.header)
    out.set_data_dtype(np.uint8)
    return out


def nonenhancing_volume_ml(path: str | Path) -> float:
    """Volume (ml, voxel count × |det(affine)| / 1000) of a non-enhancing residual tumour mask; an empty mask is
    0 ml (nothing non-enhancing left). Raises :class:`InputDataError` for a non-integer or negative image."""
    from bids_postop.core.postprocess import volume_ml

    img = load_3d(path, what="non-enhancing residual tumour mask")
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.allclose(data, np.round(data)):
        raise InputDataError("the non-enhancing residual tumour mask holds non-integer values; a 0/1 mask is "
                             "needed", path)
    if data.min() < 0:
        raise InputDataError("the non-enhancing residual tumour mask holds negative values", path)
    return volume_ml(data > 0, img.affine)


def mask_matches_image(mask: nib.spatialimages.SpatialImage, image: nib.spatialimages.SpatialImage) -> bool:
    """True when a mask lies on its image's grid (:func:`bids_postop.core.images.same_grid`)."""
    return same_grid(mask, image)
