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


def test_members_rano_and_methods_reach_every_output(demo_run):
    """The demo models have one fold and left-right mirroring: their two mirrored passes are the members; the
    spread map, the review flag, the RANO class and the bidimensional measures reach the TSV, the JSON, the
    BIDS derivatives and the report; the methods describe what ran."""
    root, out, _, _ = demo_run
    for sub in ("01", "04"):
        [measures] = (out / f"sub-{sub}" / "ses-postop").glob("*_measures.json")
        data = json.loads(measures.read_text())
        spread = data["uncertainty"]
        assert spread["members_kind"] == "mirrored passes" and spread["members_count"] == 2
        assert isinstance(spread["review_flag"], bool) and 0 <= spread["rt_fraction_members"] <= 1
        assert spread["residual_volume_ml_min"] <= spread["residual_volume_ml_max"]
        uncertainty = nib.load(out / data["outputs"]["uncertainty_map"])
        t1ce = nib.load(next((root / f"sub-{sub}" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz")))
        assert uncertainty.shape == t1ce.shape and np.allclose(uncertainty.affine, t1ce.affine)
        values = np.asanyarray(uncertainty.dataobj)
        assert values.min() >= 0 and values.max() <= 0.5
        assert data["measures"]["rano_resect_class"] in ("1", "2A", "1/2A", "2B", "3A", "3B", "4", "n/a")
        rows = list(csv.DictReader(measures.with_suffix(".tsv").open(), delimiter="\t"))
        assert rows[0]["review_flag"] in ("true", "false") and rows[0]["rano_resect_class"] != ""
        assert rows[0]["measurable_lesions"].isdigit()
        report = (out / f"sub-{sub}.html").read_text()
        assert 'id="review-flag"' in report and 'id="rano-table"' in report and 'id="methods-text"' in report
    methods = (out / "logs" / "CITATION.md").read_text()
    assert "nnU-Net v2" in methods and "with mirroring test-time augmentation" in methods
    assert "@article{bids_postop:study" in (out / "logs" / "CITATION.bib").read_text()
