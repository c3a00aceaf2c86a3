"""Bidimensional product of the residual tumour (RANO measurable-disease convention), on axial slices.

RANO (Wen et al., J Clin Oncol 2010;28:1963-1972) measures each contrast-enhancing lesion on axial images: the
longest diameter, the longest diameter perpendicular to it on the same image, and their product; a lesion is
measurable when both diameters are at least 10 mm and it is visible on two or more axial slices; with several
lesions the products of the largest measurable ones (at most 5) are summed. docs/rano.md has the sources.

How this module measures (the choices are documented in docs/rano.md):

* components: 26-connected components of the mask on its own voxel grid;
* axial frame: each component is resampled onto a grid aligned with the patient's RAS axes (slices of constant
  S), in-plane spacing = the finest spacing of the two source axes that lie closest to the axial plane, slice
  spacing = the spacing of the source axis closest to S, the grid anchored at the source's voxel (0, 0, 0): an
  axial acquisition with square in-plane voxels is sampled at its own voxel centres (no interpolation), any
  other is resampled with trilinear interpolation of the 0/1 mask thresholded at 0.5, whose boundary lies on the faces
  between inside and outside voxels (nearest neighbour would shift it by up to half a voxel diagonal);
* outline of a cross-section: the 0.5 level of the bilinearly interpolated slice; on a 0/1 slice its crossings
  of the pixel grid are the midpoints of the edges between inside and outside pixels, so a box of n pixels
  measures n pixels (voxel boundaries, as calipers placed at the visible edges; centre-to-centre would be n-1);
* longest diameter: the largest distance between two outline points (maximal Feret diameter);
* perpendicular diameter: the longest segment perpendicular to it that lies inside the cross-section, on the
  same slice (lines every quarter pixel, end points at the interpolated 0.5 crossings);
* the measured slice: among the slices whose longest diameter is within one in-plane pixel of the component's
  maximum, the one with the largest product (the middle one on ties).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from bids_postop.core.postprocess import VOLUME_DECIMALS, voxel_volume_mm3

MEASURABLE_MIN_MM = 10.0  # RANO 2010: both perpendicular diameters >= 10 mm
MIN_AXIAL_SLICES = 2  # RANO 2010: visible on two or more axial slices
RANO_2010_MAX_LESIONS = 5  # RANO 2010: the products of at most the 5 largest measurable lesions are summed
_EPS_MM = 1e-6  # a diameter of 10 mm minus floating-point noise still counts as 10 mm

Point = tuple[float, float, float]


@dataclass(frozen=True)
class ComponentMeasure:
    """Bidimensional measures of one 26-connected component. Points are RAS+ world coordinates (x, y, z) in mm.

    Attributes
    ----------
    index
        The component's label, 1-based, in the scan order of the source voxel grid.
    n_voxels, volume_ml
        Size on the source grid: voxel count, and volume in ml (voxel count × |det(affine)| / 1000).
    slice_z_mm
        S coordinate (mm) of the axial slice measured.
    n_axial_slices
        Number of slices of the axial grid (``BidimensionalSummary.axial_spacing_mm``) the component appears on.
    longest_mm, longest_end_points
        Longest in-plane diameter (mm) on that slice and its two end points.
    perpendicular_mm, perpendicular_end_points
        Longest diameter perpendicular to it inside the lesion on the same slice (mm) and its end points.
    product_mm2
        ``longest_mm * perpendicular_mm`` (mm²).
    measurable
        Both diameters ≥ the minimum (10 mm) and seen on at least the minimum number of axial slices (2).

    A component too small to survive the axial resampling has zero diameters, its end points at its centroid.
    """

    index: int
    n_voxels: int
    volume_ml: float
    slice_z_mm: float
    n_axial_slices: int
    longest_mm: float
    longest_end_points: tuple[Point, Point]
    perpendicular_mm: float
    perpendicular_end_points: tuple[Point, Point]
    product_mm2: float
    measurable: bool


@dataclass(frozen=True)
class BidimensionalSummary:
    """All components (label order), how many are measurable, and the sum of products (mm²) over the
    ``max_lesions`` largest measurable ones (``summed``: their indices, largest product first)."""

    components: tuple[ComponentMeasure, ...]
    n_measurable: int
    sum_products_mm2: float
    summed: tuple[int, ...]
    max_lesions: int
    axial_spacing_mm: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def axial_spacing(affine: np.ndarray, *, in_plane_mm: float | None = None) -> tuple[float, float, float]:
    """Spacing (mm) of the RAS-aligned axial grid for an image with this voxel-to-RAS ``affine`` (4×4).

    Slice spacing: the voxel size of the source axis closest to S. In-plane: ``in_plane_mm``, else the finest
    voxel size of the two other source axes. For an axial 0.5×0.5×5 mm acquisition: (0.5, 0.5, 5.0).
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.linalg.norm(m, axis=0)
    s_axis = int(np.argmax(np.abs(m[2]) / sizes))
    in_plane = float(min(sizes[a] for a in range(3) if a != s_axis)) if in_plane_mm is None else float(in_plane_mm)
    if not in_plane > 0:
        raise ValueError(f"in_plane_mm must be > 0; got {in_plane_mm}")
    return in_plane, in_plane, float(sizes[s_axis])


