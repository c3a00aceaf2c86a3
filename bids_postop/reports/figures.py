"""Report figures ("reportlets"): slice mosaics with contours, and a flicker registration check.

Pure functions: they read NIfTI files with nibabel, write one figure and return its path. Images are
shown in RAS+ voxel order (:func:`bids_postop.core.images.to_ras`: axis flips and permutations only, no
interpolation), neurological convention (the participant's right on the right of axial and coronal
slices, anterior on the right of sagittal slices), with pixels drawn at their size in mm so anisotropic
voxels (0.9 × 0.9 × 2.5 mm) keep the anatomy's proportions. Oblique grids are shown along their closest
RAS axes, as acquired. All images of one call must share one grid (shape and affine); a
:class:`ValueError` names the files otherwise.

Speed (issue 18): each figure is drawn from its field of view only, cut out of the images before any copy or
type conversion, and block-reduced to the figure's own resolution (at most about one voxel per screen pixel of
the densest panel, so the look is unchanged): a whole-head panel of a 0.64 mm scan 180 px wide is drawn from
1.3 mm blocks. Within :func:`shared_loading` (the report node), each file is read once for all the figures.

matplotlib is imported inside the functions (object API, Agg canvas, no pyplot), so importing this
module costs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from bids_postop.core.images import grid_mismatch, load_3d, ras_voxel_sizes, to_ras

# colours: residual tumour red, probability yellow, brain mask blue, pre-op tumour orange, edges cyan
RESIDUAL_COLOUR = "#ff2a2a"
PROBABILITY_COLOUR = (1.0, 0.9, 0.1)
BRAIN_COLOUR = "#3aa0ff"
PREOP_COLOUR = "#ff9a1f"
EDGE_COLOUR = "#00e5ff"
AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
DPI = 90
REGISTRATION_DPI = 80


# --- loading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Volume:
    """One image in RAS+ voxel order, with its world coordinates per RAS voxel axis."""

    data: np.ndarray  # (x, y, z), RAS+ voxel order: a view of the file's voxels (their own type) until cropped
    zooms: tuple[float, float, float]  # mm, RAS+ voxel order
    affine: np.ndarray  # 4x4 affine of the RAS+-ordered array
    source: tuple | None = None  # the file's key (path, mtime, size): crops of it are shared within shared_loading()


# Files read inside shared_loading(), keyed by (path, modification time, size): the report node draws every figure
# from the same T1w-CE and brain mask (a 430×461×180 gzipped T1w-CE takes ~1 s to decompress); also the crops made
# of them (the registration checks share the T1w-CE's and the brain mask's) and their edges.
_SHARED: dict[tuple, Any] | None = None


@contextlib.contextmanager
def shared_loading() -> Iterator[None]:
    """Within the block, every image file is read once, whatever the number of figures drawn from it."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def _file_key(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size


def _read(path: str | Path, what: str) -> nib.Nifti1Image:
    if _SHARED is None:
        return load_3d(path, what=what)
    key = _file_key(path)
    if key not in _SHARED:
        _SHARED[key] = load_3d(path, what=what)
    return _SHARED[key]


