"""Report figures of very large grids are block-reduced for display (issue 8: 896×896×512 within 8 GiB)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from bids_postop.reports.figures import block_reduce, display_factors, residual_mosaic


@pytest.mark.parametrize("shape, factors", [((430, 461, 180), (1, 1, 1)), ((896, 896, 512), (2, 2, 1)),
                                            ((1100, 300, 513), (3, 1, 2))])
def test_display_factors(shape, factors):
    assert display_factors(shape) == factors


def test_block_reduce_mean_and_max_with_partial_blocks():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (7, 5, 4)).astype(np.int16)
    mean, peak = block_reduce(data, (2, 2, 1), "mean"), block_reduce(data, (2, 2, 1), "max")
    assert mean.shape == peak.shape == (4, 3, 4) and mean.dtype == peak.dtype == np.float32
    assert mean[1, 1, 2] == pytest.approx(data[2:4, 2:4, 2].mean())
    assert mean[3, 2, 0] == pytest.approx(data[6:, 4:, 0].mean())  # partial block: the voxels it has
    assert peak[3, 2, 0] == data[6:, 4:, 0].max()
    one = np.zeros((9, 9, 3), np.uint8)
    one[8, 8, 2] = 1  # a one-voxel component in the last partial block still shows when max-pooled
    assert block_reduce(one, (2, 2, 1), "max")[4, 4, 2] == 1


def test_mosaic_of_a_grid_over_the_display_limit(tmp_path, monkeypatch):
    import bids_postop.reports.figures as F

    original = F.display_factors
    monkeypatch.setattr(F, "display_factors", lambda shape: original(shape, 16))  # 40 voxels act like 896
    shape = (40, 36, 20)
    affine = np.diag([0.5, 0.5, 0.8, 1.0])
    head = np.zeros(shape, np.float32)
    head[5:35, 5:31, 3:17] = 100
    residual = np.zeros(shape, np.uint8)
    residual[20, 18, 10] = 1  # one voxel
    files = [write_nifti(tmp_path / f"{n}.nii.gz", d, affine) for n, d in
             (("t1ce", head), ("residual", residual), ("brain", (head > 0).astype(np.uint8)))]
    volumes = F._load_on_one_grid("test", {"t1ce": files[0], "residual_mask": files[1], "brain_mask": files[2]})
    assert volumes["t1ce"].data.shape == (14, 12, 10)
    assert volumes["residual_mask"].data.max() == 1.0  # the one-voxel residual survives
    np.testing.assert_allclose(volumes["t1ce"].zooms, (1.5, 1.5, 1.6))
    out = residual_mosaic(files[0], files[1], None, files[2], tmp_path / "mosaic.png")
    assert out.stat().st_size > 1000 and nib.load(files[0]).shape == shape


# --- issue 18: figures from their field of view, reduced to the figure's resolution -----------------------------

def _fine_head(tmp_path):
    """A real head (BraTS-GLI-00001 T1w-CE) on a fine LPS grid (0.6×0.6×1.0 mm, 400×400×155, with a 1 % noise floor
    outside the head as on scanner images) and its brain mask and a small residual; registered-image stand-in: the
    same scan shifted by 2 mm."""
    from conftest import REAL
    from scipy.ndimage import zoom

    src = nib.load(REAL / "brats-gli-00001-000" / "BraTS-GLI-00001-000-t1c.nii.gz")
    data = zoom(np.asanyarray(src.dataobj).astype(np.float32), (1 / 0.6, 1 / 0.6, 1.0), order=1)
    affine = src.affine @ np.diag([0.6, 0.6, 1.0, 1.0])
    brain = data > 0
    rng = np.random.default_rng(0)
    noisy = np.maximum(data, np.abs(rng.normal(0, 0.01 * np.percentile(data[brain], 99), data.shape)))
    residual = np.zeros(data.shape, np.uint8)
    centre = np.argwhere(brain).mean(0).astype(int)
    residual[centre[0] + 30:centre[0] + 42, centre[1]:centre[1] + 9, centre[2] - 2:centre[2] + 3] = 1
    probability = np.clip(residual * 0.8 + 0.1 * (np.roll(residual, 5, axis=0) > 0), 0, 1).astype(np.float32)
    files = {"t1ce": write_nifti(tmp_path / "t1ce.nii.gz", noisy.astype(np.int16), affine),
             "brain_mask": write_nifti(tmp_path / "brain.nii.gz", brain.astype(np.uint8), affine),
             "residual_mask": write_nifti(tmp_path / "residual.nii.gz", residual, affine),
             "probseg": write_nifti(tmp_path / "prob.nii.gz", probability, affine),
             "moving": write_nifti(tmp_path / "moved.nii", np.roll(noisy, 3, axis=1).astype(np.float32), affine)}
    return files


def _draw_all(files, out, monkeypatch, *, reduce: bool):
    """The report's figures, with the panels' labels (plane and world position) each one drew."""
    import bids_postop.reports.figures as F

    labels: dict[str, list[str]] = {}
    current: list[str] = []
    original_draw = F._draw_panel

    def recording(*args, label=None, **kwargs):
        current.append(label)
        return original_draw(*args, label=label, **kwargs)

    monkeypatch.setattr(F, "_draw_panel", recording)
    if not reduce:
        monkeypatch.setattr(F, "view_factors", lambda extent, zooms, panel_px: (1, 1, 1))
    made = {}
    with F.shared_loading():
        for name, call in (
            ("mosaic", lambda p: F.residual_mosaic(files["t1ce"], files["residual_mask"], files["probseg"],
                                                   files["brain_mask"], p)),
            ("brainmask", lambda p: F.brain_mask_figure(files["t1ce"], files["brain_mask"], p)),
            ("preop", lambda p: F.preop_mask_figure(files["moving"], files["residual_mask"], p)),
        ):
            current.clear()
            made[name] = call(out / f"{name}.png")
            labels[name] = list(current)
        current.clear()
        made["registration"] = F.registration_check(files["t1ce"], files["moving"], out / "registration.svg",
                                                    brain_mask=files["brain_mask"])
        labels["registration"] = list(current)
    monkeypatch.undo()
    return made, labels


def _positions(labels):
    return [(label.split()[0], float(label.split("=")[1].split()[0])) for label in labels]


def _greys(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def test_reduced_figures_show_the_same_slices_and_extent_as_full_resolution(tmp_path, monkeypatch):
    """The whole-head figures of a 0.6 mm scan are drawn from 1.2 mm blocks (that many voxels per screen pixel);
    every figure keeps its size, its panels (plane and position within one block) and its look (greys correlate
    ≥ 0.99 with the full-resolution drawing)."""
    import bids_postop.reports.figures as F

    files = _fine_head(tmp_path)
    volumes = F._load_on_one_grid("t", {"t1ce": files["t1ce"], "brain_mask": files["brain_mask"]})
    whole = F._view(volumes, volumes["t1ce"].data != 0, panel_px=F.panel_pixels(12.0, F.DPI, 6))
    assert whole.zooms[:2] == pytest.approx((1.2, 1.2))  # really reduced (240 mm over 176 px)
    brain = F._view(volumes, volumes["brain_mask"].data > 0, panel_px=F.panel_pixels(12.0, F.DPI, 6))
    assert brain.zooms[:2] == pytest.approx((0.6, 0.6))  # the brain box (~140 mm) keeps the voxels

    (tmp_path / "full").mkdir()
    (tmp_path / "reduced").mkdir()
    full, full_labels = _draw_all(files, tmp_path / "full", monkeypatch, reduce=False)
    reduced, reduced_labels = _draw_all(files, tmp_path / "reduced", monkeypatch, reduce=True)
    for name in ("mosaic", "brainmask", "preop"):
        a, b = _positions(full_labels[name]), _positions(reduced_labels[name])
        assert [p for p, _ in a] == [p for p, _ in b], name
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) <= 1.2 + 0.5, name  # one block + rounding
        ga, gb = _greys(full[name]), _greys(reduced[name])
        assert abs(ga.shape[0] - gb.shape[0]) <= 2 and ga.shape[1] == gb.shape[1], name
        h = min(ga.shape[0], gb.shape[0])
        r = np.corrcoef(ga[:h].ravel(), gb[:h].ravel())[0, 1]
        assert r >= 0.99, (name, r)  # measured 0.997-1.0; blocks twice as large give 0.93-0.985
    assert _positions(full_labels["registration"]) == _positions(reduced_labels["registration"])
    assert full["registration"].stat().st_size > 10_000 and reduced["registration"].stat().st_size > 10_000


def test_shared_loading_reads_each_file_once(tmp_path, monkeypatch):
    import bids_postop.reports.figures as F

    files = _fine_head(tmp_path)
    reads = []
    original = F.load_3d
    monkeypatch.setattr(F, "load_3d", lambda path, what: reads.append(Path(path).name) or original(path, what=what))
    with F.shared_loading():
        F.residual_mosaic(files["t1ce"], files["residual_mask"], files["probseg"], files["brain_mask"],
                          tmp_path / "m.png")
        F.brain_mask_figure(files["t1ce"], files["brain_mask"], tmp_path / "b.png")
        F.registration_check(files["t1ce"], files["moving"], tmp_path / "r.svg", brain_mask=files["brain_mask"])
    assert sorted(reads) == sorted(["t1ce.nii.gz", "residual.nii.gz", "prob.nii.gz", "brain.nii.gz", "moved.nii"])
    F.brain_mask_figure(files["t1ce"], files["brain_mask"], tmp_path / "b2.png")  # outside the block: read again
    assert reads.count("t1ce.nii.gz") == 2
    assert F._SHARED is None
