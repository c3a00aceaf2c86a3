"""Simulated early post-operative MRI made from real pre-operative scans (demo and demo-model training).

Pure numpy/scipy. The shipped real cases (``bids_postop/data/real/<case>/``, 1.5 mm isotropic, RAS+,
skull-stripped; see the SOURCES.md there) are turned into post-operative cases on the same grid:

- a resection cavity is carved into the real tumour core (CSF-like: dark on T1w-CE, T1w and FLAIR,
  with a faint bright FLAIR rim of oedema/gliosis around it);
- for residual-tumour (RT) cases, 1–4 enhancing fragments (balls of 3–7 mm radius, 0.3–4 ml in total)
  are left on the cavity rim: bright on T1w-CE, iso-intense on T1w, bright on FLAIR;
- distractors that are *not* tumour are always added: a thin (1 voxel) enhancing rim along part of the
  cavity wall (bright on T1w-CE only) and blood products (bright on both T1w and T1w-CE);
- mild multiplicative bias fields and Gaussian noise make every seed different.

The ground-truth residual mask is the union of the fragments (empty for gross total resection, GTR).
The pre-operative T1w-CE is the real T1w-CE and the pre-operative tumour mask the real tumour mask.

This module also holds the small geometry helpers (site grids, rigid motion, resampling) that the demo
dataset writer (:mod:`bids_postop.demo.dataset`) and the training-set writer
(:mod:`bids_postop.demo.training_set`) share.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nibabel as nib
import numpy as np
from scipy import ndimage

CASE_NAMES: Final[tuple[str, ...]] = ("tcga-du-7294", "tcga-fg-6692", "brats-met-00110-000")
"""The shipped real cases (all have T1w-CE, T1w, FLAIR, a tumour mask and a brain mask)."""

INT16_MAX: Final[int] = 32767
FRAGMENT_RADIUS_MM: Final[tuple[float, float]] = (3.0, 7.0)
RESIDUAL_VOLUME_ML: Final[tuple[float, float]] = (0.3, 4.0)


def shipped_data_dir() -> Path:
    """Folder holding the shipped real cases (``bids_postop/data/real``)."""
    return Path(__file__).resolve().parents[1] / "data" / "real"


@dataclass(frozen=True, eq=False)
class RealCase:
    """One shipped real pre-operative case on its own 1.5 mm RAS+ grid.

    Images are float32 (0 outside the brain); masks are boolean; ``affine`` is the voxel-to-world
    (RAS mm) matrix shared by all arrays.
    """

    name: str
    affine: np.ndarray
    t1ce: np.ndarray
    t1: np.ndarray
    flair: np.ndarray
    tumor_mask: np.ndarray
    tumor_core_mask: np.ndarray
    brain_mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape."""
        return tuple(int(s) for s in self.t1ce.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm."""
        return voxel_sizes(self.affine)


@dataclass(frozen=True, eq=False)
class SimulatedCase:
    """A simulated post-operative case, every array on the source case's grid (``affine``).

    Images are int16 (0 outside the brain), masks uint8 (0/1). ``preop_t1ce`` and ``preop_mask`` are
    the real pre-operative T1w-CE and tumour mask on the same grid (i.e. perfectly registered).
    ``residual_mask`` is the ground truth (empty for GTR); ``cavity_mask``, ``enhancing_rim_mask`` and
    ``blood_mask`` describe what else was simulated (not tumour).
    """

    source: str
    affine: np.ndarray
    residual: bool
    postop_t1ce: np.ndarray
    postop_t1: np.ndarray
    postop_flair: np.ndarray
    preop_t1ce: np.ndarray
    preop_mask: np.ndarray
    brain_mask: np.ndarray
    residual_mask: np.ndarray
    cavity_mask: np.ndarray
    enhancing_rim_mask: np.ndarray
    blood_mask: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm."""
        return voxel_sizes(self.affine)

    @property
    def residual_volume_ml(self) -> float:
        """Ground-truth residual volume: voxel count × voxel volume / 1000."""
        return mask_volume_ml(self.residual_mask, self.affine)

    def role_images(self) -> dict[str, np.ndarray]:
        """Arrays by configuration role name (see :mod:`bids_postop.configurations`)."""
        return {
            "postop_t1ce": self.postop_t1ce,
            "postop_t1": self.postop_t1,
            "postop_flair": self.postop_flair,
            "preop_t1ce": self.preop_t1ce,
            "preop_mask": self.preop_mask,
        }


# --------------------------------------------------------------------------------------- geometry


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) of a 4×4 voxel-to-world affine."""
    z = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(z[0]), float(z[1]), float(z[2]))


def mask_volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Volume in ml of the non-zero voxels of ``mask``: count × |det(affine)| / 1000."""
    return float(np.count_nonzero(mask) * abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0)


