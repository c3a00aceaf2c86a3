"""Loading and checking NIfTI images, and lossless reorientation to and from RAS+ voxel order.

Every output of the pipeline lies on the post-operative T1w-CE grid. Networks, however, are trained on
images in one voxel order. The functions here move arrays between a file's own voxel order and RAS+
(``nibabel.as_closest_canonical``) by axis flips and permutations only: no interpolation, so the round
trip is exact.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from bids_postop.errors import InputDataError


def load_3d(path: str | Path, *, what: str = "image") -> nib.Nifti1Image:
    """Load a 3-D NIfTI image and check that it is usable.

    A 4-D image with a single volume is squeezed to 3-D. Raises :class:`InputDataError` naming the file
    when it cannot be read, is not 3-D, or holds NaN/Inf voxels or a non-invertible affine.

    Returns a ``Nifti1Image`` whose data (not yet loaded into memory) is 3-D.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for damaged files
        raise InputDataError(f"cannot read the {what} as NIfTI ({exc.__class__.__name__}: {exc})", path) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputDataError(f"the {what} is not a NIfTI image ({type(img).__name__})", path)
    shape = img.shape
    if 0 in shape:
        raise InputDataError(f"the {what} has shape {shape}: an axis without voxels", path)
    if len(shape) == 4 and shape[3] == 1:
        pass  # a 4-D image holding one volume is a 3-D image
    elif len(shape) != 3:
        raise InputDataError(
            f"the {what} has shape {shape}; a 3-D image (or a 4-D image with one volume) is needed", path
        )
    dtype = img.get_data_dtype()
    if dtype.names is not None or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputDataError(f"the {what} has voxel type {dtype} (RGB or complex?); real-valued voxels are needed",
                             path)
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputDataError(f"the {what} has an invalid (non-invertible) affine:\n{affine}", path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputDataError(f"the {what}'s voxel data cannot be read (truncated or corrupt file?): {exc}",
                             path) from exc
    if data.ndim == 4:
        data = data[..., 0]
    if np.issubdtype(data.dtype, np.complexfloating) or not np.issubdtype(data.dtype, np.number):
        raise InputDataError(f"the {what}'s voxels are of type {data.dtype}; real-valued voxels are needed", path)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InputDataError(f"the {what} holds NaN or infinite voxels", path)
    return nib.Nifti1Image(data, affine, img.header)


def voxel_sizes(img: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """Voxel sizes in mm along the three voxel axes, from the affine (not the possibly stale pixdim)."""
    sizes = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    return float(sizes[0]), float(sizes[1]), float(sizes[2])


def _to_ras_transform(affine: np.ndarray) -> np.ndarray:
    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("R", "A", "S")))


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder a (x, y, z[, ...]) array from the voxel order of ``affine`` to the closest RAS+ order."""
    return nio.apply_orientation(array, _to_ras_transform(affine))


def from_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ras`: put a RAS+-ordered array back into the voxel order of ``affine``."""
    ras_to_native = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.io_orientation(affine))
    return nio.apply_orientation(array, ras_to_native)


def ras_voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) in RAS+ voxel order, matching :func:`to_ras` arrays."""
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    order = nio.io_orientation(affine)[:, 0].astype(int)  # output axis of each input axis
    ras = np.empty(3)
    ras[order] = sizes
    return float(ras[0]), float(ras[1]), float(ras[2])


# The one definition of "the same grid" (channels, masks, figures, registration and brain masks all use it): the
# same shape, and no voxel placed more than this far apart by the two affines. In mm of the scanner's space, over
# the whole field of view: an affine difference in the voxel size counts as much as it moves the far corner (a
# per-entry tolerance would let 0.01 mm/voxel through, 2.6 mm across 256 voxels). 0.01 mm is 1 % of a 1 mm voxel;
# it absorbs the float32 rounding of affines written by other tools (ITK-SNAP, FSL: ~1e-5 mm).
GRID_TOLERANCE_MM = 0.01


def grid_offset_mm(shape: tuple[int, ...], affine_a: np.ndarray, affine_b: np.ndarray) -> float:
    """The largest distance (mm) between where ``affine_a`` and ``affine_b`` put the same voxel of a grid of
    ``shape``: at one of the grid's corner voxels (the difference of two affine maps is affine, so its largest
    norm over the box is at a corner)."""
    corners = np.array(list(itertools.product(*[(0, max(int(n) - 1, 0)) for n in shape[:3]])), dtype=float)
    homogeneous = np.c_[corners, np.ones(len(corners))]
    moved = (np.asarray(affine_a, dtype=float) - np.asarray(affine_b, dtype=float)) @ homogeneous.T
    return float(np.sqrt((moved[:3] ** 2).sum(axis=0)).max())


def grid_mismatch(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage, *,
                  tol_mm: float = GRID_TOLERANCE_MM) -> str | None:
    """``None`` when ``a`` and ``b`` are on the same grid (:data:`GRID_TOLERANCE_MM`), else what differs, in words
    (for error messages)."""
    if a.shape[:3] != b.shape[:3]:
        return f"shape {tuple(a.shape[:3])} vs {tuple(b.shape[:3])}"
    offset = grid_offset_mm(a.shape, a.affine, b.affine)
    if offset > tol_mm:
        return f"same shape, but the affines place voxels up to {offset:.4g} mm apart (tolerance {tol_mm} mm)"
    return None


def same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage, *,
              tol_mm: float = GRID_TOLERANCE_MM) -> bool:
    """True when two images share shape (first three axes) and their affines place every voxel within ``tol_mm``
    of each other (:data:`GRID_TOLERANCE_MM`)."""
    return grid_mismatch(a, b, tol_mm=tol_mm) is None


# The header fields that place a NIfTI grid in space: both the qform (quaternion) and the sform (matrix), with
# their codes and the qform's handedness (pixdim[0]). Outputs copy them from their reference byte for byte.
_PLACEMENT_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                     "qoffset_z", "srow_x", "srow_y", "srow_z")


def write_like(array: np.ndarray, reference: nib.spatialimages.SpatialImage, path: str | Path, *,
               dtype: type | np.dtype = np.float32) -> Path:
    """Write ``array`` (reference voxel order) on exactly the reference's grid: the reference's qform and sform
    (matrices and codes) are kept as they are, also when they differ (some converters write a qform half a voxel
    away from the sform; a viewer reading the qform must then see the output where it sees the source)."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header)
    source = reference.header
    if int(source["qform_code"]) == 0 and int(source["sform_code"]) == 0:
        # no placement at all in the source (an Analyze-style header): state the affine used, in both forms
        out.set_sform(reference.affine, code=1)
        out.set_qform(reference.affine, code=1)
    else:
        for key in _PLACEMENT_FIELDS:
            out.header[key] = source[key]
        out.header["pixdim"][0] = source["pixdim"][0]
    out.header.set_slope_inter(1, 0)  # the array is already in its final dtype: no scaling
    path = Path(path)
    nib.save(out, str(path))
    return path
