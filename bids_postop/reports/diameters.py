"""The residual's bidimensional measures drawn for the report: for each measured component, the axial slice of
the post-op T1w-CE at the measured height, resampled onto a patient-aligned (RAS) grid around it, with the
longest diameter (red) and the longest diameter perpendicular to it (yellow) in millimetres.

Radiological convention: the patient's right on the image's left, anterior up. The panel's grid is the axial
frame the diameters were measured in (:mod:`bids_postop.core.bidimensional`), so the lines sit where they were
measured also on oblique or sagittal acquisitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

FIELD_OF_VIEW_MM = 80.0
PIXEL_MM = 0.5
MAX_PANELS = 5


def _axial_slice(data: np.ndarray, affine: np.ndarray, centre_xy: Sequence[float], z_mm: float) -> tuple:
    """The image on an RAS-aligned square grid of FIELD_OF_VIEW_MM at height ``z_mm`` (linear interpolation)."""
    from scipy import ndimage

    half = FIELD_OF_VIEW_MM / 2
    xs = np.arange(centre_xy[0] - half, centre_xy[0] + half, PIXEL_MM)
    ys = np.arange(centre_xy[1] - half, centre_xy[1] + half, PIXEL_MM)
    gx, gy = np.meshgrid(xs, ys)  # rows: y (anterior), columns: x (right)
    world = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z_mm), np.ones(gx.size)])
    voxels = (np.linalg.inv(affine) @ world)[:3]
    plane = ndimage.map_coordinates(data, voxels, order=1, mode="constant", cval=0.0).reshape(gx.shape)
    return plane, (xs[0], xs[-1], ys[0], ys[-1])


def diameters_figure(t1ce: str | Path, bidimensional: Mapping[str, Any], out_file: str | Path) -> Path | None:
    """Write the figure (PNG) of the components that were summed (else the measurable ones, else the largest);
    ``bidimensional`` is :meth:`BidimensionalSummary.to_dict`. Returns ``None`` when there is no component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = list(bidimensional.get("components") or [])
    summed = set(bidimensional.get("summed") or ())
    shown = ([c for c in components if c["index"] in summed] or [c for c in components if c["measurable"]]
             or sorted(components, key=lambda c: -c["n_voxels"]))[:MAX_PANELS]
    if not shown:
        return None
    img = nib.load(str(t1ce))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    data = data[..., 0] if data.ndim == 4 else data
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False, dpi=100)
    for ax, comp in zip(axes[0], shown, strict=True):
        (a, b), (c, d) = comp["longest_end_points"], comp["perpendicular_end_points"]
        centre = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
        plane, extent = _axial_slice(data, img.affine, centre, comp["slice_z_mm"])
        inside = plane[plane > 0]
        vmax = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        ax.imshow(plane, cmap="gray", origin="lower", extent=extent, vmin=0, vmax=vmax, interpolation="bilinear")
        ax.plot([a[0], b[0]], [a[1], b[1]], color="#ff3b30", lw=1.6)
        ax.plot([c[0], d[0]], [c[1], d[1]], color="#ffd60a", lw=1.6)
        ax.invert_xaxis()  # radiological: the patient's right on the left
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.98, "R", color="w", transform=ax.transAxes, va="top", fontsize=8)
        status = "measurable" if comp["measurable"] else "not measurable"
        ax.set_title(f"component {comp['index']}: {comp['longest_mm']:.1f} × {comp['perpendicular_mm']:.1f} mm\n"
                     f"{comp['product_mm2']:.0f} mm², {status}, z = {comp['slice_z_mm']:.1f} mm", fontsize=8)
    fig.tight_layout()
    out = Path(out_file)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