def _shared(key: tuple, make: Any) -> Any:
    """``make()``, computed once per key within :func:`shared_loading` (every time outside it)."""
    if _SHARED is None:
        return make()
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def _load_on_one_grid(caller: str, paths: Mapping[str, str | Path | None]) -> dict[str, _Volume]:
    """Load the given images (``None`` skipped), check they share one grid, put them in RAS+ order (views: no copy,
    no type conversion; grids over :data:`MAX_DISPLAY_VOXELS` along an axis are block-reduced here)."""
    imgs = {name: _read(p, name.replace("_", " ")) for name, p in paths.items() if p is not None}
    sources = {name: _file_key(p) if _SHARED is not None else None for name, p in paths.items() if p is not None}
    ref_name, ref = next(iter(imgs.items()))
    for name, img in imgs.items():
        mismatch = grid_mismatch(img, ref)
        if mismatch:
            raise ValueError(
                f"{caller}: images not on the same grid: {ref_name}={paths[ref_name]} has shape "
                f"{ref.shape[:3]}, {name}={paths[name]} has shape {img.shape[:3]} ({mismatch}); resample {name} "
                f"onto the {ref_name} grid first")
    factors = display_factors(ref.shape[:3])
    affine, shape = ref.affine, tuple(int(n) for n in ref.shape[:3])
    if factors != (1, 1, 1):  # very large grids: block-reduce for display (figures are a few hundred px wide)
        affine = ref.affine @ np.array([[factors[0], 0, 0, (factors[0] - 1) / 2],
                                        [0, factors[1], 0, (factors[1] - 1) / 2],
                                        [0, 0, factors[2], (factors[2] - 1) / 2], [0, 0, 0, 1.0]])
        shape = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    ornt = nio.io_orientation(affine)
    ras_affine = affine @ nio.inv_ornt_aff(nio.ornt_transform(ornt, nio.axcodes2ornt("RAS")), shape)
    zooms = ras_voxel_sizes(affine)
    volumes = {}
    for name, img in imgs.items():  # one full-resolution image in memory at a time
        data = np.asanyarray(img.dataobj)
        if data.ndim > 3:
            data = data.reshape(data.shape[:3])
        if factors != (1, 1, 1):
            data = block_reduce(data, factors, "max" if name in MAX_POOLED else "mean")
        volumes[name] = _Volume(to_ras(data, affine), zooms, ras_affine, sources[name])
    return volumes


@dataclass(frozen=True)
class _View:
    """The part of a figure's images that it shows: cropped, block-reduced to the figure's resolution, float32."""

    data: dict[str, np.ndarray]  # RAS+ voxel order
    zooms: tuple[float, float, float]
    affine: np.ndarray  # of the view's voxel grid

    @property
    def shape(self) -> tuple[int, int, int]:
        first = next(iter(self.data.values()))
        return int(first.shape[0]), int(first.shape[1]), int(first.shape[2])


