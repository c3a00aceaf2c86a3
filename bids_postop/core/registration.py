"""Image registration and resampling with ANTsPy, on grids defined by nibabel.

Every image enters ANTs through :func:`nifti_to_ants`, which builds the ANTs image from *nibabel's*
affine (``nib.load(path).affine``: the sform when its code is set, else the qform). ITK, which ANTs uses
to read files, may choose the other of the two when they disagree (oblique scanner files often carry a
qform that differs slightly from the sform), so ``ants.image_read`` is never used on input images:
nibabel and ANTs then agree on where every voxel lies, whatever the voxel order (LPS, RAS, LAS, oblique).

Conventions
-----------
* Arrays are indexed ``(i, j, k)`` in the file's voxel order, as nibabel returns them.
* Physical points are in millimetres. nibabel affines map voxels to RAS+ world coordinates; ANTs and
  ITK use LPS+, i.e. the same point with x and y negated.
* ANTs transforms map *fixed-space* points to *moving-space* points (the pull-back used to resample the
  moving image onto the fixed grid). ``RegistrationResult.transforms`` lists them in the order that
  ``ants.apply_transforms`` (and :func:`apply_transforms`) expects for moving → fixed resampling.

ANTs (ITK) reads the number of threads from ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once per process,
at its first operation; ``threads`` arguments set that variable, so the first ANTs call of a process
fixes the thread count for the rest of it (export the variable to be explicit). With one thread and a
given seed, results are bit-for-bit reproducible; with several threads ITK splits the metric's work
dynamically and reruns differ slightly (hundredths of a millimetre).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import nibabel as nib
import numpy as np

from bids_postop.core.images import load_3d, voxel_sizes, write_like
from bids_postop.errors import InputDataError

if TYPE_CHECKING:  # ANTsPy takes ~1.5 s to import: import it only where it is used
    import ants

RegistrationKind = Literal["rigid", "affine", "syn"]
Interpolation = Literal["linear", "nearest"]

_ANTS_TYPE: dict[str, str] = {"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}
_ANTS_INTERPOLATOR: dict[str, str] = {"linear": "linear", "nearest": "nearestNeighbor"}
# ANTsPy's SyN: an affine stage (shrink 4x2x2x1), then SyN at shrink factors 4x2x1 with these iterations.
# No iterations at full resolution: on 1-2 mm brain images this keeps SyN under ~1 min on 2 cores.
SYN_ITERATIONS: tuple[int, int, int] = (40, 20, 0)
# Rigid/affine: ANTsPy iterates (2100, 1200, 1200, 10) at shrink factors 6x4x2x1. On images whose voxels
# are all at most FINE_VOXEL_MM, the 10 full-resolution iterations cost half the run time for a gain of
# under 0.01 mm (1 mm BraTS scan, known 6 degree / 5.6 mm motion: mean error 0.008 vs 0.014 mm, 61 vs
# 32 s CPU), so they are skipped there, as ANTsPy's own SyN preset does for its affine stage.
FINE_VOXEL_MM = 1.25
_AFFINE_ITERATIONS_FINE_VOXELS: tuple[int, int, int, int] = (2100, 1200, 1200, 0)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of :func:`register`.

    Attributes
    ----------
    transforms : tuple of Path
        Forward transform files (``*GenericAffine.mat`` and, for SyN, ``*Warp.nii.gz``), written next
        to ``out_prefix``, in the order ``ants.apply_transforms`` wants to resample the moving image
        onto the fixed grid (they map fixed-space LPS points to moving-space LPS points).
    kind : {"rigid", "affine", "syn"}
        The transformation model that was estimated.
    """

    transforms: tuple[Path, ...]
    kind: RegistrationKind


