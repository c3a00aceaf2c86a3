"""Report figures of very large grids are block-reduced for display (issue 8: 896×896×512 within 8 GiB)."""

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