def view_factors(extent_mm: Sequence[float], zooms: Sequence[float], panel_px: float) -> tuple[int, int, int]:
    """Block sizes that keep at least one voxel per screen pixel: panels are drawn at a common scale of
    ``panel_px`` pixels for the narrower of the two in-plane extents (x, y) of the field of view (axial and coronal
    panels span x, sagittal ones y), so a voxel smaller than ``min(extent_x, extent_y) / panel_px`` mm is finer
    than the screen and can be averaged with its neighbours without a visible change."""
    mm_per_px = min(float(extent_mm[0]), float(extent_mm[1])) / float(panel_px)
    f = [max(1, int(mm_per_px // float(z))) for z in zooms[:3]]
    return f[0], f[1], f[2]


def _view(volumes: Mapping[str, _Volume], field_of_view: np.ndarray | None, *, panel_px: float) -> _View:
    """Cut every volume to ``field_of_view`` (boolean, RAS; plus 3 voxels) and reduce it to ``panel_px``."""
    ref = next(iter(volumes.values()))
    box = _bbox(field_of_view, margin=3) if field_of_view is not None else None
    if box is None:
        box = tuple(slice(0, int(n)) for n in ref.data.shape[:3])
    extent = [(b.stop - b.start) * z for b, z in zip(box, ref.zooms, strict=True)]
    factors = view_factors(extent, ref.zooms, panel_px)
    data = {}
    for name, v in volumes.items():
        how = "max" if name in MAX_POOLED else "mean"

        def make(v: _Volume = v, how: str = how) -> np.ndarray:
            return block_reduce(v.data[box], factors, how)

        key = ("view", v.source, tuple((b.start, b.stop) for b in box), factors, how)
        data[name] = _shared(key, make) if v.source else make()
    start = np.array([b.start for b in box], dtype=float)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = start + (np.array(factors) - 1) / 2
    zooms = tuple(float(z * f) for z, f in zip(ref.zooms, factors, strict=True))
    return _View(data, (zooms[0], zooms[1], zooms[2]), ref.affine @ scale)


# Display resolution limit: an axis longer than this is block-reduced by the smallest integer factor that
# brings it under the limit (896 → 448). Masks and probabilities are max-pooled so that a component of one
# voxel still shows; images are block-averaged.
MAX_DISPLAY_VOXELS = 512
MAX_POOLED = frozenset({"residual_mask", "brain_mask", "preop_mask", "probseg"})


def display_factors(shape: Sequence[int], limit: int = MAX_DISPLAY_VOXELS) -> tuple[int, int, int]:
    """Per-axis block sizes that bring every axis of ``shape`` to at most ``limit`` voxels (1 = unchanged)."""
    f = [max(1, -(-int(n) // limit)) for n in shape[:3]]
    return f[0], f[1], f[2]


def block_reduce(data: np.ndarray, factors: Sequence[int], how: str = "mean") -> np.ndarray:
    """Reduce a 3-D array by blocks of ``factors`` voxels (mean or max), float32, shape ``ceil(shape / factors)``.

    Blocks start at index 0; a partial block at the far end of an axis uses the voxels it has. Always returns a new
    array (a float32 copy of ``data`` when every factor is 1), in ``data``'s memory order (NIfTI voxels are
    Fortran-ordered: a C-order copy of a large crop costs several times more).
    """
    out = data
    for axis, f in enumerate(int(f) for f in factors):
        if f == 1:
            continue
        n = out.shape[axis]
        size = -(-n // f)

        def part(k: int, arr: np.ndarray = out, axis: int = axis, f: int = f) -> np.ndarray:
            return arr[(slice(None),) * axis + (slice(k, None, f),)]

        # strided views added up, in the input's type until the first sum: far faster than ufunc.reduceat
        acc = np.array(part(0), dtype=np.float32, order="K")
        counts = np.ones(size, dtype=np.float32)
        for k in range(1, f):
            piece = part(k)
            m = piece.shape[axis]  # the last block may be partial
            target = acc[(slice(None),) * axis + (slice(0, m),)]
            if how == "max":
                np.maximum(target, piece, out=target)
            else:
                np.add(target, piece, out=target)
                counts[:m] += 1
        if how != "max":
            acc /= counts.reshape([-1 if a == axis else 1 for a in range(acc.ndim)])
        out = acc
    return np.array(out, dtype=np.float32, order="K") if out is data else out


def _bbox(mask: np.ndarray, *, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Bounding box of a boolean 3-D array, grown by ``margin`` voxels; ``None`` when empty."""
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
    return out[0], out[1], out[2]


def _window(data: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    values = data[mask] if mask is not None and mask.any() else data[data != 0]
    if values.size == 0:
        values = data.ravel()
    values = values[:: max(1, values.size // 500_000)]  # a regular sample of ≤ ~1 M voxels: the same percentiles
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def spread_slices(lo: int, hi: int, n: int, size: int) -> list[int]:
    """``n`` slice indices through ``[lo, hi]`` (inclusive) of an axis with ``size`` slices.

    An extent of at least ``n`` slices gets the centres of ``n`` equal bins; a smaller extent gets ``n``
    contiguous slices centred on it (shifted to stay inside ``[0, size)``). Returns sorted unique indices.
    """
    n = max(1, min(n, size))
    extent = hi - lo + 1
    if extent >= n:
        edges = np.linspace(lo, hi + 1, n + 1)
        idx = np.floor((edges[:-1] + edges[1:]) / 2).astype(int)
    else:
        start = int(round((lo + hi) / 2 - (n - 1) / 2))
        start = min(max(start, 0), size - n)
        idx = np.arange(start, start + n)
    return sorted({int(i) for i in np.clip(idx, 0, size - 1)})


# --- drawing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Cut:
    axis: int  # RAS axis normal to the slice: 0 sagittal, 1 coronal, 2 axial
    index: int  # in the cropped array


def _plane(data: np.ndarray, cut: _Cut) -> np.ndarray:
    """2-D slice as (rows = up, cols = right): axial (A, R), coronal (S, R), sagittal (S, A)."""
    return data[(slice(None),) * cut.axis + (cut.index,)].T  # a view (np.take copies, slowly on F-order arrays)


def _extent(shape2d: tuple[int, ...], zooms: tuple[float, float, float], axis: int) -> tuple[float, float]:
    horizontal, vertical = [z for a, z in enumerate(zooms) if a != axis]
    return shape2d[1] * horizontal, shape2d[0] * vertical


def _world(view: _View, cut: _Cut) -> float:
    """World coordinate (mm) of the slice along its RAS axis, at the centre of the view."""
    centre = [(n - 1) / 2 for n in view.shape]
    centre[cut.axis] = cut.index
    return float((view.affine @ np.array([*centre, 1.0]))[cut.axis])


def _new_figure(width_in: float, height_in: float, dpi: int = DPI):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


@dataclass(frozen=True)
class _Panel:
    """A panel's box in the figure, in inches from the bottom left."""

    x: float
    y: float
    w: float
    h: float


def _draw_panel(ax, panel: _Panel, base: np.ndarray, window: tuple[float, float], cut: _Cut,
                zooms: tuple[float, float, float], *, probability: np.ndarray | None = None,
                contours: Sequence[tuple[np.ndarray, str, float, Sequence[float]]] = (),
                label: str | None = None, orientation_letters: bool = False) -> None:
    """One slice in its panel box: grey base, optional probability haze, contours (array, colour, width, levels).

    Every panel of a figure is drawn into one axes spanning the figure, in inches (one matplotlib axes per panel
    cost ~13 ms each to create, a third of a figure's time): the slice fills the largest box of its proportions
    (mm) centred in the panel, as an axes with ``aspect="equal"`` would draw it, and the labels sit where they did
    in that axes' coordinates.
    """
    plane = _plane(base, cut)
    width_mm, height_mm = _extent(plane.shape, zooms, cut.axis)
    scale = min(panel.w / width_mm, panel.h / height_mm)
    w, h = width_mm * scale, height_mm * scale
    x0, y0 = panel.x + (panel.w - w) / 2, panel.y + (panel.h - h) / 2
    extent = (x0, x0 + w, y0, y0 + h)
    ax.imshow(plane, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent,
              interpolation="bilinear", aspect="auto")
    if probability is not None:
        p = np.clip(_plane(probability, cut), 0.0, 1.0)
        rgba = np.zeros((*p.shape, 4), dtype=np.float32)
        rgba[..., :3] = PROBABILITY_COLOUR
        rgba[..., 3] = np.where(p >= 0.05, 0.25 + 0.45 * p, 0.0)
        ax.imshow(rgba, origin="lower", extent=extent, interpolation="nearest", aspect="auto")
    rows, cols = plane.shape
    xs = x0 + (np.arange(cols) + 0.5) * w / cols
    ys = y0 + (np.arange(rows) + 0.5) * h / rows
    for array, colour, linewidth, levels in contours:
        c = _plane(array, cut)
        if c.min() < max(levels) and c.max() > min(levels):
            ax.contour(xs, ys, c, levels=list(levels), colors=[colour], linewidths=linewidth)
    style = {"color": "white", "fontsize": 8}
    if label:
        ax.text(x0 + 0.02 * w, y0 + 0.02 * h, label, ha="left", va="bottom", **style)
    if orientation_letters:
        left, right = ("P", "A") if cut.axis == 0 else ("L", "R")
        ax.text(x0 + 0.02 * w, y0 + 0.5 * h, left, ha="left", va="center", **style)
        ax.text(x0 + 0.98 * w, y0 + 0.5 * h, right, ha="right", va="center", **style)


def _layout(fig, rows: Sequence[Sequence[_Cut]], shapes: tuple[int, int, int], zooms, *,
            header_in: float, width_in: float) -> tuple[Any, list[list[_Panel]]]:
    """One axes over the whole figure (data units: inches) and the panel boxes of the rows of cuts; each row's
    height follows the aspect of its panels."""
    ncols = max(len(r) for r in rows)
    col_w = width_in / ncols
    heights = []
    for row in rows:
        ratios = []
        for cut in row:
            dims = [shapes[a] * zooms[a] for a in range(3) if a != cut.axis]
            ratios.append(dims[1] / dims[0])
        heights.append(col_w * max(ratios))
    total = header_in + sum(heights)
    fig.set_size_inches(width_in, total)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(0.0, width_in)
    ax.set_ylim(0.0, total)
    ax.set_autoscale_on(False)
    panels, top = [], total - header_in
    for row, h in zip(rows, heights, strict=True):
        top -= h
        panels.append([_Panel(i * col_w, top, col_w * 0.98, h * 0.98) for i in range(len(row))])
    return ax, panels


def _header(fig, text: str, header_in: float) -> None:
    if text:
        height = fig.get_size_inches()[1]
        fig.text(0.005, 1 - header_in / height / 2, text, color="white", fontsize=9, va="center", ha="left")


def _png_bytes(fig, *, grey_levels: int = 128) -> bytes:
    """Render to a palette PNG: ``grey_levels`` greys for the images, the other entries for overlays.

    Overlay colours get palette entries of their own (median cut over the coloured pixels only), so a
    contour a few pixels long keeps its colour; a single median cut over the whole figure would merge it
    into the greys.
    """
    from PIL import Image

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    wide = rgb.astype(np.int16)
    coloured = (wide.max(axis=-1) - wide.min(axis=-1)) > 24
    index = np.empty(rgb.shape[:2], dtype=np.uint8)
    index[~coloured] = np.round(wide[~coloured].mean(axis=-1) * (grey_levels - 1) / 255).astype(np.uint8)
    palette = [round(i * 255 / (grey_levels - 1)) for i in range(grey_levels) for _ in range(3)]
    if coloured.any():
        pixels = Image.fromarray(np.ascontiguousarray(rgb[coloured][None]), "RGB")
        quantized = pixels.quantize(colors=256 - grey_levels, method=Image.Quantize.MEDIANCUT)
        index[coloured] = np.asarray(quantized)[0] + grey_levels
        palette += (quantized.getpalette() or [])[: 3 * (256 - grey_levels)]
    image = Image.fromarray(index, "P")
    image.putpalette(palette + [0] * (768 - len(palette)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _write_raster(fig, out_file: Path, title: str) -> Path:
    """Write the figure as PNG, or as an SVG holding the PNG, chosen by ``out_file``'s extension."""
    png = _png_bytes(fig)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix.lower() == ".png":
        out_file.write_bytes(png)
    elif out_file.suffix.lower() == ".svg":
        w, h = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
        out_file.write_text(_svg_document(w, h, title, [("", png)]), encoding="utf-8")
    else:
        raise ValueError(f"{out_file}: figure files end in .png or .svg")
    return out_file


def _svg_image(png: bytes, w: int, h: int) -> str:
    data = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<image x="0" y="0" width="{w}" height="{h}" xlink:href="{data}"/>'


def _svg_document(w: int, h: int, title: str, layers: Sequence[tuple[str, bytes]], style: str = "") -> str:
    body = "".join(f'<g class="{cls}">{_svg_image(png, w, h)}</g>' if cls else _svg_image(png, w, h)
                   for cls, png in layers)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{w}" height="{h}" viewBox="0 0 {w} {h}"><title>{html.escape(title)}</title>'
            f"{f'<style>{style}</style>' if style else ''}{body}</svg>\n")


def _cuts(lo_hi: tuple[int, int] | None, shape: tuple[int, ...], axis: int, n: int, *,
          trim: float = 0.0) -> list[_Cut]:
    """``n`` cuts through ``lo_hi`` (inclusive slice range along ``axis``, less ``trim`` of it at both ends),
    or through the middle 60 % of the axis when ``lo_hi`` is ``None``."""
    if lo_hi is None:
        lo, hi, trim = 0, shape[axis] - 1, 0.2
    else:
        lo, hi = lo_hi
    cut = int((hi - lo + 1) * trim)
    return [_Cut(axis, i) for i in spread_slices(lo + cut, hi - cut, n, shape[axis])]


def _range(box: tuple[slice, slice, slice] | None, axis: int) -> tuple[int, int] | None:
    return None if box is None else (box[axis].start, box[axis].stop - 1)


def panel_pixels(width_in: float, dpi: int, columns: int) -> float:
    """Width in screen pixels of one panel of a figure ``width_in`` inches wide with ``columns`` panels a row."""
    return width_in * dpi / max(1, columns) * 0.98


def _render(view: _View, base: str, rows_of: Any, *, window_mask: str | None,
            contours: Sequence[tuple[str | np.ndarray, str, float, Sequence[float]]],
            probability: str | None = None, header: str, width_in: float = 12.0, dpi: int = DPI):
    """Draw rows of slices of ``base`` from a view (:func:`_view`).

    ``rows_of(view arrays)`` returns the rows of cuts; ``contours`` name arrays (or give arrays of the view)
    with their colour, line width and levels.
    """
    data = view.data
    rows = [row for row in rows_of(data) if row]
    window = _window(data[base], data[window_mask] > 0.5 if window_mask and window_mask in data else None)
    lines = [(data[a] if isinstance(a, str) else a, colour, width, levels)
             for a, colour, width, levels in contours if not isinstance(a, str) or a in data]
    header_in = 0.3
    fig = _new_figure(width_in, 8.0, dpi)
    ax, panels = _layout(fig, rows, view.shape, view.zooms, header_in=header_in, width_in=width_in)
    for row, row_panels in zip(rows, panels, strict=True):
        for c, (cut, panel) in enumerate(zip(row, row_panels, strict=True)):
            _draw_panel(ax, panel, data[base], window, cut, view.zooms,
                        probability=data.get(probability) if probability else None, contours=lines,
                        label=f"{AXIS_NAMES[cut.axis]} {'xyz'[cut.axis]}={_world(view, cut):.0f} mm",
                        orientation_letters=c == 0 or row[c - 1].axis != cut.axis)
    _header(fig, header, header_in)
    return fig


def _through_target(keys: Sequence[str], n_axial: int, n_other: int, *, probability: str | None = None):
    """Rows of cuts (axial rows of six, then coronal + sagittal) through the first non-empty mask of
    ``keys``, else through the voxels at or above half the peak of ``probability`` (peak ≥ 0.05), else
    through the middle of the field of view."""
    def rows_of(data: Mapping[str, np.ndarray]) -> list[list[_Cut]]:
        shape = next(iter(data.values())).shape
        box = next((b for k in keys if k in data and (b := _bbox(data[k] > 0.5)) is not None), None)
        if box is None and probability in data:
            peak = float(data[probability].max())
            box = _bbox(data[probability] >= 0.5 * peak) if peak >= 0.05 else None
        axial = _cuts(_range(box, 2), shape, 2, n_axial)
        per_row = min(6, len(axial))
        rows = [axial[i:i + per_row] for i in range(0, len(axial), per_row)]
        if n_other:
            rows.append(_cuts(_range(box, 1), shape, 1, n_other) + _cuts(_range(box, 0), shape, 0, n_other))
        return rows
    return rows_of


def _across(mask_key: str | None, n_slices: int, *, trim: float):
    """One row per plane (axial, coronal, sagittal) of ``n_slices`` cuts across the mask's extent."""
    def rows_of(data: Mapping[str, np.ndarray]) -> list[list[_Cut]]:
        shape = next(iter(data.values())).shape
        box = _bbox(data[mask_key] > 0.5) if mask_key and mask_key in data else None
        return [_cuts(_range(box, axis), shape, axis, n_slices, trim=trim) for axis in (2, 1, 0)]
    return rows_of


def _check_count(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")


# --- public functions -----------------------------------------------------------------------------

def residual_mosaic(t1ce: str | Path, residual_mask: str | Path, probseg: str | Path | None,
                    brain_mask: str | Path | None, out_file: str | Path, *, n_slices: int = 12) -> Path:
    """Mosaic of the post-op contrast T1w through the residual tumour, with contours.

    ``n_slices`` axial slices (rows of six) span the residual tumour's extent (a small residual gets
    contiguous slices around it), and a last row holds three coronal and three sagittal slices through it.
    When the residual mask is empty the slices go through the highest-probability region of ``probseg``
    (voxels at or above half its peak, when the peak is at least 0.05), else through the middle 60 % of
    the brain. Residual contour red, probability haze yellow (from 0.05), brain-mask contour blue. The
    field of view is the brain mask (or the non-zero voxels of ``t1ce``) and the residual, plus 3 voxels.

    Parameters
    ----------
    t1ce, residual_mask, probseg, brain_mask
        NIfTI paths on one grid (the post-op T1w-CE's); ``probseg`` and ``brain_mask`` may be ``None``.
    out_file
        ``.png`` (palette PNG, 100–300 KB) or ``.svg`` (the same PNG inside an SVG).

    Returns ``out_file``. Raises ``ValueError`` when the images are not on one grid.
    """
    _check_count("n_slices", n_slices)
    volumes = _load_on_one_grid("residual_mosaic", {"t1ce": t1ce, "residual_mask": residual_mask,
                                                    "probseg": probseg, "brain_mask": brain_mask})
    brain = volumes["brain_mask"].data > 0.5 if "brain_mask" in volumes else volumes["t1ce"].data != 0
    view = _view(volumes, brain | (volumes["residual_mask"].data > 0.5),
                 panel_px=panel_pixels(12.0, DPI, max(min(6, n_slices), 6)))
    fig = _render(
        view, "t1ce", _through_target(("residual_mask",), n_slices, 3, probability="probseg"),
        window_mask="brain_mask",
        contours=(("brain_mask", BRAIN_COLOUR, 0.8, (0.5,)), ("residual_mask", RESIDUAL_COLOUR, 1.4, (0.5,))),
        probability="probseg",
        header="post-op T1w-CE    red: residual tumour    yellow: residual probability    blue: brain mask")
    return _write_raster(fig, Path(out_file), "Residual tumour on the post-operative contrast-enhanced T1w")


def brain_mask_figure(t1ce: str | Path, brain_mask: str | Path, out_file: str | Path, *, n_slices: int = 6
                      ) -> Path:
    """Brain-mask contour (blue) on the post-op T1w-CE: ``n_slices`` axial, coronal and sagittal slices
    across the brain (its outer eighths left out). Same grid for both; PNG or SVG by extension."""
    _check_count("n_slices", n_slices)
    volumes = _load_on_one_grid("brain_mask_figure", {"t1ce": t1ce, "brain_mask": brain_mask})
    view = _view(volumes, (volumes["brain_mask"].data > 0.5) | (volumes["t1ce"].data != 0),
                 panel_px=panel_pixels(12.0, DPI, n_slices))
    fig = _render(view, "t1ce", _across("brain_mask", n_slices, trim=0.125), window_mask=None,
                  contours=(("brain_mask", BRAIN_COLOUR, 1.0, (0.5,)),), header="post-op T1w-CE    blue: brain mask")
    return _write_raster(fig, Path(out_file), "Brain mask on the post-operative contrast-enhanced T1w")


def preop_mask_figure(preop_registered: str | Path, preop_mask_registered: str | Path, out_file: str | Path, *,
                      n_slices: int = 6) -> Path:
    """Pre-op tumour mask (orange contour) on the registered pre-op T1w-CE, slices through the tumour.

    Both images on the post-op T1w-CE grid (registered there). ``n_slices`` axial slices through the
    tumour, then three coronal and three sagittal ones; the middle of the image when the mask is empty.
    PNG or SVG by ``out_file``'s extension.
    """
    _check_count("n_slices", n_slices)
    volumes = _load_on_one_grid("preop_mask_figure", {"preop": preop_registered,
                                                      "preop_mask": preop_mask_registered})
    view = _view(volumes, (volumes["preop"].data != 0) | (volumes["preop_mask"].data > 0.5),
                 panel_px=panel_pixels(12.0, DPI, max(min(6, n_slices), 6)))
    fig = _render(view, "preop", _through_target(("preop_mask",), n_slices, 3), window_mask=None,
                  contours=(("preop_mask", PREOP_COLOUR, 1.4, (0.5,)),),
                  header="registered pre-op T1w-CE    orange: pre-op tumour mask")
    return _write_raster(fig, Path(out_file), "Pre-operative tumour mask on the registered pre-operative T1w-CE")


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample (the level that best splits it into two classes)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def _edges(data: np.ndarray, mask: np.ndarray | None, zooms: tuple[float, float, float]
           ) -> tuple[np.ndarray, tuple[float, ...]]:
    """Image smoothed by a 1.5 mm Gaussian and the Otsu level inside ``mask``: its iso-contour follows
    the main tissue boundary (grey/white matter on a T1w, brain/CSF on others)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(data, sigma=[1.5 / z for z in zooms])
    inside = smooth[mask] if mask is not None and mask.any() else smooth[data != 0]
    if inside.size == 0 or float(inside.max()) <= float(inside.min()):
        return smooth, ()
    return smooth, (_otsu(inside),)


FLICKER_STYLE = ("@keyframes bp-flicker{0%{opacity:0}50%{opacity:1}100%{opacity:1}}"
                 ".moving{animation:bp-flicker 3s steps(1,end) infinite}"
                 "svg:hover .moving{animation-play-state:paused}"
                 "@media (prefers-reduced-motion:reduce){.moving{animation:none;opacity:0}"
                 "svg:hover .moving{opacity:1}}")


def registration_check(fixed: str | Path, moving_registered: str | Path, out_file: str | Path, *,
                       brain_mask: str | Path | None = None, fixed_label: str = "post-op T1w-CE",
                       moving_label: str | None = None, n_slices: int = 5) -> Path:
    """Flicker SVG of the fixed image and a registered image, both with the fixed image's edges.

    Two layers of the same slices (``n_slices`` axial, coronal and sagittal across the brain): the fixed
    post-op T1w-CE and ``moving_registered`` (already resampled onto the fixed grid), each drawn with the
    iso-contour of the smoothed fixed image at its Otsu level inside the brain, in cyan. A CSS animation
    shows each layer for 1.5 s in turn; hovering (SVG embedded as ``<object>``) holds the current one;
    with reduced motion asked for, hovering shows the registered layer. ``brain_mask`` (same grid) sets
    the field of view and the edge level. ``out_file`` must end in ``.svg``; 300–500 KB.
    """
    _check_count("n_slices", n_slices)
    out_file = Path(out_file)
    if out_file.suffix.lower() != ".svg":
        raise ValueError(f"{out_file}: the registration check is an SVG (flicker); name it *.svg")
    volumes = _load_on_one_grid("registration_check", {"fixed": fixed, "moving": moving_registered,
                                                       "brain_mask": brain_mask})
    brain = volumes["brain_mask"].data > 0.5 if "brain_mask" in volumes else volumes["fixed"].data != 0
    view = _view(volumes, brain, panel_px=panel_pixels(10.0, REGISTRATION_DPI, n_slices))
    view_brain = view.data["brain_mask"] > 0.5 if "brain_mask" in view.data else view.data["fixed"] != 0
    fixed_key = volumes["fixed"].source
    smooth, levels = (_shared(("edges", id(view.data["fixed"])), lambda: _edges(view.data["fixed"], view_brain,
                                                                                  view.zooms))
                      if fixed_key else _edges(view.data["fixed"], view_brain, view.zooms))
    moving_label = moving_label or Path(moving_registered).name
    layers, size = [], (0, 0)
    for name, label in (("fixed", fixed_label), ("moving", moving_label)):
        fig = _render(view, name, _across("brain_mask" if "brain_mask" in volumes else None, n_slices,
                                          trim=1 / 6),
                      window_mask="brain_mask",
                      contours=[(smooth, EDGE_COLOUR, 0.7, levels)] if levels else [],
                      header=f"{'FIXED' if name == 'fixed' else 'REGISTERED'}: {label}    "
                             "cyan: edges of the fixed image", width_in=10.0, dpi=REGISTRATION_DPI)
        size = tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)
        layers.append((name, _png_bytes(fig, grey_levels=96)))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(_svg_document(size[0], size[1], f"Registration check: {moving_label} on {fixed_label}",
                                      [("", layers[0][1]), ("moving", layers[1][1])], style=FLICKER_STYLE),
                        encoding="utf-8")
    return out_file
