"""The participant level end to end through the CLI, on real components, on the simulated demo data."""

import csv
import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
from conftest import require_tool

from bids_postop.cli.run import main
from bids_postop.demo.dataset import write_demo_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "bids"
    demo = write_demo_dataset(root, seed=0)
    # sub-02 loses its post-op contrast T1w: it must be reported and skipped while the others run
    for f in (root / "sub-02" / "ses-postop" / "anat").glob("*_ce-*_T1w.*"):
        f.unlink()
    out = root / "derivatives" / "bids_postop"
    code = main([str(root), str(out), "participant", "--participant-label", "01", "sub-02", "04",
                 "-d", f"preop={root / 'derivatives' / 'preop_masks'}", "--model", "demo",
                 "-w", str(root.parent / "work"), "--nprocs", "2", "--device", "cpu"])
    return root, out, code, demo


def test_exit_code_reports_the_skipped_participant(demo_run):
    _, out, code, _ = demo_run
    assert code == 1
    log = next((out / "logs").glob("*.log")).read_text()
    assert "sub-02 skipped: no post-operative contrast T1w" in log
    assert "sub-01: finished" in log and "sub-04: finished" in log


@pytest.mark.parametrize("sub, config, site", [("01", "E", "north"), ("04", "B", "south")])
def test_outputs_are_on_the_contrast_t1w_grid(demo_run, sub, config, site):
    root, out, _, _ = demo_run
    t1ce = next((root / f"sub-{sub}" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
    ref = nib.load(t1ce)
    anat = out / f"sub-{sub}" / "ses-postop" / "anat"
    prefix = t1ce.name.replace("_T1w.nii.gz", "")
    desc = f"demo{config}"  # derivatives carry the model (demo-B → desc-demoB)
    for suffix, dtype in ((f"label-tumor_desc-{desc}_mask", np.uint8), (f"label-tumor_desc-{desc}_probseg",
                                                                       np.float32), ("desc-brain_mask", np.uint8)):
        img = nib.load(anat / f"{prefix}_{suffix}.nii.gz")
        assert img.shape == ref.shape, suffix
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5, err_msg=suffix)
        assert img.get_data_dtype() == dtype
        sidecar = json.loads((anat / f"{prefix}_{suffix}.json").read_text())
        assert sidecar["Sources"] and sidecar["SpatialReference"].endswith(t1ce.name)
    mask = nib.load(anat / f"{prefix}_label-tumor_desc-{desc}_mask.nii.gz").get_fdata()
    assert set(np.unique(mask)) <= {0.0, 1.0}
    brain = nib.load(anat / f"{prefix}_desc-brain_mask.nii.gz").get_fdata()
    voxel_ml = float(np.prod(ref.header.get_zooms()[:3])) / 1000
    assert 800 < brain.sum() * voxel_ml < 2000, "a plausible brain volume in ml"
    [row] = list(csv.DictReader((out / f"sub-{sub}" / "ses-postop" /
                                 f"sub-{sub}_ses-postop_desc-{desc}_measures.tsv").open(), delimiter="\t"))
    assert row["config"] == config and row["site"] == site and row["model"] == f"demo-{config}"
    assert float(row["residual_volume_ml"]) == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
    assert row["resection_status"] == ("GTR" if float(row["residual_volume_ml"]) < 0.175 else "RT")
    # what the segmentation actually ran, beside what was asked (default preset: onnxruntime on the CPU)
    measures = json.loads((out / f"sub-{sub}" / "ses-postop" / f"sub-{sub}_ses-postop_desc-{desc}_measures.json")
                          .read_text())
    ran = measures["provenance"]["segmentation"]
    assert ran["engine"] == "onnxruntime" and ran["precision"] == "fp32" and ran["use_mirroring"] is True
    assert measures["provenance"]["preset"]["nnunet_engine"] == "auto"
    if config == "E":
        assert float(row["preop_volume_ml"]) > 1 and row["eor_percent"] != "n/a"
    else:
        assert row["preop_volume_ml"] == "n/a" and row["eor_percent"] == "n/a"


def test_demo_residuals_are_found(demo_run):
    root, out, _, demo = demo_run
    from bids_postop.cli.demo import dice

    for sub in ("01", "04"):
        truth = nib.load(next((root / "derivatives" / "manual" / f"sub-{sub}").rglob("*_label-tumor_mask.nii.gz")))
        pred = nib.load(next((out / f"sub-{sub}").rglob("*_label-tumor_desc-demo*_mask.nii.gz")))
        assert dice(truth.get_fdata(), pred.get_fdata()) > 0.3, sub


def test_dataset_description_and_nothing_else_written_for_skipped(demo_run):
    root, out, _, _ = demo_run
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "bids_postop"
    assert not (out / "sub-02").exists()
    assert not list(out.rglob(".*.tmp*")), "no temporary files left"


def test_derivatives_pass_the_bids_validator(demo_run):
    _, out, _, _ = demo_run
    exe = require_tool("bids-validator-deno")
    proc = subprocess.run([exe, str(out), "--json", "--datasetTypes", "derivative"], capture_output=True, text=True)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert not errors, errors[:5]
