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

Working resolution (issue 18): the transforms only have to place the inputs within a voxel of the post-op grid,
and a same-session rigid transform is six numbers, so :func:`register` estimates them on copies of the images
block-averaged to about 2 mm, the fixed copy cut to the brain mask's box plus 20 mm (:data:`DEFAULT_SETTINGS`);
:func:`apply_transforms` then resamples each full-resolution image once. Measured against known transforms of real
scans and against the full-resolution result (``benchmarks/registration_accuracy.py``, ``benchmarks/RESULTS.md``):
a known rigid motion is recovered within 0.02-0.08 mm mean (full resolution: 0.01-0.10 mm) for 1.5-8x less CPU, a
known smooth warp within 0.67-0.89 mm mean (full resolution: 0.75-0.88 mm) for 9-40x less, and the transferred
pre-op mask agrees with the full-resolution transfer at Dice 0.96. :data:`FULL_RESOLUTION` keeps the previous
behaviour (ANTsPy's schedules on the images' own grids).

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

from bids_postop.core.images import grid_mismatch, load_3d, voxel_sizes, write_like
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
    # Fortran order, as NIfTI stores voxels: ants.from_numpy copies data.T in C order, a plain copy for this layout
    # (a C-order array costs two transposing copies of the whole image there: ~1 s each on a 430×461×180 grid)
    data = np.asfortranarray(img.get_fdata(dtype=np.float32).reshape(shape))
    origin, spacing, direction = ants_geometry(img.affine)
    return ants.from_numpy(data, origin=origin, spacing=spacing, direction=direction)


def _check_same_grid(
    mask: nib.spatialimages.SpatialImage, image: nib.spatialimages.SpatialImage, mask_path: Path, image_path: Path
) -> None:
    mismatch = grid_mismatch(mask, image)
    if mismatch:
        raise InputDataError(
            f"the mask is not on the grid of {image_path} ({mismatch}): resample it onto that image first",
            mask_path,
        )


