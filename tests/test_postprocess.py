import numpy as np
import pytest

from bids_postop.core.postprocess import (
    binarize,
    classify_resection,
    extent_of_resection,
    postprocess_probability,
    remove_small_components,
    volume_ml,
)


def test_components_below_20_voxels_are_removed_and_20_kept():
    mask = np.zeros((40, 40, 40), bool)
    mask[2:4, 2:4, 2:7] = True  # 20 voxels: kept
    mask[20:22, 20:22, 20:24] = True  # 16 voxels: removed
    mask[30, 30, 30:34] = True  # 4 voxels in a line: removed
    out = remove_small_components(mask, min_voxels=20)
    assert out[2:4, 2:4, 2:7].all()
    assert out.sum() == 20


def test_diagonal_neighbours_count_as_one_component():
    mask = np.zeros((30, 30, 30), bool)
    for i in range(20):  # 20 voxels touching only by corners: one 26-connected component
        mask[i, i, i] = True
    assert remove_small_components(mask, min_voxels=20).sum() == 20
    assert remove_small_components(mask, min_voxels=20, connectivity=6).sum() == 0


@pytest.mark.parametrize("spacing, voxels, expected_ml", [
    ((1.0, 1.0, 1.0), 1000, 1.0),
    ((0.5, 0.5, 4.0), 1000, 1.0),
    ((0.67, 0.64, 1.96), 100, 100 * 0.67 * 0.64 * 1.96 / 1000),
])
def test_volume_uses_anisotropic_voxel_sizes(spacing, voxels, expected_ml):
    mask = np.zeros(20000, bool)
    mask[:voxels] = True
    assert volume_ml(mask.reshape(20, 25, 40), spacing) == round(expected_ml, 6)  # rounded to 1e-6 ml


@pytest.mark.parametrize("volume, inclusive, expected", [
    (0.0, False, "GTR"), (0.1749, False, "GTR"), (0.175, False, "RT"), (0.175, True, "GTR"),
    (0.1751, True, "RT"), (3.0, False, "RT"),
])
def test_gtr_cutoff_edge(volume, inclusive, expected):
    assert classify_resection(volume, gtr_inclusive=inclusive) == expected


def test_exactly_0175_ml_from_a_mask_is_rt_by_paper_rule():
    # 175 voxels of 1 mm^3 = 0.175 ml exactly
    prob = np.zeros((20, 20, 20), np.float32)
    prob[2:9, 2:7, 2:7] = 0.9  # 7*5*5 = 175 voxels
    mask, measures = postprocess_probability(prob, (1.0, 1.0, 1.0), threshold=0.5)
    assert measures.residual_volume_ml == pytest.approx(0.175)
    assert measures.resection_status == "RT"
    _, inclusive = postprocess_probability(prob, (1.0, 1.0, 1.0), threshold=0.5, gtr_inclusive=True)
    assert inclusive.resection_status == "GTR"


def test_postprocess_measures_and_eor():
    prob = np.zeros((30, 30, 30), np.float32)
    prob[5:15, 5:15, 5:15] = 0.8  # 1000 voxels
    prob[25, 25, 25:28] = 0.99  # speck
    prob[20:22, 20:22, 20:22] = 0.4  # below threshold
    mask, m = postprocess_probability(prob, (0.5, 0.5, 2.0), threshold=0.5, preop_volume_ml=10.0)
    assert mask.dtype == np.uint8 and mask.sum() == 1000
    assert m.components_removed == 1 and m.voxels_above_threshold == 1003
    assert m.residual_volume_ml == pytest.approx(0.5)
    assert m.eor_percent == pytest.approx(95.0)
    assert m.resection_status == "RT"


def test_threshold_is_inclusive_and_validated():
    assert binarize(np.array([0.49, 0.5, 0.51]), 0.5).tolist() == [False, True, True]
    with pytest.raises(ValueError):
        binarize(np.zeros(3), 1.0)


def test_eor_unknown_without_preop_and_not_clipped():
    assert extent_of_resection(None, 1.0) is None
    assert extent_of_resection(0.0, 1.0) is None
    assert extent_of_resection(2.0, 3.0) == pytest.approx(-50.0)