def rotation_matrix(angles_deg: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """3×3 rotation: rotations about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rigid(
    rng: np.random.Generator,
    center: np.ndarray,
    *,
    degrees: tuple[float, float],
    mm: tuple[float, float],
) -> np.ndarray:
    """Random rigid world transform (4×4) about ``center``: a rotation of ``degrees`` total angle
    about a random axis and a translation of ``mm`` length in a random direction."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(*degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(*mm)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = center - rot @ center + shift
    return out


def axcodes_matrix(axcodes: str) -> np.ndarray:
    """Direction matrix whose columns point along the voxel axes for axis codes such as 'RAS'/'LPS'."""
    lookup = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    out = np.zeros((3, 3))
    for col, code in enumerate(axcodes.upper()):
        row, sign = lookup[code]
        out[row, col] = sign
    return out


def grid_covering(
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    axcodes: str = "RAS",
    rotation: np.ndarray | None = None,
    world_transform: np.ndarray | None = None,
    margin_mm: float = 12.0,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a grid with ``spacing`` and orientation ``axcodes`` (optionally tilted by
    the 3×3 ``rotation``) that covers the non-zero voxels of ``mask`` (after ``world_transform``,
    a 4×4 rigid motion of the object, if given) with ``margin_mm`` to spare."""
    direction = (rotation if rotation is not None else np.eye(3)) @ axcodes_matrix(axcodes)
    lin = direction @ np.diag(spacing)
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = corners @ np.asarray(affine).T
    if world_transform is not None:
        world = world @ np.asarray(world_transform).T
    grid_idx = (np.linalg.inv(lin) @ world[:, :3].T).T
    margin = margin_mm / np.asarray(spacing)
    gmin = np.floor(grid_idx.min(axis=0) - margin)
    gmax = np.ceil(grid_idx.max(axis=0) + margin)
    shape = tuple(int(v) for v in (gmax - gmin + 1))
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = lin @ gmin
    return shape, out  # type: ignore[return-value]


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, ...],
    dst_affine: np.ndarray,
    *,
    order: int,
    world_transform: np.ndarray | None = None,
) -> np.ndarray:
    """Resample ``data`` (on ``src_affine``) onto the grid (``dst_shape``, ``dst_affine``).

    ``world_transform`` (4×4) moves the object: a point ``x`` of the source appears at
    ``world_transform @ x`` in the destination. ``order`` 1 for images, 0 (nearest) for masks.
    Outside the source the result is 0. Returns float32 (order ≥ 1) or the input dtype (order 0).
    """
    inv_motion = np.eye(4) if world_transform is None else np.linalg.inv(world_transform)
    vox = np.linalg.inv(src_affine) @ inv_motion @ dst_affine
    src = data if order == 0 else data.astype(np.float32, copy=False)
    out = ndimage.affine_transform(
        src, vox[:3, :3], offset=vox[:3, 3], output_shape=tuple(dst_shape), order=order, mode="constant", cval=0
    )
    return out


class GridSampler:
    """Resample several arrays of one source grid onto the voxels ``within`` a destination grid.

    Faster than :func:`resample_to_grid` when many images share the geometry and only part of the
    destination (e.g. the brain) matters: source coordinates are computed once; voxels outside
    ``within`` are 0.
    """

    def __init__(
        self,
        src_affine: np.ndarray,
        dst_affine: np.ndarray,
        within: np.ndarray,
        *,
        world_transform: np.ndarray | None = None,
    ) -> None:
        inv_motion = np.eye(4) if world_transform is None else np.linalg.inv(world_transform)
        vox = np.linalg.inv(src_affine) @ inv_motion @ dst_affine
        self.shape = tuple(within.shape)
        self.index = np.nonzero(within)
        idx = np.stack(self.index).astype(np.float64)
        self.coords = vox[:3, :3] @ idx + vox[:3, 3:4]

    def __call__(self, data: np.ndarray, *, order: int) -> np.ndarray:
        """``data`` on the destination grid (float32 for order ≥ 1, input dtype for order 0)."""
        src = data if order == 0 else data.astype(np.float32, copy=False)
        out = np.zeros(self.shape, dtype=src.dtype)
        out[self.index] = ndimage.map_coordinates(src, self.coords, order=order, mode="constant", cval=0,
                                                  prefilter=False)
        return out


def to_int16(data: np.ndarray) -> np.ndarray:
    """Round and clip to the int16 range used for images (non-negative)."""
    return np.clip(np.rint(data), 0, INT16_MAX).astype(np.int16)


# ----------------------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=8)
def _load_case_cached(name: str, data_dir: str) -> RealCase:
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"shipped real case {name!r} not found in {data_dir}")

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        img = nib.load(str(folder / fname))
        return np.asarray(img.dataobj), img.affine

    t1ce, affine = read("t1ce.nii.gz")
    arrays = {k: read(f"{k}.nii.gz")[0] for k in ("t1", "flair", "tumor_mask", "tumor_core_mask", "brain_mask")}
    brain = arrays["brain_mask"] > 0
    out = RealCase(
        name=name,
        affine=np.asarray(affine, dtype=float),
        t1ce=t1ce.astype(np.float32),
        t1=arrays["t1"].astype(np.float32),
        flair=arrays["flair"].astype(np.float32),
        tumor_mask=(arrays["tumor_mask"] > 0) & brain,
        tumor_core_mask=(arrays["tumor_core_mask"] > 0) & brain,
        brain_mask=brain,
    )
    for arr in (out.t1ce, out.t1, out.flair, out.tumor_mask, out.tumor_core_mask, out.brain_mask, out.affine):
        arr.setflags(write=False)
    return out


def load_case(name: str, data_dir: Path | None = None) -> RealCase:
    """Load a shipped real case (read-only arrays, cached). ``name`` is one of :data:`CASE_NAMES`."""
    return _load_case_cached(name, str(data_dir or shipped_data_dir()))


# -------------------------------------------------------------------------------------- simulation


def _ball(shape: tuple[int, ...], center: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    r_vox = np.ceil(radius_mm / spacing).astype(int) + 1
    lo = np.maximum(center - r_vox, 0)
    hi = np.minimum(center + r_vox + 1, np.array(shape))
    out = np.zeros(shape, dtype=bool)
    grids = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing, strict=True))
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = d2 <= radius_mm**2
    return out


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    coords = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    poly = np.zeros(shape, dtype=np.float32)
    for c in coords:
        poly = poly + rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * (c**2 - 1 / 3)
    return np.exp(strength * poly).astype(np.float32)


def _texture(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
    noise /= max(float(noise.std()), 1e-6)
    return 1.0 + amplitude * noise


def _blend(img: np.ndarray, mask: np.ndarray, value: np.ndarray | float, sigma: float = 0.6) -> np.ndarray:
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma) if sigma > 0 else mask.astype(np.float32)
    soft = np.maximum(soft, mask.astype(np.float32))
    return img * (1.0 - soft) + value * soft


def _tissue_median(img: np.ndarray, tissue: np.ndarray) -> float:
    vals = img[tissue]
    vals = vals[vals > 0]
    return float(np.median(vals)) if vals.size else 1.0


def simulate_postop_case(case: RealCase, rng: np.random.Generator, *, residual: bool) -> SimulatedCase:
    """Simulate an early post-operative case from the real pre-operative ``case`` on its grid.

    ``residual=True`` leaves 1–4 enhancing fragments (0.3–4 ml in total) on the cavity rim (RT);
    ``residual=False`` gives a gross total resection (empty ground truth). Deterministic for a given
    state of ``rng``.
    """
    spacing = np.asarray(case.spacing)
    shape = case.shape
    brain = case.brain_mask
    core = case.tumor_core_mask if case.tumor_core_mask.any() else case.tumor_mask
    healthy = brain & ~ndimage.binary_dilation(case.tumor_mask, iterations=2)
    med = {
        "t1ce": _tissue_median(case.t1ce, healthy),
        "t1": _tissue_median(case.t1, healthy),
        "flair": _tissue_median(case.flair, healthy),
    }

    # cavity: the tumour core plus the real enhancing tumour wall next to it (so that no real
    # enhancement is left around the cavity unlabelled), possibly dilated by one voxel, kept inside the
    # (eroded) brain
    bright = case.tumor_mask & (case.t1ce > 1.5 * med["t1ce"])
    lab, _ = ndimage.label(core | bright, structure=np.ones((3, 3, 3)))
    attached = np.isin(lab, np.unique(lab[core]))  # bright tumour connected to the core
    cavity0 = ndimage.binary_fill_holes(ndimage.binary_closing(attached, iterations=1))
    if rng.random() < 0.5:
        cavity0 = ndimage.binary_dilation(cavity0)
    cavity0 &= ndimage.binary_erosion(brain, iterations=2)
    lab, n = ndimage.label(cavity0)
    if n > 1:  # keep the largest piece (a single resection cavity)
        sizes = ndimage.sum(cavity0, lab, range(1, n + 1))
        cavity0 = lab == int(np.argmax(sizes)) + 1
    rim0 = ndimage.binary_dilation(cavity0) & ~cavity0 & ndimage.binary_erosion(brain, iterations=3)
    rim_idx = np.argwhere(rim0)
    voxel_ml = float(np.prod(spacing)) / 1000.0

    fragments = np.zeros(shape, dtype=bool)
    if residual:
        for _attempt in range(50):
            n_frag = int(rng.integers(1, 5))
            cand = np.zeros(shape, dtype=bool)
            for _ in range(n_frag):
                center = rim_idx[rng.integers(len(rim_idx))]
                cand |= _ball(shape, center, float(rng.uniform(*FRAGMENT_RADIUS_MM)), spacing)
            cand &= brain
            vol = cand.sum() * voxel_ml
            if RESIDUAL_VOLUME_ML[0] <= vol <= RESIDUAL_VOLUME_ML[1]:
                fragments = cand
                break
        else:  # pragma: no cover - fallback never reached on the shipped cases
            fragments = cand
    cavity = cavity0 & ~fragments
    keep_out = ndimage.binary_dilation(fragments, iterations=2)

    # distractor 1: thin enhancing rim (1 voxel) along part of the cavity wall
    wall = ndimage.binary_dilation(cavity) & ~cavity & brain & ~keep_out
    centroid = np.argwhere(cavity).mean(axis=0)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    widx = np.argwhere(wall)
    vec = (widx - centroid) * spacing
    cosang = (vec @ direction) / np.maximum(np.linalg.norm(vec, axis=1), 1e-6)
    sel = widx[cosang > rng.uniform(-0.3, 0.4)]
    enh_rim = np.zeros(shape, dtype=bool)
    enh_rim[tuple(sel.T)] = True

    # distractor 2: blood products (1–3 small blobs on the rim or in the cavity)
    blood = np.zeros(shape, dtype=bool)
    cav_idx = np.argwhere(cavity)
    for _ in range(int(rng.integers(1, 4))):
        pool = rim_idx if rng.random() < 0.6 else cav_idx
        center = pool[rng.integers(len(pool))]
        blood |= _ball(shape, center, float(rng.uniform(2.0, 4.5)), spacing)
    blood &= brain & ~keep_out
    enh_rim &= ~blood

    # intensities
    t1ce = case.t1ce.astype(np.float32).copy()
    t1 = case.t1.astype(np.float32).copy()
    flair = case.flair.astype(np.float32).copy()
    # oedema/gliosis rim on FLAIR (faint, 2–3 voxels around the cavity)
    shell = ndimage.binary_dilation(cavity, iterations=int(rng.integers(2, 4))) & ~cavity & brain
    flair = _blend(flair, shell, np.maximum(flair, med["flair"] * rng.uniform(1.15, 1.35)), sigma=1.0)
    # CSF-like cavity
    csf = {k: med[k] * rng.uniform(0.15, 0.3) for k in med}
    t1ce = _blend(t1ce, cavity, csf["t1ce"])
    t1 = _blend(t1, cavity, csf["t1"])
    flair = _blend(flair, cavity, csf["flair"])
    # residual fragments
    if fragments.any():
        tex = _texture(shape, rng, 0.08)
        t1ce = _blend(t1ce, fragments, med["t1ce"] * rng.uniform(1.9, 2.5) * tex)
        t1 = _blend(t1, fragments, med["t1"] * rng.uniform(0.85, 1.05) * tex)
        flair = _blend(flair, fragments, med["flair"] * rng.uniform(1.4, 1.9) * tex)
    # thin enhancing rim: T1w-CE only, no blurring (1 voxel)
    t1ce = np.where(enh_rim, np.maximum(t1ce, med["t1ce"] * rng.uniform(1.6, 2.3)), t1ce)
    # blood: bright on both T1w and T1w-CE
    if blood.any():
        tex = _texture(shape, rng, 0.1)
        t1ce = _blend(t1ce, blood, med["t1ce"] * rng.uniform(1.5, 2.1) * tex)
        t1 = _blend(t1, blood, med["t1"] * rng.uniform(1.5, 2.0) * tex)
        flair = _blend(flair, blood, med["flair"] * rng.uniform(0.7, 1.5) * tex)

    # bias field, global scale, noise; 0 outside the brain
    out = {}
    for key, img in (("t1ce", t1ce), ("t1", t1), ("flair", flair)):
        img = img * _bias_field(shape, rng, 0.08) * rng.uniform(0.9, 1.1)
        img = img + rng.normal(0.0, 0.025 * med[key], size=shape).astype(np.float32)
        out[key] = to_int16(np.where(brain, img, 0.0))

    u8 = np.uint8
    return SimulatedCase(
        source=case.name,
        affine=case.affine.copy(),
        residual=bool(residual),
        postop_t1ce=out["t1ce"],
        postop_t1=out["t1"],
        postop_flair=out["flair"],
        preop_t1ce=to_int16(case.t1ce),
        preop_mask=case.tumor_mask.astype(u8),
        brain_mask=brain.astype(u8),
        residual_mask=fragments.astype(u8),
        cavity_mask=cavity.astype(u8),
        enhancing_rim_mask=enh_rim.astype(u8),
        blood_mask=blood.astype(u8),
    )