def _resample_axial(crop: np.ndarray, crop_affine: np.ndarray, spacing: np.ndarray, anchor: np.ndarray):
    """Trilinear resampling of a 0/1 crop (zero border) onto the RAS grid ``anchor + k * spacing``: a float32
    (x, y, z) stack (inside where >= 0.5) and the world coordinates of its x, y, z grid lines."""
    n = np.array(crop.shape, dtype=np.float64)
    box = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = box @ crop_affine[:3, :3].T + crop_affine[:3, 3]
    lo = np.floor((world.min(0) - anchor) / spacing).astype(int) - 1
    hi = np.ceil((world.max(0) - anchor) / spacing).astype(int) + 1
    axes = [anchor[a] + np.arange(lo[a], hi[a] + 1) * spacing[a] for a in range(3)]
    to_voxel = np.linalg.inv(crop_affine)
    gx, gy = np.meshgrid(axes[0], axes[1], indexing="ij")
    values = crop.astype(np.float32)
    stack = np.zeros((axes[0].size, axes[1].size, axes[2].size), dtype=np.float32)
    for k, z in enumerate(axes[2]):
        pts = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z)], axis=1)
        vox = pts @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        stack[:, :, k] = ndimage.map_coordinates(values, vox.T, order=1, mode="constant", cval=0.0,
                                                 prefilter=False).reshape(gx.shape)
    return stack, axes


