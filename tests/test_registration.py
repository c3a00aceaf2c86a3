"""Tests of bids_postop.core.registration: orientation handling, output grids, rigid recovery."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_postop.core.registration import (
    DEFAULT_SETTINGS,
    FULL_RESOLUTION,
    RegistrationResult,
    apply_transforms,
    block_average,
    block_factors,
    nifti_to_ants,
    register,
)
from bids_postop.errors import InputDataError

REAL = Path(os.environ.get("BIDS_POSTOP_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
BRATS_T1C = REAL / "brats-gli-00001-000" / "BraTS-GLI-00001-000-t1c.nii.gz"
TCGA_NATIVE_T1C = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1c.nii.gz"
TCGA_NATIVE_MASK = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1c_brainmask_hdbet.nii.gz"

LPS_FLIP = np.array([-1.0, -1.0, 1.0])


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation matrix (Rodrigues) about a unit axis."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    theta = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def _oblique_affine(zooms=(1.2, 0.9, 2.5), degrees=17.0, origin=(-30.0, 12.0, -8.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation([0.3, -0.5, 0.8], degrees) @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"real test data not found: {path} (set BIDS_POSTOP_REAL_DATA)")
    return path


# ------------------------------------------------------------------------------------------------
# nibabel -> ANTs geometry


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([1.0, 1.0, 1.0, 1.0]),  # RAS
        np.diag([-1.0, -1.0, 1.0, 1.0]),  # LPS
        np.diag([-0.9, 0.9, 5.5, 1.0]),  # LAS, anisotropic
        _oblique_affine(),
        _oblique_affine(zooms=(-1.0, 1.0, 1.0), degrees=-25.0),  # oblique and left-handed
    ],
    ids=["RAS", "LPS", "LAS", "oblique", "oblique-left-handed"],
)
def test_nifti_to_ants_physical_points_match_nibabel(affine):
    import ants

    rng = np.random.default_rng(0)
    data = rng.random((7, 9, 5)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    ants_img = nifti_to_ants(img)
    np.testing.assert_array_equal(ants_img.numpy(), data)
    for index in [(0, 0, 0), (6, 0, 0), (0, 8, 0), (0, 0, 4), (3, 5, 2), (6, 8, 4)]:
        ants_point = np.array(ants.transform_index_to_physical_point(ants_img, index))
        nib_point = (affine @ [*index, 1.0])[:3] * LPS_FLIP
        np.testing.assert_allclose(ants_point, nib_point, atol=1e-4)


def test_nifti_to_ants_real_oblique_scan_and_4d_singleton():
    import ants

    img = nib.load(_require(TCGA_NATIVE_T1C))
    assert not np.allclose(img.affine[:3, :3], np.diag(np.diag(img.affine[:3, :3])))  # really oblique
    ants_img = nifti_to_ants(img)
    last = tuple(s - 1 for s in img.shape)
    for index in [(0, 0, 0), last, (100, 50, 12)]:
        ants_point = np.array(ants.transform_index_to_physical_point(ants_img, index))
        np.testing.assert_allclose(ants_point, (img.affine @ [*index, 1.0])[:3] * LPS_FLIP, atol=1e-3)
    four_d = nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.int16), img.affine)
    assert nifti_to_ants(four_d).shape == (4, 5, 6)


# ------------------------------------------------------------------------------------------------
# apply_transforms: output grid, orientation, nearest neighbour

MOVING_AFFINE = np.array([[2.0, 0, 0, -20.0], [0, 2.0, 0, -22.0], [0, 0, 2.0, -18.0], [0, 0, 0, 1]])
MOVING_SHAPE = (21, 23, 19)  # covers RAS [-20, 20] x [-22, 22] x [-18, 18] mm


def _linear_field(points_ras: np.ndarray) -> np.ndarray:
    """An intensity that is linear in RAS+ position: linear interpolation reproduces it exactly."""
    return 100.0 + 0.5 * points_ras[..., 0] - 0.3 * points_ras[..., 1] + 0.2 * points_ras[..., 2]


def _voxel_points(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture
def moving_linear(tmp_path) -> Path:
    data = _linear_field(_voxel_points(MOVING_SHAPE, MOVING_AFFINE)).astype(np.float32)
    path = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(data, MOVING_AFFINE), path)
    return path


def _reference_affine(kind: str) -> np.ndarray:
    if kind == "LPS":
        return np.array([[-1.5, 0, 0, 9.0], [0, -1.5, 0, 10.0], [0, 0, 1.5, -7.0], [0, 0, 0, 1]])
    if kind == "RAS":
        return np.array([[1.5, 0, 0, -9.0], [0, 1.5, 0, -10.0], [0, 0, 1.5, -7.0], [0, 0, 0, 1]])
    if kind == "PIR":  # permuted axes
        return np.array([[0, 0, 1.5, -7.0], [-1.5, 0, 0, 9.0], [0, -1.5, 0, 7.0], [0, 0, 0, 1]])
    affine = _oblique_affine(zooms=(1.4, 1.1, 1.7), degrees=20.0, origin=(0.0, 0.0, 0.0))
    affine[:3, 3] = -affine[:3, :3] @ (np.array((12, 14, 10)) - 1) / 2  # centre the grid on the origin
    return affine


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PIR", "oblique"])
def test_apply_transforms_writes_exactly_on_reference_grid(tmp_path, moving_linear, orientation):
    affine = _reference_affine(orientation)
    shape = (12, 14, 10)
    reference = tmp_path / f"ref_{orientation}.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape + (1,), np.int16), affine), reference)  # 4-D singleton
    out = apply_transforms(moving_linear, reference, [], interpolation="linear", out_file=tmp_path / "o.nii.gz")
    ref_img, out_img = nib.load(reference), nib.load(out)
    assert out_img.shape == shape
    assert np.array_equal(out_img.affine, ref_img.affine)
    assert np.array_equal(out_img.header.get_sform(), ref_img.header.get_sform())
    np.testing.assert_allclose(out_img.header.get_qform(), ref_img.header.get_qform(), atol=1e-5)
    assert out_img.get_data_dtype() == np.float32
    # the identity resampling must put every value where nibabel says the voxel is
    expected = _linear_field(_voxel_points(shape, ref_img.affine))
    np.testing.assert_allclose(out_img.get_fdata(), expected, rtol=1e-4, atol=1e-3)


def test_apply_transforms_nearest_keeps_a_mask_binary(tmp_path):
    import ants

    shape = (30, 30, 30)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [14.5, 14.5, -14.5]
    points = _voxel_points(shape, affine)
    sphere = (np.linalg.norm(points - [2.0, -1.0, 3.0], axis=-1) < 8.0).astype(np.uint8)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(sphere, affine), mask)
    reference = tmp_path / "ref.nii.gz"
    nib.save(
        nib.Nifti1Image(
            np.zeros((25, 27, 22), np.float32), _oblique_affine(zooms=(1.1, 1.1, 1.3), origin=(-12, -14, -12))
        ),
        reference,
    )
    rotation = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=_rotation([1, 1, 0], 10.0), translation=(1.0, -2.0, 0.5)
    )
    transform = tmp_path / "rot.mat"
    ants.write_transform(rotation, str(transform))
    out = apply_transforms(mask, reference, [transform], interpolation="nearest", out_file=tmp_path / "m.nii.gz")
    out_img = nib.load(out)
    values = np.asanyarray(out_img.dataobj)
    assert out_img.get_data_dtype() == np.uint8
    assert set(np.unique(values)) == {0, 1}
    volume_in = sphere.sum() * 1.0
    volume_out = values.sum() * abs(np.linalg.det(out_img.affine[:3, :3]))
    assert volume_out == pytest.approx(volume_in, rel=0.1)


def test_apply_transforms_rejects_missing_transform(tmp_path, moving_linear):
    with pytest.raises(InputDataError, match="transform file not found"):
        apply_transforms(
            moving_linear,
            moving_linear,
            [tmp_path / "nope.mat"],
            interpolation="linear",
            out_file=tmp_path / "o.nii.gz",
        )


# ------------------------------------------------------------------------------------------------
# rigid registration recovers a known motion of a real scan


def _downsample2(path: Path, out: Path) -> nib.Nifti1Image:
    """2x2x2 block average (1 mm -> 2 mm); the affine keeps the block centres in place."""
    img = nib.load(path)
    data = img.get_fdata(dtype=np.float32)
    shape = tuple(n // 2 for n in data.shape)
    data = data[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]]
    blocks = data.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (img.affine @ [0.5, 0.5, 0.5, 1.0])[:3]
    small = nib.Nifti1Image(blocks, affine)
    nib.save(small, out)
    return small


@pytest.mark.slow
@pytest.mark.parametrize("settings", [DEFAULT_SETTINGS, FULL_RESOLUTION], ids=["working-grid", "full-resolution"])
def test_rigid_registration_recovers_known_motion(tmp_path, settings):
    import ants
    import pandas as pd

    fixed_img = _downsample2(_require(BRATS_T1C), tmp_path / "fixed.nii.gz")
    data = fixed_img.get_fdata()
    brain = np.argwhere(data > 0)
    brain_ras = brain @ fixed_img.affine[:3, :3].T + fixed_img.affine[:3, 3]
    centre = brain_ras.mean(axis=0)
    # true motion (RAS+ mm): the anatomy at x in the fixed image lies at T(x) in the moving image
    rotation = _rotation([0.4, -0.7, 0.6], 6.0)
    translation = np.array([4.0, -3.0, 2.5])
    motion = np.eye(4)
    motion[:3, :3] = rotation
    motion[:3, 3] = centre - rotation @ centre + translation
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), motion @ fixed_img.affine), moving)  # oblique file

    start = time.perf_counter()
    result = register(tmp_path / "fixed.nii.gz", moving, kind="rigid", out_prefix=tmp_path / "out" / "sub_",
                      settings=settings)
    elapsed = time.perf_counter() - start
    assert isinstance(result, RegistrationResult) and result.kind == "rigid"
    assert [p.name for p in result.transforms] == ["sub_0GenericAffine.mat"]
    assert all(p.is_file() for p in result.transforms)

    # ANTs forward transforms map fixed-space LPS points to moving-space LPS points
    points_lps = brain_ras * LPS_FLIP
    estimated = ants.apply_transforms_to_points(
        3, pd.DataFrame(points_lps, columns=["x", "y", "z"]), [str(p) for p in result.transforms]
    )[["x", "y", "z"]].to_numpy()
    true_lps = (brain_ras @ motion[:3, :3].T + motion[:3, 3]) * LPS_FLIP
    error = np.linalg.norm(estimated - true_lps, axis=1)
    print(f"rigid recovery: mean error {error.mean():.3f} mm, max {error.max():.3f} mm, {elapsed:.1f} s")
    assert error.mean() < 1.0
    assert error.max() < 2.0

    # resampling the moving scan back through the estimate reproduces the fixed scan
    back = apply_transforms(
        moving, tmp_path / "fixed.nii.gz", result.transforms, interpolation="linear", out_file=tmp_path / "back.nii.gz"
    )
    back_data = nib.load(back).get_fdata()
    inside = data > 0
    assert np.corrcoef(back_data[inside], data[inside])[0, 1] > 0.97


DETERMINISM_SCRIPT = """
import sys
from pathlib import Path
import ants
from bids_postop.core.registration import register
fixed, moving, out = (Path(a) for a in sys.argv[1:4])
for run in range(2):
    result = register(fixed, moving, kind="rigid", out_prefix=out / f"run{run}_", threads=1, seed=7)
    print(" ".join(repr(float(v)) for v in ants.read_transform(str(result.transforms[0])).parameters))