@dataclass(frozen=True)
class RegistrationSettings:
    """How a transform is estimated; it is applied to the full-resolution images by :func:`apply_transforms`.

    The transforms only have to place the inputs within a voxel of the post-op grid, and a same-session rigid
    transform is six numbers: both are estimated on copies of the images block-averaged to about
    ``working_mm`` (integer factors per voxel axis, so oblique and anisotropic grids keep their axes; 0.64 mm
    voxels become 1.92 mm, 1.96 mm stay), which makes every level of the ANTs pyramid and every metric
    evaluation 10-30x cheaper on study-size grids. ``working_mm=None`` registers the images on their own grids
    (:data:`FULL_RESOLUTION`, the behaviour before issue 18).

    Attributes
    ----------
    working_mm : float or None
        Target voxel size (mm) of the block-averaged copies; an axis whose voxels are already at least this size
        is left as it is.
    crop_margin_mm : float or None
        With a fixed mask, crop the fixed copy to the mask's bounding box grown by this margin (mm); ``None``
        keeps the whole field of view (the metric is restricted to the mask either way; a SyN field then covers
        the whole fixed field of view).
    linear_shrink, linear_smoothing, linear_iterations : tuple
        Pyramid of the rigid/affine stage on the working copies: shrink factors, Gaussian sigmas (working voxels)
        and maximum iterations per level (ANTs stops a level when the metric has converged, 1e-6 over 10
        iterations).
    sampling_rate : float
        Fraction of the (masked) fixed voxels sampled, on a regular grid with random jitter (seeded), by the
        mutual-information metric of the linear stage. The SyN stage uses every masked voxel.
    syn_shrink, syn_smoothing, syn_iterations : tuple
        Pyramid of the SyN stage (``SyNOnly`` after the affine stage, same mask).
    refine_iterations : int
        Iterations of a last linear level on the images' own grids (0: none).
    """

    working_mm: float | None = 2.0
    crop_margin_mm: float | None = 20.0
    linear_shrink: tuple[int, ...] = (4, 2, 1)
    linear_smoothing: tuple[float, ...] = (2.0, 1.0, 0.0)
    linear_iterations: tuple[int, ...] = (1000, 500, 250)
    sampling_rate: float = 0.2
    syn_shrink: tuple[int, ...] = (4, 2, 1)
    syn_smoothing: tuple[float, ...] = (2.0, 1.0, 0.0)
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    refine_iterations: int = 0

    def describe(self) -> dict[str, Any]:
        """The settings as plain values (for provenance and benchmark tables)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


DEFAULT_SETTINGS = RegistrationSettings()
# ANTsPy's own schedules on the images' grids (FINE_VOXEL_MM and SYN_ITERATIONS rules): the pipeline before issue 18
FULL_RESOLUTION = RegistrationSettings(working_mm=None)


def register(
    fixed: str | Path,
    moving: str | Path,
    *,
    kind: RegistrationKind,
    out_prefix: str | Path,
    threads: int = 1,
    fixed_mask: str | Path | None = None,
    seed: int = 42,
    settings: RegistrationSettings = DEFAULT_SETTINGS,
) -> RegistrationResult:
    """Estimate the transform that aligns ``moving`` to ``fixed`` (Mattes mutual information).

    Parameters
    ----------
    fixed, moving : str or Path
        3-D NIfTI images (any voxel order, oblique allowed; 4-D single-volume files are squeezed).
        Different contrasts are fine (mutual information).
    kind : {"rigid", "affine", "syn"}
        ``"rigid"`` (6 parameters), ``"affine"`` (12) or ``"syn"`` (an affine stage followed by a symmetric
        diffeomorphic SyN stage).
    out_prefix : str or Path
        Path prefix of the transform files, e.g. ``work/sub-01_from-T1w_to-T1wCE_``; writes
        ``<out_prefix>0GenericAffine.mat`` and, for SyN, ``<out_prefix>1Warp.nii.gz`` (a displacement
        field, LPS mm, on the fixed image's working grid: with the default settings the brain box plus 20 mm
        in ~2 mm voxels; outside it the displacement is zero and the affine part alone applies). Parent
        folders are created.
    threads : int
        ITK threads (see the module notes: fixed at the first ANTs call of the process).
    fixed_mask : str or Path, optional
        Binary mask on the fixed grid (e.g. the brain); restricts the similarity metric to it, in all
        stages.
    seed : int
        Random seed of the metric's point sampling; with one ITK thread, reruns give identical transforms.
    settings : RegistrationSettings
        Working resolution and schedules (:data:`DEFAULT_SETTINGS`; :data:`FULL_RESOLUTION` for ANTsPy's
        schedules on the images' own grids).

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
    mask_img = None
    if fixed_mask is not None:
        fixed_mask = Path(fixed_mask)
        mask_img = load_3d(fixed_mask, what="fixed-image mask")
        _check_same_grid(mask_img, fixed_img, fixed_mask, fixed)
        if not np.asanyarray(mask_img.dataobj).any():
            raise InputDataError("the fixed-image mask is empty", fixed_mask)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bids_postop_reg_") as tmp:
        tmp_prefix = str(Path(tmp) / "reg_")
        if settings.working_mm is None:
            sources = _register_ants_schedules(ants, fixed_img, moving_img, mask_img, kind=kind, prefix=tmp_prefix,
                                               seed=seed)
        else:
            sources = _register_working_grids(ants, fixed_img, moving_img, mask_img, kind=kind, prefix=tmp_prefix,
                                              seed=seed, settings=settings)
        transforms = []
        for source in sources:
            target = Path(f"{out_prefix}{Path(source).name[len('reg_') :]}")
            shutil.copyfile(source, target)
            transforms.append(target)
    return RegistrationResult(transforms=tuple(transforms), kind=kind)


def _register_ants_schedules(ants: Any, fixed_img: nib.Nifti1Image, moving_img: nib.Nifti1Image,
                             mask_img: nib.Nifti1Image | None, *, kind: RegistrationKind, prefix: str,
                             seed: int) -> list[str]:
    """``ants.registration`` on the images' own grids with ANTsPy's schedules (:data:`FULL_RESOLUTION`)."""
    params: dict[str, Any] = {}
    if mask_img is not None:
        params.update(mask=nifti_to_ants(mask_img), mask_all_stages=True)
    if kind == "syn":
        params.update(reg_iterations=SYN_ITERATIONS)
    elif max(voxel_sizes(fixed_img)) <= FINE_VOXEL_MM:
        params.update(aff_iterations=_AFFINE_ITERATIONS_FINE_VOXELS)
    previous_seed = ants.config._random_seed
    # ANTsPy 0.6.3 reads the seed from ants.config only (a random_seed keyword is silently ignored)
    ants.config._random_seed = int(seed)
    try:
        result = ants.registration(fixed=nifti_to_ants(fixed_img), moving=nifti_to_ants(moving_img),
                                   type_of_transform=_ANTS_TYPE[kind], outprefix=prefix, **params)
    finally:
        ants.config._random_seed = previous_seed
    return list(result["fwdtransforms"])


def block_factors(spacing: Sequence[float], working_mm: float) -> tuple[int, int, int]:
    """Integer block size per voxel axis that brings ``spacing`` closest to ``working_mm`` without going below
    the voxel (0.64 mm → 3, 0.9 mm → 2, 1.96 mm → 1)."""
    f = [max(1, int(round(working_mm / float(s)))) for s in spacing[:3]]
    return f[0], f[1], f[2]


def block_average(img: nib.Nifti1Image, factors: Sequence[int], *, box: tuple[slice, ...] | None = None,
                  how: Literal["mean", "max"] = "mean") -> nib.Nifti1Image:
    """``img`` (optionally cut to ``box`` first) reduced by blocks of ``factors`` voxels, float32.

    Blocks start at the first voxel of the box; an incomplete last block of an axis is dropped. The affine maps
    each output voxel to the centre of its block, so the image stays where it was in the world, on its own
    (possibly oblique) axes.
    """
    box = box or tuple(slice(0, n) for n in img.shape[:3])
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3])[box]
    f = [int(v) for v in factors]
    n = [max(1, s // k) for s, k in zip(data.shape, f, strict=True)]
    f = [k if s >= k else s for s, k in zip(data.shape, f, strict=True)]  # an axis shorter than its block: one voxel
    reduced: np.ndarray | None = None
    # one strided view per offset inside the block, accumulated: ~10x faster than a 6-D reshape and mean
    for a in range(f[0]):
        for b in range(f[1]):
            for c in range(f[2]):
                part = data[a : n[0] * f[0] : f[0], b : n[1] * f[1] : f[1], c : n[2] * f[2] : f[2]]
                if reduced is None:
                    reduced = np.array(part, dtype=np.float32)
                elif how == "max":
                    np.maximum(reduced, part, out=reduced)
                else:
                    reduced += part
    assert reduced is not None
    if how != "max":
        reduced /= float(np.prod(f))
    start = np.array([s.start or 0 for s in box], dtype=float)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = start + (np.array(f) - 1) / 2
    return nib.Nifti1Image(np.ascontiguousarray(reduced, dtype=np.float32), img.affine @ scale)


def _mask_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, slice, slice]:
    """Bounding box of the mask's nonzero voxels grown by ``margin_mm`` along each voxel axis."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        grow = int(np.ceil(margin_mm / float(spacing[axis])))
        box.append(slice(max(0, int(hit[0]) - grow), min(mask.shape[axis], int(hit[-1]) + 1 + grow)))
    return box[0], box[1], box[2]


def _centre_of_mass(img: nib.Nifti1Image) -> np.ndarray:
    """Intensity-weighted centre (RAS mm) of an image; its field of view's centre when the intensities sum to 0."""
    data = np.asanyarray(img.dataobj, dtype=np.float64).reshape(img.shape[:3])
    total = float(data.sum())
    if total <= 0:
        index = (np.array(data.shape, dtype=float) - 1) / 2
    else:
        index = np.array([float((data.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(n)).sum())
                          for axis, n in enumerate(data.shape)]) / total
    return (img.affine @ np.array([*index, 1.0]))[:3]


def _x(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _register_working_grids(ants: Any, fixed_img: nib.Nifti1Image, moving_img: nib.Nifti1Image,
                            mask_img: nib.Nifti1Image | None, *, kind: RegistrationKind, prefix: str, seed: int,
                            settings: RegistrationSettings) -> list[str]:
    """antsRegistration on block-averaged copies (see :class:`RegistrationSettings`); returns the forward
    transform files (``1Warp`` before ``0GenericAffine`` for SyN)."""
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    working_mm = float(settings.working_mm or 0.0)
    box = None
    if mask_img is not None and settings.crop_margin_mm is not None:
        box = _mask_box(np.asanyarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0, voxel_sizes(mask_img),
                        settings.crop_margin_mm)
    fixed_factors = block_factors(voxel_sizes(fixed_img), working_mm)
    fixed_whole = block_average(fixed_img, fixed_factors)
    moving_working = block_average(moving_img, block_factors(voxel_sizes(moving_img), working_mm))
    images = {"fixed": nifti_to_ants(block_average(fixed_img, fixed_factors, box=box) if box else fixed_whole),
              "moving": nifti_to_ants(moving_working)}
    # initial transform: the images' intensity centres of mass aligned, over their whole fields of view (what
    # ANTsPy's default initialisation does on the full images; the fixed copy's crop must not move it)
    initial = f"{prefix}initial.mat"
    centre_fixed, centre_moving = _centre_of_mass(fixed_whole) * _RAS_TO_LPS.diagonal(), \
        _centre_of_mass(moving_working) * _RAS_TO_LPS.diagonal()
    ants.write_transform(ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, center=tuple(float(v) for v in centre_fixed),
        translation=tuple(float(v) for v in centre_moving - centre_fixed)), initial)
    del fixed_whole, moving_working
    mask_option = "[NA,NA]"
    if mask_img is not None:
        # a working voxel belongs to the mask when any of its block does: the metric sees the whole brain edge
        images["mask"] = nifti_to_ants(block_average(mask_img, fixed_factors, box=box, how="max")) != 0
        mask_option = f"[{get_pointer_string(images['mask'])},NA]"
    f, m = get_pointer_string(images["fixed"]), get_pointer_string(images["moving"])
    linear = "Rigid" if kind == "rigid" else "Affine"
    args: list[str] = [
        "--dimensionality", "3", "--float", "1", "-u", "0", "-z", "1", "--random-seed", str(int(seed)),
        "--write-composite-transform", "0",
        "-r", initial,
        "--metric", f"mattes[{f},{m},1,32,regular,{settings.sampling_rate:g}]",
        "--transform", f"{linear}[0.25]",
        "--convergence", f"[{_x(settings.linear_iterations)},1e-6,10]",
        "--smoothing-sigmas", _x(settings.linear_smoothing), "--shrink-factors", _x(settings.linear_shrink),
        "-x", mask_option,
    ]
    if kind == "syn":
        args += [
            "--metric", f"mattes[{f},{m},1,32]",
            "--transform", "SyN[0.2,3,0]",
            "--convergence", f"[{_x(settings.syn_iterations)},1e-7,8]",
            "--smoothing-sigmas", _x(settings.syn_smoothing), "--shrink-factors", _x(settings.syn_shrink),
            "-x", mask_option,
        ]
    args += ["--output", prefix]
    _run_ants_registration(get_lib_fn, process_arguments, args)
    affine_file = f"{prefix}0GenericAffine.mat"
    if settings.refine_iterations > 0 and kind != "syn":  # a linear refinement after SyN would undo the warp
        affine_file = _refine_full_resolution(ants, fixed_img, moving_img, mask_img, initial=affine_file,
                                              linear=linear, prefix=f"{prefix}refine_", seed=seed, settings=settings)
        shutil.move(affine_file, f"{prefix}0GenericAffine.mat")
        affine_file = f"{prefix}0GenericAffine.mat"
    return [f"{prefix}1Warp.nii.gz", affine_file] if kind == "syn" else [affine_file]


def _run_ants_registration(get_lib_fn: Any, process_arguments: Any, args: list[str]) -> None:
    code = get_lib_fn("antsRegistration")(process_arguments(args))
    if code != 0:
        raise RuntimeError(f"antsRegistration failed with exit code {code}")


def _refine_full_resolution(ants: Any, fixed_img: nib.Nifti1Image, moving_img: nib.Nifti1Image,
                            mask_img: nib.Nifti1Image | None, *, initial: str, linear: str, prefix: str, seed: int,
                            settings: RegistrationSettings) -> str:
    """One more linear level on the images' own grids, from ``initial``; returns the refined affine file."""
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    images = {"fixed": nifti_to_ants(fixed_img), "moving": nifti_to_ants(moving_img)}
    mask_option = "[NA,NA]"
    if mask_img is not None:
        images["mask"] = nifti_to_ants(mask_img) != 0
        mask_option = f"[{get_pointer_string(images['mask'])},NA]"
    f, m = get_pointer_string(images["fixed"]), get_pointer_string(images["moving"])
    args = ["--dimensionality", "3", "--float", "1", "-u", "0", "-z", "1", "--random-seed", str(int(seed)),
            "--write-composite-transform", "0", "-r", initial,
            "--metric", f"mattes[{f},{m},1,32,regular,{settings.sampling_rate:g}]",
            "--transform", f"{linear}[0.1]", "--convergence", f"[{settings.refine_iterations},1e-6,10]",
            "--smoothing-sigmas", "0", "--shrink-factors", "1", "-x", mask_option, "--output", prefix]
    _run_ants_registration(get_lib_fn, process_arguments, args)
    return f"{prefix}0GenericAffine.mat"


def _load_grid(path: Path, *, what: str) -> nib.Nifti1Image:
    """A NIfTI image's header (shape and affine checked as :func:`load_3d` does), without reading its voxels."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for damaged files
        raise InputDataError(f"cannot read the {what} as NIfTI ({exc.__class__.__name__}: {exc})", path) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputDataError(f"the {what} is not a NIfTI image ({type(img).__name__})", path)
    shape = img.shape
    if 0 in shape or not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise InputDataError(f"the {what} has shape {shape}; a 3-D image (or a 4-D image with one volume) is needed",
                             path)
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputDataError(f"the {what} has an invalid (non-invertible) affine:\n{img.affine}", path)
    return img


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
    reference_img = _load_grid(reference, what="reference image")
    transforms = [Path(t) for t in transforms]
    for transform in transforms:
        if not transform.is_file():
            raise InputDataError("transform file not found", transform)
    import ants

    # the reference only gives the output grid: its voxels are neither read nor converted (on a 430×461×180
    # T1w-CE that was a gzip decompression and two float copies per resampled image)
    origin, spacing, direction = ants_geometry(reference_img.affine)
    fixed_ants = ants.from_numpy(np.zeros(reference_img.shape[:3], np.float32, order="F"), origin=origin,
                                 spacing=spacing, direction=direction)
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
            singleprecision=True,  # float32 like the inputs and the output (ANTsPy's default copies both to double)
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
