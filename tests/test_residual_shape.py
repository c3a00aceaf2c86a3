"""RANO resect class and bidimensional measures in the participant outputs (issue #20, items 2-4): the
non-enhancing residual mask is found in a -d dataset, PostProcess measures both, the TSV has the columns and the
report draws the diameters."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from conftest import affine_for, make_bids, write_nifti

from bids_postop.bids.inputs import NONENHANCING_ROLE, discover
from bids_postop.interfaces.core import PostProcess
from bids_postop.interfaces.measures import DiametersFigure


def _run(node, cwd):
    cwd.mkdir(parents=True, exist_ok=True)
    return node.run(cwd=str(cwd))


def _box_probability(path, affine, box=(slice(10, 34), slice(12, 26), slice(8, 14))):
    data = np.zeros((48, 40, 24), np.float32)
    data[box] = 0.9
    return write_nifti(path, data, affine)


def test_nonenhancing_mask_is_found_in_a_derivatives_dataset(tmp_path):
    ce = "ses-postop/anat/sub-01_ses-postop_ce-gadolinium_T1w.nii.gz"
    root = make_bids(tmp_path / "bids", {"01": {ce: None}})
    nonce = root / "derivatives" / "nonce"
    (nonce).mkdir(parents=True)
    (nonce / "dataset_description.json").write_text(json.dumps({
        "Name": "non-enhancing", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    write_nifti(nonce / "sub-01" / "ses-postop" / "anat" / "sub-01_ses-postop_label-nonenhancing_mask.nii.gz",
                np.zeros((8, 8, 8), np.uint8))
    [inputs] = discover(root, derivatives={"nonce": nonce}, validate=False)
    assert inputs.files[NONENHANCING_ROLE].name == "sub-01_ses-postop_label-nonenhancing_mask.nii.gz"


def test_postprocess_measures_rano_class_and_diameters_on_an_oblique_grid(tmp_path):
    affine = affine_for("LPS", (1.0, 1.0, 2.0), oblique_deg=15)
    prob = _box_probability(tmp_path / "prob.nii.gz", affine)
    preop = write_nifti(tmp_path / "preop.nii.gz", np.ones((30, 30, 30), np.uint8), np.eye(4))  # 27 ml
    nonce = write_nifti(tmp_path / "nonce.nii.gz", np.zeros((10, 10, 10), np.uint8), np.eye(4))  # nothing left
    node = PostProcess(probseg=str(prob), threshold=0.5, preop_mask=str(preop), nonenhancing_mask=str(nonce))
    result = _run(node, tmp_path / "pp")
    m = json.loads(open(result.outputs.measures).read())
    # 24 x 14 x 6 voxels of 2 mm3: 4.032 ml residual of 27 ml -> RANO 3A (<= 5 ml enhancing residual)
    assert m["residual_volume_ml"] == 4.032 and m["rano_resect_class"] == "3A"
    assert m["residual_nonenhancing_ml"] == 0.0
    # one component, axial diameters of a 24 x 14 mm box tilted 15 degrees about R: measurable
    [comp] = m["bidimensional"]["components"]
    assert m["measurable_lesions"] == 1 and comp["measurable"]
    assert abs(comp["longest_mm"] - np.hypot(24, 14 / np.cos(np.deg2rad(15)))) < 2.0
    assert m["sum_bidimensional_mm2"] == comp["product_mm2"] > 100
    # the report's figure of the two diameters
    t1ce = write_nifti(tmp_path / "t1ce.nii.gz", np.random.default_rng(0).normal(100, 10, (48, 40, 24)), affine)
    fig = DiametersFigure(t1ce=str(t1ce), measures=result.outputs.measures, figures={"mosaic": "m.png"})
    out = _run(fig, tmp_path / "fig").outputs.figures
    assert set(out) == {"mosaic", "diameters"} and open(out["diameters"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_gtr_with_nothing_non_enhancing_left_is_class_1_and_without_the_mask_1_or_2a(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    prob = write_nifti(tmp_path / "prob.nii.gz", np.zeros((20, 20, 20), np.float32), affine)  # nothing: GTR
    preop = write_nifti(tmp_path / "preop.nii.gz", np.ones((20, 20, 20), np.uint8), affine)
    nonce = write_nifti(tmp_path / "nonce.nii.gz", np.zeros((20, 20, 20), np.uint8), affine)
    with_mask = PostProcess(probseg=str(prob), threshold=0.5, preop_mask=str(preop), nonenhancing_mask=str(nonce))
    m = json.loads(open(_run(with_mask, tmp_path / "a").outputs.measures).read())
    assert (m["resection_status"], m["rano_resect_class"], m["measurable_lesions"]) == ("GTR", "1", 0)
    assert m["sum_bidimensional_mm2"] == 0
    without = PostProcess(probseg=str(prob), threshold=0.5, preop_mask=str(preop))
    m = json.loads(open(_run(without, tmp_path / "b").outputs.measures).read())
    assert m["rano_resect_class"] == "1/2A" and m["residual_nonenhancing_ml"] is None
    assert nib.load(str(prob)).shape == (20, 20, 20)