"""


@pytest.mark.slow
def test_rigid_registration_is_reproducible_single_threaded(tmp_path):
    """Same seed, one ITK thread: bit-identical transforms (ITK reads its thread count once per process,
    so this runs in a fresh interpreter; with several threads ITK's work splitting varies run to run)."""
    import subprocess
    import sys

    fixed_img = _downsample2(_require(BRATS_T1C), tmp_path / "fixed.nii.gz")
    motion = np.eye(4)
    motion[:3, :3] = _rotation([0.0, 0.3, 1.0], 4.0)
    motion[:3, 3] = [2.0, 1.0, -3.0]
    nib.save(
        nib.Nifti1Image(fixed_img.get_fdata(dtype=np.float32), motion @ fixed_img.affine), tmp_path / "moving.nii.gz"
    )
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            DETERMINISM_SCRIPT,
            str(tmp_path / "fixed.nii.gz"),
            str(tmp_path / "moving.nii.gz"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    first, second = run.stdout.strip().splitlines()[-2:]
    assert first == second


@pytest.mark.slow
def test_syn_registration_writes_warp_then_affine(tmp_path):
    fixed_img = _downsample2(_require(BRATS_T1C), tmp_path / "fixed.nii.gz")
    data = fixed_img.get_fdata()
    # a smooth non-linear distortion of the same scan, written on the same grid
    from scipy.ndimage import map_coordinates

    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in data.shape], indexing="ij")
    warped_coords = [grid[0] + 1.5 * np.sin(grid[1] / 12.0), grid[1] + 1.0 * np.cos(grid[2] / 10.0), grid[2]]
    moving_data = map_coordinates(data, warped_coords, order=1).astype(np.float32)
    nib.save(nib.Nifti1Image(moving_data, fixed_img.affine), tmp_path / "moving.nii.gz")
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), fixed_img.affine), mask)

    result = register(
        tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", kind="syn", out_prefix=tmp_path / "syn_", fixed_mask=mask
    )
    assert [p.name for p in result.transforms] == ["syn_1Warp.nii.gz", "syn_0GenericAffine.mat"]
    back = apply_transforms(
        tmp_path / "moving.nii.gz",
        tmp_path / "fixed.nii.gz",
        result.transforms,
        interpolation="linear",
        out_file=tmp_path / "back.nii.gz",
    )
    inside = data > 0
    before = np.abs(moving_data - data)[inside].mean()
    after = np.abs(nib.load(back).get_fdata() - data)[inside].mean()
    assert after < 0.7 * before


