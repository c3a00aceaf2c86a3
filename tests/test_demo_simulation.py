"""Fast tests of the demo: simulation, demo BIDS dataset writer and the shipped demo models (no training)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import require_tool
from scipy import ndimage

from bids_postop.configurations import CONFIGURATIONS
from bids_postop.demo import simulate as sim
from bids_postop.demo.dataset import write_demo_dataset

MODELS_DIR = Path(sim.__file__).resolve().parents[1] / "data" / "models" / "demo"


# ------------------------------------------------------------------------------------------ simulation


@pytest.mark.parametrize("name", sim.CASE_NAMES)
@pytest.mark.parametrize("seed", [0, 7])
def test_residual_fragments_on_cavity_rim_inside_brain(name: str, seed: int) -> None:
    case = sim.load_case(name)
    s = sim.simulate_postop_case(case, np.random.default_rng(seed), residual=True)
    res, cav, brain = s.residual_mask > 0, s.cavity_mask > 0, s.brain_mask > 0
    assert res.any() and cav.any()
    assert not (res & ~brain).any(), "residual outside the brain"
    assert not (res & cav).any(), "residual inside the cavity"
    # every residual voxel lies within a fragment diameter (+ one voxel) of the cavity: a fragment is a
    # ball centred on the wall of the carved cavity, whose inner half was given back to the fragment
    dist_mm = ndimage.distance_transform_edt(~cav, sampling=s.spacing)
    assert dist_mm[res].max() <= 2 * sim.FRAGMENT_RADIUS_MM[1] + max(s.spacing) + 1e-6
    # and every fragment touches the cavity wall
    lab, n = ndimage.label(res)
    near_cavity = ndimage.binary_dilation(cav, iterations=2)
    assert 1 <= n <= 4
    for k in range(1, n + 1):
        assert (near_cavity & (lab == k)).any(), f"fragment {k} is not on the cavity rim"
    # distractors are not tumour
    assert not (res & (s.enhancing_rim_mask > 0)).any()
    assert not (res & (s.blood_mask > 0)).any()
    assert s.enhancing_rim_mask.any() and s.blood_mask.any()


@pytest.mark.parametrize("name", sim.CASE_NAMES)
def test_contrasts_of_fragments_blood_and_cavity(name: str) -> None:
    case = sim.load_case(name)
    s = sim.simulate_postop_case(case, np.random.default_rng(3), residual=True)
    healthy = (s.brain_mask > 0) & ~(s.preop_mask > 0)
    res, blood = s.residual_mask > 0, s.blood_mask > 0
    inner = ndimage.binary_erosion(s.cavity_mask > 0, iterations=2)
    med = {k: float(np.median(getattr(s, k)[healthy])) for k in ("postop_t1ce", "postop_t1", "postop_flair")}
    assert np.median(s.postop_t1ce[res]) > 1.4 * med["postop_t1ce"]  # enhancing
    assert 0.7 < np.median(s.postop_t1[res]) / med["postop_t1"] < 1.3  # iso on T1w
    assert np.median(s.postop_flair[res]) > 1.2 * med["postop_flair"]  # bright on FLAIR
    assert np.median(s.postop_t1[blood]) > 1.2 * med["postop_t1"]  # blood: bright on T1w too
    for k in med:  # CSF-like cavity
        assert np.median(getattr(s, k)[inner]) < 0.5 * med[k]
    for arr in (s.postop_t1ce, s.postop_t1, s.postop_flair, s.preop_t1ce):
        assert arr.dtype == np.int16 and arr.min() >= 0
        assert not arr[s.brain_mask == 0].any()


@pytest.mark.parametrize("name", sim.CASE_NAMES)
def test_gtr_cases_have_empty_residual(name: str) -> None:
    s = sim.simulate_postop_case(sim.load_case(name), np.random.default_rng(11), residual=False)
    assert s.residual_mask.dtype == np.uint8
    assert not s.residual_mask.any()
    assert s.residual_volume_ml == 0.0
    assert s.cavity_mask.any() and s.enhancing_rim_mask.any()


@pytest.mark.parametrize("seed", range(6))
def test_rt_cases_are_above_gtr_cutoff(seed: int) -> None:
    name = sim.CASE_NAMES[seed % len(sim.CASE_NAMES)]
    s = sim.simulate_postop_case(sim.load_case(name), np.random.default_rng(seed), residual=True)
    assert 0.175 <= s.residual_volume_ml <= 4.5


def test_simulation_is_deterministic_for_a_seed() -> None:
    case = sim.load_case(sim.CASE_NAMES[0])
    a = sim.simulate_postop_case(case, np.random.default_rng(5), residual=True)
    b = sim.simulate_postop_case(case, np.random.default_rng(5), residual=True)
    c = sim.simulate_postop_case(case, np.random.default_rng(6), residual=True)
    for key in ("postop_t1ce", "postop_t1", "postop_flair", "residual_mask", "blood_mask"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.postop_t1ce, c.postop_t1ce)
    np.testing.assert_array_equal(a.preop_t1ce, c.preop_t1ce)  # the real pre-op scan


def test_preop_inputs_are_the_real_case() -> None:
    case = sim.load_case(sim.CASE_NAMES[1])
    s = sim.simulate_postop_case(case, np.random.default_rng(0), residual=False)
    np.testing.assert_array_equal(s.preop_mask, case.tumor_mask.astype(np.uint8))
    np.testing.assert_array_equal(s.preop_t1ce, sim.to_int16(case.t1ce))
    np.testing.assert_allclose(s.affine, case.affine)


# ------------------------------------------------------------------------------------- demo dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("demo") / "bids"
    return write_demo_dataset(root, seed=0)


def _anat(root: Path, sub: str, ses: str) -> Path:
    return root / sub / f"ses-{ses}" / "anat"


def test_demo_dataset_files(demo) -> None:
    root = demo.root
    assert [p.participant_id for p in demo.participants] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert demo.sites == ("north", "south")
    desc = json.loads((root / "dataset_description.json").read_text())
    assert "not clinical data" in desc["Name"] and desc["DatasetType"] == "raw"
    assert (root / "README").is_file()
    with open(root / "participants.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["participant_id", "site", "source_case"]
    assert [r["site"] for r in rows] == ["north", "north", "south", "south"]
    assert {r["source_case"] for r in rows} <= set(sim.CASE_NAMES)
    for sub, label, flair, preop in (("sub-01", "gadolinium", True, True), ("sub-02", "gadolinium", True, True),
                                     ("sub-03", "Gd", True, True), ("sub-04", "Gd", False, False)):
        post = _anat(root, sub, "postop")
        assert (post / f"{sub}_ses-postop_ce-{label}_T1w.nii.gz").is_file()
        assert (post / f"{sub}_ses-postop_T1w.nii.gz").is_file()
        assert (post / f"{sub}_ses-postop_FLAIR.nii.gz").is_file() == flair
        assert (_anat(root, sub, "preop") / f"{sub}_ses-preop_ce-{label}_T1w.nii.gz").is_file() == preop
        pm = _anat(root / "derivatives" / "preop_masks", sub, "preop") / f"{sub}_ses-preop_label-tumor_mask.nii.gz"
        assert pm.is_file() == preop
        assert (_anat(root / "derivatives" / "manual", sub, "postop")
                / f"{sub}_ses-postop_label-tumor_mask.nii.gz").is_file()
    for d in ("preop_masks", "manual"):
        dd = json.loads((root / "derivatives" / d / "dataset_description.json").read_text())
        assert dd["DatasetType"] == "derivative"
        assert dd["GeneratedBy"][0]["Name"] == "bids_postop-demo"


def test_demo_sites_differ_in_geometry(demo) -> None:
    root = demo.root
    north = nib.load(_anat(root, "sub-01", "postop") / "sub-01_ses-postop_ce-gadolinium_T1w.nii.gz")
    south = nib.load(_anat(root, "sub-03", "postop") / "sub-03_ses-postop_ce-Gd_T1w.nii.gz")
    assert nib.aff2axcodes(north.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(south.affine) == ("L", "P", "S")
    np.testing.assert_allclose(north.header.get_zooms()[:3], (1.2, 1.2, 1.2), atol=1e-4)
    np.testing.assert_allclose(south.header.get_zooms()[:3], (0.9, 0.9, 2.5), atol=1e-4)
    # south is oblique by a few degrees, north is not
    def obliquity(aff: np.ndarray) -> float:
        cols = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
        return float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0), -1, 1))).max())
    assert obliquity(north.affine) < 1e-3
    assert 0.5 < obliquity(south.affine) < 10


def test_manual_masks_on_postop_t1ce_grid(demo) -> None:
    root = demo.root
    for p in demo.participants:
        sub = p.participant_id
        t1ce = nib.load(_anat(root, sub, "postop") / f"{sub}_ses-postop_ce-{p.ce_label}_T1w.nii.gz")
        truth = nib.load(_anat(root / "derivatives" / "manual", sub, "postop")
                         / f"{sub}_ses-postop_label-tumor_mask.nii.gz")
        assert truth.shape == t1ce.shape
        np.testing.assert_array_equal(truth.affine, t1ce.affine)
        data = np.asarray(truth.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
        vol = data.sum() * np.prod(truth.header.get_zooms()[:3]) / 1000
        assert vol == pytest.approx(p.residual_volume_ml, rel=1e-4, abs=1e-9)
        if p.residual:
            assert p.residual_volume_ml >= 0.175
        else:
            assert p.residual_volume_ml == 0.0
        if p.has_preop:
            pre = nib.load(_anat(root, sub, "preop") / f"{sub}_ses-preop_ce-{p.ce_label}_T1w.nii.gz")
            pm = nib.load(_anat(root / "derivatives" / "preop_masks", sub, "preop")
                          / f"{sub}_ses-preop_label-tumor_mask.nii.gz")
            assert pm.shape == pre.shape
            np.testing.assert_array_equal(pm.affine, pre.affine)
            assert np.asarray(pm.dataobj).any()
            assert pre.shape != t1ce.shape or not np.allclose(pre.affine, t1ce.affine)


def test_demo_dataset_is_deterministic(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", seed=3, n_participants=1)
    b = write_demo_dataset(tmp_path / "b", seed=3, n_participants=1)
    assert a.participants == b.participants
    for f in sorted((tmp_path / "a").rglob("*.nii.gz")):
        other = tmp_path / "b" / f.relative_to(tmp_path / "a")
        np.testing.assert_array_equal(np.asarray(nib.load(f).dataobj), np.asarray(nib.load(other).dataobj))


def test_demo_dataset_passes_bids_validator(demo) -> None:
    exe = require_tool("bids-validator-deno")
    proc = subprocess.run([exe, str(demo.root), "--json", "-r"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:5]


# ------------------------------------------------------------------------------------ shipped models


def _model_dirs() -> list[Path]:
    return sorted(p.parent for p in MODELS_DIR.glob("*/bids_postop_model.json"))


def test_demo_models_for_the_demo_configurations_are_shipped() -> None:
    names = {p.name for p in _model_dirs()}
    assert {"B", "E"} <= names


@pytest.mark.parametrize("model_dir", _model_dirs(), ids=lambda p: p.name)
def test_demo_model_card_and_checkpoint(model_dir: Path) -> None:
    import torch
    card = json.loads((model_dir / "bids_postop_model.json").read_text())
    assert card["schema_version"] == 1
    assert card["configuration"] == model_dir.name
    assert card["name"] == f"demo-{model_dir.name}"
    assert card["architecture"] == "nnunet"
    assert "not validated for clinical use" in card["intended_use"]
    assert card["training"]["command"].startswith("bids_postop-train ")  # made by the documented command
    # ... on the simulated training set, and the card says so where users read it
    from bids_postop.demo.training_set import TRAINING_SET_NAME

    assert card["training"]["dataset_name"] == TRAINING_SET_NAME and TRAINING_SET_NAME in card["description"]
    assert card["channels"] == list(CONFIGURATIONS[card["configuration"]])
    assert 0.0 < float(card["threshold"]) < 1.0
    nn = card["nnunet"]
    folder = model_dir / nn["trained_model_folder"]
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert len(dataset_json["channel_names"]) == len(card["channels"])
    for i, role in enumerate(card["channels"]):
        assert (dataset_json["channel_names"][str(i)] == "noNorm") == (role == "preop_mask")
    assert dataset_json["labels"] == {"background": 0, "residual_tumor": 1}
    assert (folder / "plans.json").is_file()
    for fold in nn["folds"]:
        ck_file = folder / f"fold_{fold}" / nn["checkpoint"]
        assert ck_file.stat().st_size <= 3 * 1024 * 1024
        ck = torch.load(ck_file, map_location="cpu", weights_only=True)
        assert "optimizer_state" not in ck
        assert {"network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes"} <= set(ck)
        assert ck["init_args"]["configuration"] == "3d_fullres"