def _import_ants(threads: int) -> Any:
    """Import ANTsPy after setting ITK's thread count (read by ITK at its first operation only)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1; got {threads}")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    import ants

    return ants


def ants_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """ITK origin, spacing and direction (LPS+) equivalent to a nibabel voxel-to-RAS+ affine.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        nibabel affine mapping voxel indices ``(i, j, k)`` to RAS+ millimetres.

    Returns
    -------
    origin : tuple of 3 float
        LPS+ position (mm) of voxel ``(0, 0, 0)``.
    spacing : tuple of 3 float
        Voxel size (mm) along ``i, j, k``: the norms of the affine's first three columns.
    direction : ndarray, shape (3, 3)
        LPS+ unit vectors of the ``i, j, k`` axes, as columns.
    """
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine has a zero-length or non-finite voxel axis:\n{affine}")
    direction = _RAS_TO_LPS @ (linear / spacing)
    origin = _RAS_TO_LPS @ affine[:3, 3]
    return tuple(float(v) for v in origin), tuple(float(v) for v in spacing), direction


def nifti_to_ants(img: nib.spatialimages.SpatialImage) -> ants.ANTsImage:
    """Build a float32 ANTs image from nibabel's view of a NIfTI image.

    ANTs physical point (LPS+) of voxel ``(i, j, k)`` equals ``img.affine @ (i, j, k, 1)`` with x and
    y negated, for any voxel order and for oblique affines.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A 3-D image (a 4-D image with a single volume is squeezed). Scaling (scl_slope/inter) is applied.

    Returns
    -------
    ants.ANTsImage
        Same voxel array (``(i, j, k)`` order, float32) with origin, spacing and direction derived from
        ``img.affine`` by :func:`ants_geometry`.
    """
    import ants

    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"a 3-D image is needed; got shape {img.shape}")
    data = np.ascontiguousarray(img.get_fdata(dtype=np.float32).reshape(shape))
    origin, spacing, direction = ants_geometry(img.affine)
    return ants.from_numpy(data, origin=origin, spacing=spacing, direction=direction)


def _check_same_grid(
    mask: nib.spatialimages.SpatialImage, image: nib.spatialimages.SpatialImage, mask_path: Path, image_path: Path
) -> None:
    if mask.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InputDataError(
            f"the mask is not on the grid of {image_path} (mask shape {mask.shape[:3]} vs "
            f"{image.shape[:3]}, or different affine): resample it onto that image first",
            mask_path,
        )


def register(
    fixed: str | Path,
    moving: str | Path,
    *,
    kind: RegistrationKind,
    out_prefix: str | Path,
    threads: int = 1,
    fixed_mask: str | Path | None = None,
    seed: int = 42,
) -> RegistrationResult:
    """Estimate the transform that aligns ``moving`` to ``fixed`` (Mattes mutual information).

    Parameters
    ----------
    fixed, moving : str or Path
        3-D NIfTI images (any voxel order, oblique allowed; 4-D single-volume files are squeezed).
        Different contrasts are fine (mutual information).
    kind : {"rigid", "affine", "syn"}
        ``"rigid"`` (6 parameters), ``"affine"`` (12) or ``"syn"`` (affine followed by a symmetric
        diffeomorphic SyN stage at 1/4 and 1/2 resolution, ``SYN_ITERATIONS``). Rigid and affine run at
        1/6, 1/4, 1/2 and (unless all fixed voxels are at most ``FINE_VOXEL_MM``) full resolution.
    out_prefix : str or Path
        Path prefix of the transform files, e.g. ``work/sub-01_from-T1w_to-T1wCE_``; writes
        ``<out_prefix>0GenericAffine.mat`` and, for SyN, ``<out_prefix>1Warp.nii.gz`` (a displacement
        field on the fixed grid, LPS mm). Parent folders are created.
    threads : int
        ITK threads (see the module notes: fixed at the first ANTs call of the process).
    fixed_mask : str or Path, optional
        Binary mask on the fixed grid (e.g. the brain); restricts the similarity metric to it, in all
        stages.
    seed : int
        Random seed of the metric's point sampling; with one ITK thread, reruns give identical transforms.

    Returns
    -------
    RegistrationResult
        The forward transform files (moving → fixed resampling order) and the kind.

    Raises
    ------
    InputDataError
        When an image cannot be read or the mask is not on the fixed grid.
    """
    if kind not in _ANTS_TYPE:
        raise ValueError(f"kind must be one of {sorted(_ANTS_TYPE)}; got {kind!r}")
    fixed, moving = Path(fixed), Path(moving)
    fixed_img = load_3d(fixed, what="fixed image")
    moving_img = load_3d(moving, what="moving image")
    ants = _import_ants(threads)
    params: dict[str, Any] = {}
    if fixed_mask is not None:
        fixed_mask = Path(fixed_mask)
        mask_img = load_3d(fixed_mask, what="fixed-image mask")
        _check_same_grid(mask_img, fixed_img, fixed_mask, fixed)
        mask = nifti_to_ants(mask_img)
        if float(mask.sum()) == 0:
            raise InputDataError("the fixed-image mask is empty", fixed_mask)
        params.update(mask=mask, mask_all_stages=True)
    if kind == "syn":
        params.update(reg_iterations=SYN_ITERATIONS)
    elif max(voxel_sizes(fixed_img)) <= FINE_VOXEL_MM:
        params.update(aff_iterations=_AFFINE_ITERATIONS_FINE_VOXELS)

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    previous_seed = ants.config._random_seed
    with tempfile.TemporaryDirectory(prefix="bids_postop_reg_") as tmp:
        tmp_prefix = str(Path(tmp) / "reg_")
        # ANTsPy 0.6.3 reads the seed from ants.config only (a random_seed keyword is silently ignored)
        ants.config._random_seed = int(seed)
        try:
            result = ants.registration(
                fixed=nifti_to_ants(fixed_img),
                moving=nifti_to_ants(moving_img),
                type_of_transform=_ANTS_TYPE[kind],
                outprefix=tmp_prefix,
                **params,
            )
        finally:
            ants.config._random_seed = previous_seed
        transforms = []
        for source in result["fwdtransforms"]:
            target = Path(f"{out_prefix}{Path(source).name[len('reg_') :]}")
            shutil.copyfile(source, target)
            transforms.append(target)
    return RegistrationResult(transforms=tuple(transforms), kind=kind)


def _output_dtype(values: np.ndarray, interpolation: Interpolation) -> type:
    """float32 for linear; for nearest, the smallest of uint8 / int32 that holds integer labels."""
    if interpolation == "linear":
        return np.float32
    if values.size and np.all(values == np.round(values)):
        if values.min() >= 0 and values.max() <= 255:
            return np.uint8
        if values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max:
            return np.int32
    return np.float32


def apply_transforms(
    moving: str | Path,
    reference: str | Path,
    transforms: Sequence[str | Path],
    *,
    interpolation: Interpolation,
    out_file: str | Path,
) -> Path:
    """Resample ``moving`` onto the grid of ``reference`` through ``transforms``.

    Parameters
    ----------
    moving : str or Path
        3-D NIfTI image to resample (4-D single-volume files are squeezed).
    reference : str or Path
        3-D NIfTI image defining the output grid.
    transforms : sequence of Path
        Transform files mapping reference-space points to moving-space points, in ANTs order
        (``RegistrationResult.transforms`` of ``register(fixed=reference, moving=moving)``). An empty
        sequence resamples through the identity (physical space).
    interpolation : {"linear", "nearest"}
        ``"linear"`` for intensities (written as float32); ``"nearest"`` for masks and label maps
        (written as uint8 when the labels fit, e.g. a 0/1 mask stays 0/1; int32 or float32 otherwise).
    out_file : str or Path
        Output NIfTI path. Points outside the moving image get 0.

    Returns
    -------
    Path
        ``out_file``: exactly the reference's shape (first three axes) and nibabel affine
        (``nib.load(reference).affine``), with the reference's sform/qform codes.
    """
    if interpolation not in _ANTS_INTERPOLATOR:
        raise ValueError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    moving, reference = Path(moving), Path(reference)
    moving_img = load_3d(moving, what="image to resample")
    reference_img = load_3d(reference, what="reference image")
    transforms = [Path(t) for t in transforms]
    for transform in transforms:
        if not transform.is_file():
            raise InputDataError("transform file not found", transform)
    import ants

    fixed_ants = nifti_to_ants(reference_img)
    moving_ants = nifti_to_ants(moving_img)
    with tempfile.TemporaryDirectory(prefix="bids_postop_resample_") as tmp:
        if not transforms:
            identity = Path(tmp) / "identity.mat"
            ants.write_transform(
                ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(identity)
            )
            transforms = [identity]
        resampled = ants.apply_transforms(
            fixed=fixed_ants,
            moving=moving_ants,
            transformlist=[str(t) for t in transforms],
            interpolator=_ANTS_INTERPOLATOR[interpolation],
            defaultvalue=0,
        )
    values = resampled.numpy()
    if values.shape != reference_img.shape[:3]:  # cannot happen with ANTs; guard against silent misuse
        raise RuntimeError(f"ANTs returned shape {values.shape}, expected {reference_img.shape[:3]}")
    dtype = _output_dtype(values, interpolation)
    if dtype is not np.float32:
        values = np.round(values)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return write_like(values, reference_img, out_file, dtype=dtype)
