"""Dice, Jaccard and HD95 against MedPy (independent reference) on anisotropic, multi-component masks."""

from __future__ import annotations

import numpy as np
import pytest

from bids_postop.evaluation.metrics import (
    BOTH_EMPTY,
    Value,
    bounding_box,
    compare_masks,
    dice,
    hd95,
    jaccard_from_dice,
    surface,
)

medpy_binary = pytest.importorskip("medpy.metric.binary")

SPACING = (0.67, 0.64, 1.96)  # the typical T1w-CE of SPEC.md
SHAPE = (40, 36, 20)


def blobs(seed: int, n: int, shape=SHAPE) -> np.ndarray:
    """``n`` random ellipsoid-ish components (some touching the image border)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    mask = np.zeros(shape, bool)
    for _ in range(n):
        centre = rng.uniform(0, shape)
        radii = rng.uniform(1.0, 5.0, size=3)
        mask |= (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    return mask


def single(index, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[index] = True
    return mask


PAIRS = {
    "multi-component vs multi-component": (blobs(1, 4), blobs(2, 3)),
    "overlapping, shifted": (blobs(3, 2), np.roll(blobs(3, 2), 2, axis=0)),
    "identical": (blobs(4, 3), blobs(4, 3)),
    "single voxel vs single voxel": (single((3, 4, 5)), single((30, 20, 15))),
    "single voxel vs blob": (single((10, 10, 10)), blobs(5, 2)),
    "touching the image border": (np.pad(np.ones((10, 8, 4), bool), ((0, 30), (28, 0), (0, 16))), blobs(6, 2)),
    "far apart (large bounding box)": (single((0, 0, 0)), single((39, 35, 19))),
    "many specks": (blobs(7, 25), blobs(8, 25)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_hd95_matches_medpy_on_anisotropic_masks(name):
    a, b = PAIRS[name]
    expected = medpy_binary.hd95(a, b, voxelspacing=SPACING)
    got = hd95(a, b, SPACING)
    assert got.reason is None
    assert got.value == pytest.approx(expected, abs=1e-6)
    assert hd95(b, a, SPACING).value == pytest.approx(expected, abs=1e-6)  # symmetric


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_medpy_on_random_blobs(seed):
    a, b = blobs(100 + seed, 1 + seed % 4), blobs(200 + seed, 1 + (seed + 1) % 4)
    if not (a.any() and b.any()):
        pytest.skip("empty draw")
    spacing = (0.26, 1.0, 7.2) if seed % 2 else SPACING  # the extreme spacings of SPEC.md
    assert hd95(a, b, spacing).value == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=spacing), abs=1e-6)


@pytest.mark.parametrize("name", list(PAIRS))
def test_dice_and_jaccard_match_medpy(name):
    a, b = PAIRS[name]
    d = dice(a, b)
    assert d == pytest.approx(medpy_binary.dc(a, b), abs=1e-12)
    assert jaccard_from_dice(d) == pytest.approx(medpy_binary.jc(a, b), abs=1e-12)


@pytest.mark.parametrize(("a", "b", "reason"), [
    (np.zeros(SHAPE, bool), blobs(1, 2), "prediction empty"),
    (blobs(1, 2), np.zeros(SHAPE, bool), "reference empty"),
    (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), BOTH_EMPTY),
])
def test_hd95_undefined_with_reason_when_a_mask_is_empty(a, b, reason):
    got = hd95(a, b, SPACING)
    assert got.value is None and reason in got.reason


def test_dice_of_empty_masks_is_undefined_and_empty_prediction_scores_zero():
    empty = np.zeros(SHAPE, bool)
    assert dice(empty, empty) is None
    assert dice(empty, blobs(1, 2)) == 0.0
    m = compare_masks(empty, empty, SPACING)
    assert m.dice.value is None and BOTH_EMPTY in m.dice.reason
    assert m.hd95_mm.value is None


def test_compare_masks_volumes_in_ml():
    a, b = single((1, 1, 1)), blobs(3, 2)
    m = compare_masks(a, b, SPACING)
    voxel_ml = np.prod(SPACING) / 1000
    # volumes are rounded to 1e-6 ml (1 nl) before any comparison with the GTR cut-off
    assert m.predicted_volume_ml == round(voxel_ml, 6)
    assert m.true_volume_ml == round(b.sum() * voxel_ml, 6)
    assert m.volume_error_ml == pytest.approx(voxel_ml - b.sum() * voxel_ml, abs=1e-6)
    assert m.hd95_mm.value == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=SPACING), abs=1e-6)


def test_surface_of_a_single_voxel_and_of_a_cube():
    assert surface(single((5, 5, 5))).sum() == 1
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    assert surface(cube).sum() == 5**3 - 3**3


def test_bounding_box_margin_is_clipped_to_the_grid():
    mask = single((0, 5, 19))
    assert bounding_box(mask, margin=1) == (slice(0, 2), slice(4, 7), slice(18, 20))
    assert bounding_box(np.zeros(SHAPE, bool)) is None


@pytest.mark.parametrize("bad", [(1.0, 1.0), (1.0, 0.0, 1.0)])
def test_bad_spacing_is_rejected(bad):
    with pytest.raises(ValueError, match="spacing"):
        hd95(blobs(1, 1), blobs(2, 1), bad)


def test_value_holds_a_number_or_a_reason():
    with pytest.raises(ValueError):
        Value(None)
    with pytest.raises(ValueError):
        Value(1.0, "why")
    with pytest.raises(ValueError, match="Dice"):
        jaccard_from_dice(1.5)


# --- volumes: |det(affine)| per voxel, rounded to 1e-6 ml before the GTR cut-off ------------------------------

def _tilted(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    affine = np.eye(4)
    affine[:3, :3] = [[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]
    return affine


def test_175_voxels_of_1mm_on_a_tilted_grid_are_residual_tumour():
    from bids_postop.core.postprocess import classify_resection, postprocess_probability, volume_ml

    affine = _tilted(7.0)
    mask = np.zeros((20, 20, 20), bool)
    mask[2:9, 2:7, 2:7] = True  # 7 × 5 × 5 = 175 voxels of 1 mm³
    raw = 175 * float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000  # column norms, float32-ish
    assert abs(np.linalg.det(affine[:3, :3]) - 1.0) < 1e-12
    assert volume_ml(mask, affine) == 0.175 and classify_resection(volume_ml(mask, affine)) == "RT"
    assert raw == pytest.approx(0.175, abs=1e-9)
    # the float32 affine nibabel hands out (what the issue measured: 0.1749999962 ml) is rounded the same way
    f32 = affine.astype(np.float32).astype(np.float64)
    assert 175 * abs(np.linalg.det(f32[:3, :3])) / 1000 != 0.175
    assert volume_ml(mask, f32) == 0.175
    rt = sum(classify_resection(volume_ml(mask, _tilted(d).astype(np.float32).astype(np.float64))) == "RT"
             for d in range(360))
    assert rt == 360
    _, measures = postprocess_probability(mask.astype(np.float32), f32, threshold=0.5)
    assert measures.residual_volume_ml == 0.175 and measures.resection_status == "RT"


def test_a_sheared_affine_volume_uses_the_determinant():
    from bids_postop.core.postprocess import volume_ml, voxel_volume_mm3

    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[0, 2] = 1.5  # shear: the third column is not orthogonal to the first
    norms = np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    assert voxel_volume_mm3(affine) == pytest.approx(0.5 * 0.5 * 2.0)
    assert norms > voxel_volume_mm3(affine) * 1.2  # the column norms would overstate it by 25 %
    mask = np.zeros((10, 10, 10), bool)
    mask[:4, :5, :6] = True
    assert volume_ml(mask, affine) == round(120 * 0.5 / 1000, 6)
    assert volume_ml(mask, 0.5) == volume_ml(mask, affine[:3, :3]) == volume_ml(mask, affine)
    # the group level measures a sheared grid the same way
    m = compare_masks(mask, mask, (0.5, 0.5, 2.0), grid=affine)
    assert m.true_volume_ml == m.predicted_volume_ml == 0.06
    with pytest.raises(ValueError, match="affine"):
        voxel_volume_mm3(np.ones((2, 5)))
