"""The nnU-Net backend on the shipped demo model: grids, orientation handling, channel checks."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_postop.core.images import from_ras, to_ras
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation.models import DEMO_MODELS, resolve_models
from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability

FAST = NnUNetOptions(device="cpu", use_mirroring=False)


@pytest.fixture(scope="module")
def card_b():
    cards = {c.configuration: c for c in resolve_models("demo")}
    assert "B" in cards, f"demo model B missing in {DEMO_MODELS}"
    return cards["B"]


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory):
    """A simulated post-op case (RAS grid) with a residual fragment, skull-stripped as the pipeline does."""
    from bids_postop.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=3)
    anat = root / "sub-01" / "ses-postop" / "anat"
    t1ce = next(anat.glob("*_ce-*_T1w.nii.gz"))
    t1 = anat / "sub-01_ses-postop_T1w.nii.gz"
    return nib.load(t1ce), nib.load(t1)


def reoriented(img: nib.Nifti1Image, codes: str, oblique_deg: float = 0.0) -> nib.Nifti1Image:
    """The same image stored in another voxel order (and optionally with an oblique affine)."""
    from nibabel import orientations as nio

    data = np.asanyarray(img.dataobj)
    ornt = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(tuple(codes)))
    new = img.as_reoriented(ornt)
    aff = new.affine.copy()
    if oblique_deg:
        t = np.deg2rad(oblique_deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        aff = rot @ aff
    assert new.shape == nio.apply_orientation(data, ornt).shape
    return nib.Nifti1Image(np.asanyarray(new.dataobj), aff)


@pytest.mark.slow
def test_probability_is_on_the_input_grid_whatever_the_orientation(tmp_path, card_b, demo_case):
    t1ce, t1 = demo_case
    results = {}
    for codes, oblique in [("RAS", 0.0), ("LPS", 0.0), ("PIL", 0.0), ("LPS", 8.0)]:
        files = []
        for name, img in (("t1ce", t1ce), ("t1", t1)):
            out = tmp_path / f"{codes}{oblique}_{name}.nii.gz"
            nib.save(reoriented(img, codes, oblique), out)
            files.append(out)
        prob = predict_probability(card_b, files, options=FAST)
        ref = nib.load(files[0])
        assert prob.shape == ref.shape and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        results[(codes, oblique)] = to_ras(prob, ref.affine)
    base = results[("RAS", 0.0)]
    assert (base > card_b.threshold).sum() > 20, "the residual fragment of the demo case should be found"
    for key, ras in results.items():
        # the network sees the same RAS array whatever the storage order: identical probabilities
        np.testing.assert_allclose(ras, base, atol=1e-4, err_msg=str(key))


def test_channel_count_and_grid_are_checked(tmp_path, card_b, demo_case):
    t1ce, t1 = demo_case
    nib.save(t1ce, tmp_path / "a.nii.gz")
    with pytest.raises(ModelError, match="takes 2 channels"):
        predict_probability(card_b, [tmp_path / "a.nii.gz"], options=FAST)
    small = nib.Nifti1Image(np.asanyarray(t1.dataobj)[:-2], t1.affine)
    nib.save(small, tmp_path / "b.nii.gz")
    with pytest.raises(InputDataError, match="b.nii.gz.*register it first"):
        predict_probability(card_b, [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], options=FAST)


def test_from_ras_of_to_ras_is_identity_on_demo_grid(demo_case):
    t1ce, _ = demo_case
    data = np.asanyarray(t1ce.dataobj)
    np.testing.assert_array_equal(from_ras(to_ras(data, t1ce.affine), t1ce.affine), data)


def test_checkpoints_load_without_code_execution():
    import torch

    for card in resolve_models("demo"):
        for ckpt in Path(card.folder).rglob("checkpoint_*.pth"):
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            assert "network_weights" in state and "optimizer_state" not in state


@pytest.mark.slow
def test_cropping_to_the_nonzero_box_gives_the_stock_result(tmp_path, card_b, demo_case):
    """Cropping before nnU-Net (the default) equals nnU-Net's own ``predict_single_npy_array`` on the whole
    grid: nnU-Net crops to the same nonzero box before resampling. Checked on an oblique LPS grid padded with
    a zero margin, the layout of a skull-stripped scan with a large field of view."""
    from dataclasses import replace

    t1ce, t1 = demo_case
    files = []
    for name, img in (("t1ce", t1ce), ("t1", t1)):
        moved = reoriented(img, "LPS", 5.0)
        data = np.pad(np.asanyarray(moved.dataobj), ((7, 3), (0, 12), (4, 0)))
        aff = moved.affine.copy()
        aff[:3, 3] -= aff[:3, :3] @ np.array([7, 0, 4])
        files.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, aff), files[-1])
    cropped = predict_probability(card_b, files, options=FAST)
    whole = predict_probability(card_b, files, options=replace(FAST, crop=False))
    assert cropped.shape == whole.shape == nib.load(files[0]).shape
    # identical up to float rounding (the lean two-class export resamples l1 - l0 instead of both logits)
    assert np.abs(cropped - whole).max() < 1e-3
    a, b = cropped > card_b.threshold, whole > card_b.threshold
    assert b.sum() > 20
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999


def test_nonzero_box():
    from bids_postop.segmentation.nnunet import nonzero_box

    a, b = np.zeros((5, 6, 7)), np.zeros((5, 6, 7))
    assert nonzero_box([a, b]) is None
    a[1, 2, 3] = 1
    b[3, 4, 0] = -2
    assert nonzero_box([a, b]) == (slice(1, 4), slice(2, 5), slice(0, 4))