def test_register_rejects_mask_on_another_grid(tmp_path, moving_linear):
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), mask)
    with pytest.raises(InputDataError, match="not on the grid"):
        register(moving_linear, moving_linear, kind="rigid", out_prefix=tmp_path / "x_", fixed_mask=mask)


def test_register_rejects_unknown_kind(tmp_path, moving_linear):
    with pytest.raises(ValueError, match="kind must be one of"):
        register(moving_linear, moving_linear, kind="bspline", out_prefix=tmp_path / "x_")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# issue 18: registration on block-averaged copies (DEFAULT_SETTINGS), against known transforms of real scans


def test_block_factors_and_block_average_keep_the_image_in_place():
    assert block_factors((0.67, 0.64, 1.96), 2.0) == (3, 3, 1)
    assert block_factors((0.9, 0.9, 5.5), 2.0) == (2, 2, 1)
    assert block_factors((1.0, 1.0, 1.0), 2.0) == (2, 2, 2)
    affine = _oblique_affine(zooms=(0.6, 0.7, 1.9))
    rng = np.random.default_rng(0)
    data = rng.random((13, 11, 7)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    box = (slice(2, 13), slice(1, 10), slice(0, 7))
    small = block_average(img, (3, 2, 1), box=box)
    assert small.shape == (3, 4, 7)  # 11 // 3, 9 // 2, 7: incomplete last blocks dropped
    np.testing.assert_allclose(small.get_fdata()[1, 2, 3], data[5:8, 5:7, 3].mean(), rtol=1e-6)
    # a block's voxel sits at the centre of the voxels it averages, on the same (oblique) axes
    centre = affine @ np.array([6.0, 5.5, 3.0, 1.0])
    np.testing.assert_allclose(small.affine @ np.array([1.0, 2.0, 3.0, 1.0]), centre, atol=1e-9)
    peak = block_average(nib.Nifti1Image((data > 0.98).astype(np.uint8), affine), (3, 2, 1), box=box, how="max")
    assert peak.get_fdata().sum() >= 1 and set(np.unique(peak.get_fdata())) <= {0.0, 1.0}


def _motion(angles_deg, shift_mm, centre) -> np.ndarray:
    """RAS rigid motion: rotations about x, y, z (degrees) about ``centre``, then ``shift_mm``."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    out[:3, 3] = centre - out[:3, :3] @ centre + np.asarray(shift_mm)
    return out


def _smooth_field(seed: int, rms_mm: float, centre: np.ndarray, terms: int = 4):
    """Low-frequency random displacement (RAS mm): per component, ``terms`` sinusoids of random direction and
    phase, wavelengths 50-110 mm, ``rms_mm`` RMS length, |grad| <= 0.4 (invertible)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(3, terms, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    waves = (directions * (2 * np.pi / rng.uniform(50.0, 110.0, size=(3, terms, 1)))).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=(3, terms)).astype(np.float32)
    amplitude = np.float32(rms_mm / np.sqrt(1.5 * terms))
    centre = np.asarray(centre, dtype=np.float32)

    def field(points: np.ndarray) -> np.ndarray:
        x = np.asarray(points, dtype=np.float32) - centre
        return np.stack([amplitude * np.sin(x @ waves[c].T + phases[c]).sum(-1) for c in range(3)], axis=-1)

    return field


def _sample_world(img: nib.Nifti1Image, points_ras: np.ndarray) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    inv = np.linalg.inv(img.affine)
    vox = points_ras @ inv[:3, :3].T + inv[:3, 3]
    return map_coordinates(np.asanyarray(img.dataobj).astype(np.float32), np.moveaxis(vox, -1, 0), order=1,
                           mode="constant", cval=0.0)


def _grid_world(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _with_noise_floor(data: np.ndarray, seed: int) -> np.ndarray:
    floor = 0.01 * float(np.percentile(data[data > 0], 99))
    return np.maximum(data, np.abs(np.random.default_rng(seed).normal(0, floor, data.shape))).astype(np.float32)


def _estimated_points(transforms, points_ras: np.ndarray) -> np.ndarray:
    import ants
    import pandas as pd

    moved = ants.apply_transforms_to_points(3, pd.DataFrame(points_ras * LPS_FLIP, columns=["x", "y", "z"]),
                                            [str(t) for t in transforms])
    return moved[["x", "y", "z"]].to_numpy() * LPS_FLIP


def _brain_sample(mask: np.ndarray, affine: np.ndarray, n: int = 5000) -> np.ndarray:
    idx = np.argwhere(mask)
    idx = idx[np.random.default_rng(0).choice(len(idx), size=min(n, len(idx)), replace=False)]
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["brats-1mm", "tcga-native"])
def test_adopted_settings_recover_a_known_rigid_motion_of_a_real_scan(tmp_path, case):
    """Issue 18's target: a known 6-DOF motion of a real scan recovered within 0.5 mm mean inside the brain (measured
    with DEFAULT_SETTINGS: 0.02 mm on BraTS at 1 mm, 0.06 mm on TCGA-FG-6692's oblique 0.9×0.9×5.5 mm scan; the
    bounds below are ~5x that). The moving scan is the fixed one moved and resampled (trilinear) onto another grid,
    with a 1 % noise floor; the metric is restricted to the brain, as in the pipeline."""
    if case == "brats-1mm":
        fixed_img = nib.load(_require(BRATS_T1C))
        brain = np.asanyarray(fixed_img.dataobj) > 0
        motion = _motion((5.0, 4.5, -3.0), (4.0, -3.0, 2.5), _centre(fixed_img))
        grid = _oblique_affine(zooms=(1.1, 1.1, 1.1), degrees=12.0, origin=(0.0, 0.0, 0.0))
        shape = (210, 210, 150)
        grid[:3, 3] = _centre(fixed_img) - grid[:3, :3] @ ((np.array(shape) - 1) / 2)
    else:
        fixed_img = nib.load(_require(TCGA_NATIVE_T1C))
        brain = np.asanyarray(nib.load(_require(TCGA_NATIVE_MASK)).dataobj) > 0
        motion = _motion((-4.0, 3.0, 6.0), (-3.0, 5.0, -2.0), _centre(fixed_img))
        grid, shape = fixed_img.affine, fixed_img.shape[:3]
    inverse = np.linalg.inv(motion)  # moving(y) = fixed(M^-1 y): the anatomy at x lies at M x in the moving scan
    points = _grid_world(shape, grid)
    moving_data = _sample_world(fixed_img, points @ inverse[:3, :3].T.astype(np.float32)
                                + inverse[:3, 3].astype(np.float32))
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.round(_with_noise_floor(moving_data, 1)).astype(np.int16), grid), moving)
    mask = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), fixed_img.affine), mask)

    result = register(fixed_img.get_filename(), moving, kind="rigid", out_prefix=tmp_path / "reg_", fixed_mask=mask)
    brain_points = _brain_sample(brain, fixed_img.affine)
    truth = brain_points @ motion[:3, :3].T + motion[:3, 3]
    error = np.linalg.norm(_estimated_points(result.transforms, brain_points) - truth, axis=1)
    print(f"{case}: rigid recovery error mean {error.mean():.3f} mm, max {error.max():.3f} mm")
    assert error.mean() < 0.5  # the target
    assert error.mean() < (0.1 if case == "brats-1mm" else 0.3)
    assert error.max() < 0.6