def _outline(section: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Points (x, y) where the 0.5 level crosses the edges between inside (>= 0.5) and outside pixel centres of
    a 2-D section, linearly interpolated: the midpoints of the pixel edges for a 0/1 section. Shape (N, 2)."""
    padded = np.pad(section, 1)
    inner = padded[1:-1, 1:-1]
    dx, dy = xs[1] - xs[0], ys[1] - ys[0]
    points = []
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        neighbour = padded[1 + di:padded.shape[0] - 1 + di, 1 + dj:padded.shape[1] - 1 + dj]
        i, j = np.nonzero((inner >= 0.5) & (neighbour < 0.5))
        v_in, v_out = inner[i, j], neighbour[i, j]
        t = (v_in - 0.5) / (v_in - v_out)
        points.append(np.stack([xs[i] + t * di * dx, ys[j] + t * dj * dy], axis=1))
    return np.concatenate(points)


def _feret(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Largest distance between two of ``points`` (N, 2) and the two points."""
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # collinear or too few points: compare them all
        hull = points
    dist2 = ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    return float(np.sqrt(dist2[i, j])), hull[i], hull[j]


def _perpendicular(section: np.ndarray, xs: np.ndarray, ys: np.ndarray, outline: np.ndarray, p: np.ndarray,
                   q: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Longest segment perpendicular to p→q inside the section (0.5 level of its bilinear interpolant)."""
    dx, dy = xs[1] - xs[0], ys[1] - ys[0]
    step = min(dx, dy) / 4
    if not np.linalg.norm(q - p) > 0:
        return 0.0, p, p
    u = (q - p) / np.linalg.norm(q - p)
    v = np.array([-u[1], u[0]])
    pu, pv = outline @ u, outline @ v
    us = np.arange(pu.min() + step / 2, pu.max(), step)
    vs = np.arange(pv.min() - step, pv.max() + 2 * step, step)
    pts = us[:, None, None] * u + vs[None, :, None] * v
    coords = [(pts[..., 0].ravel() - xs[0]) / dx, (pts[..., 1].ravel() - ys[0]) / dy]
    values = ndimage.map_coordinates(section, coords, order=1, mode="constant", cval=0.0,
                                     prefilter=False).reshape(us.size, vs.size)
    edges = np.diff(np.pad((values >= 0.5).astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    if rows.size == 0:
        return 0.0, p, p
    best = int(np.argmax(ends - starts))
    row, start, last = rows[best], starts[best], ends[best] - 1
    line = values[row]
    # the 0.5 crossings, linearly interpolated between the last inside and first outside samples
    lo = vs[start] - (step * (line[start] - 0.5) / (line[start] - line[start - 1]) if start > 0 else step / 2)
    hi = vs[last] + (step * (line[last] - 0.5) / (line[last] - line[last + 1]) if last + 1 < vs.size else step / 2)
    return float(hi - lo), us[row] * u + lo * v, us[row] * u + hi * v


def _measure_component(index: int, crop: np.ndarray, crop_affine: np.ndarray, spacing: np.ndarray,
                       anchor: np.ndarray, voxel_mm3: float, *, min_diameter_mm: float,
                       min_axial_slices: int) -> ComponentMeasure:
    n_voxels = int(crop.sum())
    volume = round(n_voxels * voxel_mm3 / 1000.0, VOLUME_DECIMALS)
    stack, (xs, ys, zs) = _resample_axial(crop, crop_affine, spacing, anchor)
    filled = [k for k in range(stack.shape[2]) if (stack[:, :, k] >= 0.5).any()]
    if not filled:
        centre = tuple(float(c) for c in crop_affine[:3, :3] @ np.argwhere(crop).mean(0) + crop_affine[:3, 3])
        return ComponentMeasure(index, n_voxels, volume, centre[2], 0, 0.0, (centre, centre), 0.0, (centre, centre),
                                0.0, False)
    longest = {k: _feret(_outline(stack[:, :, k], xs, ys)) for k in filled}
    top = max(d for d, _, _ in longest.values())
    candidates = []
    for k in filled:
        d, p, q = longest[k]
        if d < top - spacing[0]:
            continue
        section = stack[:, :, k]
        perp, a, b = _perpendicular(section, xs, ys, _outline(section, xs, ys), p, q)
        candidates.append((d * perp, k, d, p, q, perp, a, b))
    products = np.array([c[0] for c in candidates])
    tied = [c for c in candidates if c[0] >= products.max() * (1 - 1e-9)]
    product, k, d, p, q, perp, a, b = tied[len(tied) // 2]
    z = float(zs[k])

    def point(xy: np.ndarray) -> Point:
        return float(xy[0]), float(xy[1]), z

    measurable = (d >= min_diameter_mm - _EPS_MM and perp >= min_diameter_mm - _EPS_MM
                  and len(filled) >= min_axial_slices)
    return ComponentMeasure(index, n_voxels, volume, z, len(filled), d, (point(p), point(q)), perp,
                            (point(a), point(b)), float(product), bool(measurable))


def measure_bidimensional(mask: np.ndarray, affine: np.ndarray, *, in_plane_mm: float | None = None,
                          max_lesions: int = RANO_2010_MAX_LESIONS, min_diameter_mm: float = MEASURABLE_MIN_MM,
                          min_axial_slices: int = MIN_AXIAL_SLICES) -> BidimensionalSummary:
    """Bidimensional (RANO) measures of every 26-connected component of a residual-tumour mask.

    Parameters
    ----------
    mask
        3-D array (i, j, k) on the image's voxel grid; non-zero voxels are tumour. Any orientation (axial,
        sagittal, coronal, oblique): ``affine`` maps it to RAS+ world coordinates.
    affine
        4×4 voxel-to-RAS+ affine of the mask (mm), e.g. ``img.affine``.
    in_plane_mm
        In-plane spacing (mm) of the axial grid; default the source's finest in-plane voxel size.
    max_lesions
        How many of the largest measurable components (by product) enter the sum: 5 in RANO 2010.
    min_diameter_mm
        Both diameters must reach this (mm) for a component to be measurable: 10 mm in RANO.
    min_axial_slices
        A measurable component must appear on at least this many slices of the axial grid: 2 in RANO 2010.

    Returns
    -------
    BidimensionalSummary
        Per-component measures (mm, mm², ml; end points in RAS mm), the number of measurable components and the
        sum of products (mm²; 0 when none is measurable).
    """
    data = np.asarray(mask)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"mask must be a 3-D array; got shape {data.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be a finite, invertible 4x4 matrix; got {affine.tolist()}")
    if max_lesions < 1:
        raise ValueError(f"max_lesions must be >= 1; got {max_lesions}")
    import cc3d  # light C extension, as in postprocess

    # a one-voxel border: cc3d fails on arrays with a 1-voxel axis, and the interpolation needs a zero border
    labels = cc3d.connected_components(np.pad(data != 0, 1), connectivity=26)
    to_padded = affine @ np.vstack([np.hstack([np.eye(3), -np.ones((3, 1))]), [0, 0, 0, 1]])
    spacing = np.array(axial_spacing(affine, in_plane_mm=in_plane_mm))
    anchor = affine[:3, 3]
    voxel_mm3 = voxel_volume_mm3(affine)
    components = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(s.start - 1, s.stop + 1) for s in box)
        crop = labels[box] == index
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in box]
        components.append(_measure_component(index, crop, to_padded @ shift, spacing, anchor, voxel_mm3,
                                             min_diameter_mm=min_diameter_mm, min_axial_slices=min_axial_slices))
    measurable = sorted((c for c in components if c.measurable), key=lambda c: -c.product_mm2)
    summed = measurable[:max_lesions]
    return BidimensionalSummary(tuple(components), len(measurable), float(sum(c.product_mm2 for c in summed)),
                                tuple(c.index for c in summed), max_lesions,
                                (float(spacing[0]), float(spacing[1]), float(spacing[2])))
