import itertools

import nibabel as nib
import numpy as np
import pytest
from conftest import affine_for, write_nifti

from bids_postop.core.images import from_ras, load_3d, ras_voxel_sizes, to_ras, write_like
from bids_postop.errors import InputDataError

ORIENTATIONS = ["RAS", "LPS", "LAS", "PIR", "ILA", "SPL"]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_ras_round_trip_is_exact_and_matches_nibabel_canonical(orientation):
    aff = affine_for(orientation, spacing=(0.5, 0.7, 2.0), oblique_deg=7)
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    img = nib.Nifti1Image(data, aff)
    ras = to_ras(data, aff)
    canonical = nib.as_closest_canonical(img)
    np.testing.assert_array_equal(ras, canonical.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(ras_voxel_sizes(aff), canonical.header.get_zooms()[:3], rtol=1e-6)
    np.testing.assert_array_equal(from_ras(ras, aff), data)


def test_every_axis_permutation_round_trips():
    for perm in itertools.permutations("RAS"):
        for flips in itertools.product([False, True], repeat=3):
            codes = "".join({"R": "L", "A": "P", "S": "I"}[c] if f else c for c, f in zip(perm, flips, strict=True))
            aff = affine_for(codes)
            data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
            np.testing.assert_array_equal(from_ras(to_ras(data, aff), aff), data)


def test_load_3d_squeezes_4d_singleton_and_rejects_4d(tmp_path):
    single = write_nifti(tmp_path / "one.nii.gz", np.ones((4, 5, 6, 1)))
    assert load_3d(single).shape == (4, 5, 6)
    multi = write_nifti(tmp_path / "four.nii.gz", np.ones((4, 5, 6, 3)))
    with pytest.raises(InputDataError, match="four.nii.gz.*shape"):
        load_3d(multi)


def test_load_3d_rejects_nan_and_corrupt_files(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        load_3d(write_nifti(tmp_path / "nan.nii.gz", data))
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((40, 50, 60), np.float32))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputDataError, match="broken.nii.gz"):
        load_3d(broken)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_write_like_keeps_the_reference_grid(tmp_path, orientation):
    ref = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine_for(orientation, (0.9, 0.9, 2.5), oblique_deg=5))
    out = write_like(np.ones((5, 6, 7)), ref, tmp_path / "out.nii.gz", dtype=np.uint8)
    img = nib.load(out)
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-5)
    assert img.get_data_dtype() == np.uint8


# --- one definition of "the same grid" (core.images.same_grid) ------------------------------------------------------

def _grid(shape, affine):
    return nib.Nifti1Image(np.zeros(shape, np.uint8), np.asarray(affine, dtype=float))


def test_same_grid_is_measured_in_mm_over_the_whole_field_of_view():
    """The tolerance is in mm where voxels land, not per affine entry: a voxel size 0.01 mm off moves the far corner
    of a 256-voxel grid by 2.56 mm (not the same grid), while the float32 rounding of another tool's affine is."""
    from bids_postop.core.images import GRID_TOLERANCE_MM, grid_mismatch, grid_offset_mm, same_grid

    affine = np.array([[-1.0, 0, 0, 127.3], [0, 1.0, 0, -98.7], [0, 0, 1.0, -72.1], [0, 0, 0, 1]])
    reference = _grid((256, 256, 180), affine)
    assert same_grid(reference, _grid((256, 256, 180), affine.astype(np.float32)))  # ITK-SNAP/FSL-style float32
    zoomed = affine.copy()
    zoomed[0, 0] = -1.01
    assert not same_grid(reference, _grid((256, 256, 180), zoomed))
    assert grid_offset_mm((256, 256, 180), zoomed, affine) == pytest.approx(2.55)  # (256 - 1) × 0.01 mm
    assert "2.55 mm apart" in grid_mismatch(_grid((256, 256, 180), zoomed), reference)
    shifted = affine.copy()
    shifted[:3, 3] += [0.004, -0.003, 0.0]  # 0.005 mm: the same grid; 0.02 mm: not
    assert same_grid(reference, _grid((256, 256, 180), shifted))
    shifted[:3, 3] += [0.012, 0.0, 0.0]
    assert not same_grid(reference, _grid((256, 256, 180), shifted))
    assert grid_mismatch(_grid((256, 256, 179), affine), reference) == "shape (256, 256, 179) vs (256, 256, 180)"
    # an oblique rotation by 0.01 degrees moves the far corner by ~0.05 mm: not the same grid
    theta = np.deg2rad(0.01)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0, 0], [np.sin(theta), np.cos(theta), 0, 0], [0, 0, 1, 0],
                         [0, 0, 0, 1]])
    rotated = rotation @ affine
    expected = max(np.linalg.norm((rotated - affine) @ np.array([i, j, k, 1.0]))
                   for i in (0, 255) for j in (0, 255) for k in (0, 179))
    assert grid_offset_mm((256, 256, 180), rotated, affine) == pytest.approx(expected)
    assert not same_grid(reference, _grid((256, 256, 180), rotated)) and GRID_TOLERANCE_MM < expected