def _centre(img: nib.Nifti1Image) -> np.ndarray:
    return (img.affine @ np.array([*(np.array(img.shape[:3]) - 1) / 2, 1.0]))[:3]


@pytest.mark.slow
def test_adopted_settings_recover_a_known_smooth_warp_of_a_real_scan(tmp_path):
    """Issue 18's target: a known smooth warp (random sinusoids, 2 mm RMS, wavelengths 50-110 mm) after a rigid
    motion (3°, -2°, 4°; 3, 2, -4 mm) of the real BraTS T1w-CE, recovered by SyN on the working grid within 1 mm
    mean inside the brain (measured: see benchmarks/RESULTS.md); the affine stage alone is far off, so the
    deformable stage is what recovers it."""
    fixed_img = nib.load(_require(BRATS_T1C))
    brain = np.asanyarray(fixed_img.dataobj) > 0
    centre = _centre(fixed_img)
    motion = _motion((3.0, -2.0, 4.0), (3.0, 2.0, -4.0), centre)
    field = _smooth_field(7, 2.0, centre)
    inverse = np.linalg.inv(motion)
    points = _grid_world(fixed_img.shape, fixed_img.affine)
    z = points @ inverse[:3, :3].T.astype(np.float32) + inverse[:3, 3].astype(np.float32)
    moving_data = _sample_world(fixed_img, z + field(z))  # moving(y) = fixed(w(y)), w(y) = z + d(z), z = M^-1 y
    del points, z
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.round(_with_noise_floor(moving_data, 2)).astype(np.int16), fixed_img.affine), moving)
    mask = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), fixed_img.affine), mask)

    result = register(fixed_img.get_filename(), moving, kind="syn", out_prefix=tmp_path / "syn_", fixed_mask=mask)
    assert [p.name for p in result.transforms] == ["syn_1Warp.nii.gz", "syn_0GenericAffine.mat"]
    brain_points = _brain_sample(brain, fixed_img.affine)
    inside = brain_points.copy()  # the truth maps x to w^-1(x): solve z + d(z) = x, then y = M z
    for _ in range(60):
        inside = brain_points - field(inside)
    truth = inside @ motion[:3, :3].T + motion[:3, 3]
    error = np.linalg.norm(_estimated_points(result.transforms, brain_points) - truth, axis=1)
    affine_only = np.linalg.norm(_estimated_points(result.transforms[1:], brain_points) - truth, axis=1)
    print(f"warp recovery error mean {error.mean():.3f} mm, p95 {np.percentile(error, 95):.3f} mm "
          f"(affine stage alone: {affine_only.mean():.3f} mm)")
    assert error.mean() < 1.0  # the target
    assert affine_only.mean() > 1.5 * error.mean()

