"""Safe runs on real cohorts (issue #17): nothing of the user's deleted, nothing stale, nothing overwritten,
no network, no silent skips.

Fast tests check the refusals (they happen before anything is written); the slow ones run the participant
level for real (one demo participant, configuration B) and check caching on the model's bytes, two models in one
output, headers, the not-for-clinical-use flag and an offline run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_bids, write_nifti

from bids_postop.cli.run import main

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 (or "dir"/"link") of everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def dataset(tmp_path) -> Path:
    ce = "ses-postop/anat/sub-01_ses-postop_ce-gadolinium_T1w.nii.gz"
    return make_bids(tmp_path / "bids", {"01": {ce: None}}, preop_masks={"01": "preop"})


# --- work directory: never inside or around the data ----------------------------------------------------------

@pytest.mark.parametrize("where", ["bids", "inside-bids", "inside-preop", "preop", "inside-output", "output",
                                   "contains-output", "home"])
def test_work_dir_in_or_around_the_data_is_refused_and_nothing_is_touched(dataset, tmp_path, where, monkeypatch):
    preop = dataset / "derivatives" / "preop"
    out = tmp_path / "results" / "bids_postop"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("a result")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = {"bids": dataset, "inside-bids": dataset / "derivatives" / "work", "inside-preop": preop / "work",
            "preop": preop, "inside-output": out / "work", "output": out, "contains-output": tmp_path / "results",
            "home": tmp_path / "home"}[where]
    work.mkdir(parents=True, exist_ok=True)
    (work / "old.txt").write_text("anything")
    before_bids, before_out, before_work = tree_digest(dataset), tree_digest(out), tree_digest(work)
    code = main([str(dataset), str(out), "participant", "--model", "demo", "-w", str(work), "--clean-workdir",
                 "-d", f"preop={preop}", "--skip-bids-validation"])
    assert code == 64
    assert tree_digest(dataset) == before_bids and tree_digest(out) == before_out
    assert tree_digest(work) == before_work, "nothing deleted"
    assert not (out / "logs").exists(), "nothing written, not even a log"


def test_arguments_swapped_write_nothing_into_the_dataset(dataset, tmp_path, capsys):
    before = tree_digest(dataset)
    # OUTPUT_DIR BIDS_DIR (swapped) with a not-yet-existing output: the "BIDS folder" does not exist
    assert main([str(tmp_path / "out"), str(dataset), "participant", "--model", "demo",
                 "-w", str(tmp_path / "work")]) == 66
    assert tree_digest(dataset) == before and not (dataset / "logs").exists()
    # with an existing derivatives folder as "BIDS folder": the raw dataset as output is refused
    (tmp_path / "deriv").mkdir()
    (tmp_path / "deriv" / "dataset_description.json").write_text(json.dumps(
        {"Name": "d", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    assert main([str(tmp_path / "deriv"), str(dataset), "participant", "--model", "demo",
                 "-w", str(tmp_path / "work")]) == 73
    assert "swapped" in capsys.readouterr().err
    assert tree_digest(dataset) == before


def test_unwritable_work_dir_exits_73_naming_it(dataset, tmp_path, capsys):
    code = main([str(dataset), str(tmp_path / "out"), "participant", "--model", "demo", "-w", "/proc/bids_work",
                 "--skip-bids-validation"])
    assert code == 73
    assert "/proc/bids_work: cannot write to the work directory" in capsys.readouterr().err


# --- no silent demo model -------------------------------------------------------------------------------------

def test_participant_level_without_model_is_refused_listing_installed_models(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BIDS_POSTOP_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "MRI_GBM_Postop_FV_2p").mkdir(parents=True)
    (tmp_path / "cache" / "MRI_GBM_Postop_FV_2p" / "pre_processing.ini").write_text("[Default]\n")
    out = tmp_path / "out"
    assert main([str(dataset), str(out), "participant", "-w", str(tmp_path / "work")]) == 64
    err = capsys.readouterr().err
    assert "--model is required" in err and "MRI_GBM_Postop_FV_2p" in err and "bids_postop-models fetch" in err
    assert not out.exists() and not (tmp_path / "work").exists(), "nothing written"


def test_demo_cards_are_flagged_not_for_clinical_use():
    from bids_postop.segmentation.models import resolve

    models = resolve("demo")
    assert models and all(m.not_for_clinical_use for m in models)
    assert all(m.provenance()["not_for_clinical_use"] is True for m in models)


# --- headers ---------------------------------------------------------------------------------------------------

def qform_differs_from_sform(path: Path) -> None:
    """Rewrite ``path`` with a qform 0.5 mm away from its sform (as some converters write them)."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    sform = img.affine.copy()
    qform = sform.copy()
    qform[0, 3] += 0.5
    out = nib.Nifti1Image(data, sform, img.header)
    out.set_sform(sform, code=2)
    out.set_qform(qform, code=1)
    nib.save(out, path)


def test_write_like_keeps_the_source_qform_and_sform(tmp_path):
    from bids_postop.core.images import load_3d, write_like

    source = write_nifti(tmp_path / "src.nii.gz", np.zeros((6, 7, 8), np.float32),
                         np.array([[0.9, 0.1, 0, -10], [0, 1.1, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]]))
    qform_differs_from_sform(source)
    written = nib.load(write_like(np.ones((6, 7, 8)), load_3d(source), tmp_path / "out.nii.gz", dtype=np.uint8))
    ref = nib.load(source)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                "qoffset_z", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(written.header[key], ref.header[key]), key
    assert np.array_equal(written.header.get_qform(), ref.header.get_qform())
    assert not np.allclose(written.header.get_qform(), written.header.get_sform())


# --- BIDS validation: only the participants being run ---------------------------------------------------------

def test_validation_holds_only_the_participants_run_to_it(tmp_path):
    from bids_postop.bids.validation import validate_dataset
    from bids_postop.errors import InputDataError

    ce = "ses-postop/anat/sub-{s}_ses-postop_ce-gadolinium_T1w.nii.gz"
    root = make_bids(tmp_path / "bids", {"01": {ce.format(s="01"): None}, "02": {ce.format(s="02"): None}})
    write_nifti(root / "sub-02" / "ses-postop" / "anat" / "sub-02_ses-postop_bogus.nii.gz", np.zeros((4, 4, 4)))
    result = validate_dataset(root, participants=["01"])
    assert result.validator.startswith("bids-validator-deno 3.") and result.errors_of_other_participants >= 1
    with pytest.raises(InputDataError, match="sub-02_ses-postop_bogus"):
        validate_dataset(root, participants=["sub-02"])
    with pytest.raises(InputDataError, match="sub-02_ses-postop_bogus"):
        validate_dataset(root)


# --- no silent skips ------------------------------------------------------------------------------------------

def test_a_skip_not_on_the_allow_list_fails_the_run(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util

        spec = importlib.util.spec_from_file_location("repo_conftest", {str(REPO / "tests" / "conftest.py")!r})
        repo_conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(repo_conftest)
        pytest_sessionfinish = repo_conftest.pytest_sessionfinish  # the repository's hook, as is
    """))
    (tests / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        def test_allowed():
            pytest.skip("needs 20 GiB of free memory")

        def test_passes():
            pass
    """))
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)]
    allowed = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stdout
    (tests / "test_y.py").write_text("import pytest\n\ndef test_missing():\n    pytest.skip('tool not found')\n")
    refused = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 1 and "tool not found" in refused.stdout, refused.stdout


# --- real runs: caching on the model's bytes, two models, headers, offline -----------------------------------

NETWORK_GUARD = '''
import os, socket
_LOG = os.environ["BIDS_POSTOP_TEST_NETWORK_LOG"]


def _refuse(what):
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {what!r}\\n")
    raise OSError("network use refused by the offline test")


_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(address)
    return _connect(self, address)


socket.socket.connect = _guarded_connect
socket.getaddrinfo = lambda *args, **kwargs: _refuse(args)
'''


def offline_command(argv: list[str], guard_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The CLI in a network namespace without network (when ``unshare -n`` works here, as root does) and with a
    socket guard in every Python interpreter it starts (``sitecustomize``), which logs any attempt."""
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(NETWORK_GUARD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(guard_dir), os.environ.get("PYTHONPATH", "")]),
           "BIDS_POSTOP_TEST_NETWORK_LOG": str(guard_dir / "attempts.log")}
    env.pop("NIPYPE_NO_ET", None)  # the app itself must turn nipype's version check off
    command = [sys.executable, "-m", "bids_postop.cli.run", *argv]
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        command = [unshare, "-n", *command]
    return command, env


def perturb_weights(model: Path) -> None:
    """Replace the model's weights in place (same file name, same architecture, other values)."""
    import torch

    ckpt = model / "nnunet" / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["network_weights"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in data["network_weights"].items()}
    torch.save(data, ckpt)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """sub-04 of the demo (configuration B) with a qform 0.5 mm away from its sform, run offline with a copy of
    the demo model B, then rerun with the same -w after its weights were replaced in place."""
    from bids_postop.demo.dataset import write_demo_dataset
    from bids_postop.segmentation.models import DEMO_MODELS

    tmp = tmp_path_factory.mktemp("safe_runs")
    bids = tmp / "bids"
    write_demo_dataset(bids, seed=0, n_participants=4)
    t1ce = next((bids / "sub-04" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
    qform_differs_from_sform(t1ce)
    model = tmp / "models" / "B"
    shutil.copytree(DEMO_MODELS / "B", model)
    out, work = tmp / "out", tmp / "work"
    argv = [str(bids), str(out), "participant", "--participant-label", "04", "--model", str(model), "-w", str(work),
            "--no-tta", "--nprocs", "2", "--device", "cpu"]
    command, env = offline_command(argv, tmp / "guard")
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    measures = next((out / "sub-04" / "ses-postop").glob("*_measures.json"))
    before = {"measures": json.loads(measures.read_text()),
              "probseg": np.asanyarray(nib.load(out / json.loads(measures.read_text())["outputs"]["residual_probseg"])
                                       .dataobj).copy()}
    perturb_weights(model)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    return {"bids": bids, "out": out, "work": work, "t1ce": t1ce, "model": model, "first": first, "second": second,
            "before": before, "measures": measures, "guard": tmp / "guard", "argv": argv}


@pytest.mark.slow
def test_offline_run_completes_without_any_network_attempt(real_run):
    assert real_run["first"].returncode == 0, real_run["first"].stderr[-3000:]
    attempts = real_run["guard"] / "attempts.log"
    assert not attempts.exists(), attempts.read_text()


@pytest.mark.slow
def test_outputs_keep_the_source_qform_and_sform(real_run):
    source = nib.load(real_run["t1ce"])
    data = json.loads(real_run["measures"].read_text())
    for rel in data["outputs"].values():
        out = nib.load(real_run["out"] / rel)
        assert np.array_equal(out.header.get_qform(), source.header.get_qform()), rel
        assert np.array_equal(out.header.get_sform(), source.header.get_sform()), rel
        assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2), rel


@pytest.mark.slow
def test_not_for_clinical_use_is_said_by_every_output(real_run):
    data = json.loads(real_run["measures"].read_text())
    assert data["not_for_clinical_use"] is True and data["model"]["not_for_clinical_use"] is True
    tsv = real_run["measures"].with_suffix(".tsv").read_text().splitlines()
    row = dict(zip(tsv[0].split("\t"), tsv[1].split("\t"), strict=True))
    assert row["not_for_clinical_use"] == "true"
    sidecar = json.loads((real_run["out"] / data["outputs"]["residual_mask"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["NotForClinicalUse"] is True
    report = (real_run["out"] / "sub-04.html").read_text()
    assert 'id="intended-use"' in report and "Do not use these results for patient care" in report
    assert "NOT FOR CLINICAL USE" in real_run["first"].stderr  # the log's final table


@pytest.mark.slow
def test_weights_replaced_in_place_are_recomputed_with_the_same_work_dir(real_run):
    assert real_run["second"].returncode == 0, real_run["second"].stderr[-3000:]
    after = json.loads(real_run["measures"].read_text())
    before = real_run["before"]["measures"]
    assert after["model"]["digest"] != before["model"]["digest"]
    probseg = np.asanyarray(nib.load(real_run["out"] / after["outputs"]["residual_probseg"]).dataobj)
    assert not np.array_equal(probseg, real_run["before"]["probseg"]), "the cached probability map was reused"
    # the steps before segmentation were reused from the work directory (only the model changed)
    assert "register_postop_t1" not in real_run["second"].stderr or "done" in real_run["second"].stderr


@pytest.mark.slow
def test_two_models_into_one_output_keep_both(real_run):
    """A second model into the same output: both results kept, each measures file names its own masks."""
    other = real_run["model"].parent / "other"
    shutil.copytree(real_run["model"], other)
    card = json.loads((other / "bids_postop_model.json").read_text())
    card["name"] = "other-B"
    (other / "bids_postop_model.json").write_text(json.dumps(card, indent=2))
    argv = [*real_run["argv"]]
    argv[argv.index("--model") + 1] = str(other)
    proc = subprocess.run([sys.executable, "-m", "bids_postop.cli.run", *argv], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = real_run["out"] / "sub-04" / "ses-postop"
    measures = sorted(session.glob("*_measures.json"))
    assert [m.name for m in measures] == ["sub-04_ses-postop_desc-demoB_measures.json",
                                          "sub-04_ses-postop_desc-otherB_measures.json"]
    outputs = [json.loads(m.read_text())["outputs"] for m in measures]
    assert outputs[0]["residual_mask"] != outputs[1]["residual_mask"]
    for out in outputs:
        for rel in out.values():
            assert (real_run["out"] / rel).is_file(), rel


# --- group level: each participant's own cut-off; several models in one output -------------------------------

def _participant_outputs(out: Path, bids: Path, label: str, *, model: str, residual_ml_voxels: int, cutoff: float,
                         truth: Path | None = None, truth_voxels: int | None = None,
                         uncertainty: dict | None = None) -> None:
    """One session's derivatives as the participant level writes them (write_session_outputs), residual
    ``residual_ml_voxels`` voxels of 1 mm3 in a 30^3 grid, classified with ``cutoff``."""
    from bids_postop.bids.derivatives import write_dataset_description, write_session_outputs
    from bids_postop.core.postprocess import postprocess_probability

    affine = np.eye(4)
    prob = np.zeros((30, 30, 30), np.float32)
    prob.reshape(-1)[:residual_ml_voxels] = 0.9
    work = out.parent / f"work_{label}_{model}"
    work.mkdir(parents=True, exist_ok=True)
    mask, measures = postprocess_probability(prob, affine, threshold=0.5, min_component_voxels=1, cutoff_ml=cutoff)
    t1ce = bids / f"sub-{label}" / "ses-postop" / "anat" / f"sub-{label}_ses-postop_ce-gd_T1w.nii.gz"
    write_nifti(t1ce, prob, affine)
    write_dataset_description(out, bids)
    write_session_outputs(
        out, bids, subject=label, session="postop", site="north", sources={"postop_t1ce": t1ce},
        residual_mask=write_nifti(work / "mask.nii.gz", mask, affine),
        residual_probseg=write_nifti(work / "prob.nii.gz", prob, affine),
        brain_mask=write_nifti(work / "brain.nii.gz", np.ones((30, 30, 30), np.uint8), affine),
        measures=measures.as_dict(), configuration="A",
        model={"name": model, "architecture": "nnunet", "configuration": "A", "threshold": 0.5,
               "derivatives_desc": model.replace("-", ""), "not_for_clinical_use": True}, uncertainty=uncertainty)
    if truth is not None:
        reference = mask
        if truth_voxels is not None:
            reference = np.zeros_like(mask)
            reference.reshape(-1)[:truth_voxels] = 1
        write_nifti(truth / f"sub-{label}" / "ses-postop" / "anat" / f"sub-{label}_ses-postop_label-tumor_mask.nii.gz",
                    reference, affine)


def test_group_level_uses_each_participants_cut_off_and_flags_mixed_settings(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "bids" / "derivatives" / "bids_postop"
    make_bids(bids, {})
    # 1000 voxels = 1 ml: RT with the default cut-off, GTR with --gtr-cutoff-ml 5 (what sub-01 was run with)
    _participant_outputs(out, bids, "01", model="m-A", residual_ml_voxels=1000, cutoff=5.0)
    assert main([str(bids), str(out), "group"]) == 0
    summary = json.loads((out / "group_summary.json").read_text())
    text = json.dumps(summary)
    assert "5 ml" in text and "0.175" not in text.split("GTR if residual")[1][:12], text[:2000]
    rows = (out / "group_summary.tsv").read_text().splitlines()
    header, row = rows[0].split("\t"), rows[1].split("\t")
    assert row[header.index("resection_status")] == "GTR" and float(row[header.index("gtr_cutoff_ml")]) == 5
    # a second participant run with the default cut-off: the cohort's settings are mixed, and said so
    _participant_outputs(out, bids, "02", model="m-A", residual_ml_voxels=1000, cutoff=0.175)
    assert main([str(bids), str(out), "group"]) == 0
    assert "MIXED SETTINGS" in (out / "group_summary.json").read_text()  # the column dictionary says so
    assert "mixed GTR cut-off settings" in (out / "group_report.html").read_text()
    # --reclassify applies one rule to every participant
    assert main([str(bids), str(out), "group", "--reclassify"]) == 0
    rows = [r.split("\t") for r in (out / "group_summary.tsv").read_text().splitlines()]
    assert {r[rows[0].index("resection_status")] for r in rows[1:]} == {"RT"}


def test_two_models_in_one_output_are_each_evaluated_against_the_truth(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "bids" / "derivatives" / "bids_postop"
    manual = tmp_path / "manual"
    make_bids(bids, {})
    (manual).mkdir()
    (manual / "dataset_description.json").write_text(json.dumps(
        {"Name": "truth", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    for label in ("01", "02"):
        _participant_outputs(out, bids, label, model="good-A", residual_ml_voxels=1500, cutoff=0.175, truth=manual)
        _participant_outputs(out, bids, label, model="bad-A", residual_ml_voxels=300, cutoff=0.175)
    assert len(list(out.glob("sub-*/ses-postop/*_measures.json"))) == 4, "both models' results kept"
    assert main([str(bids), str(out), "group", "-d", f"manual={manual}"]) == 0
    rows = [r.split("\t") for r in (out / "group" / "patients.tsv").read_text().splitlines()]
    header = rows[0]
    dice = {(r[header.index("source")], r[header.index("participant_id")]): r[header.index("dice")] for r in rows[1:]}
    assert {s for s, _ in dice} == {"main:goodA", "main:badA"}, dice
    assert all(float(dice[("main:goodA", p)]) == 1.0 for p in ("sub-01", "sub-02"))
    assert all(float(dice[("main:badA", p)]) == pytest.approx(2 * 300 / 1800) for p in ("sub-01", "sub-02"))


def test_group_level_measures_whether_the_review_flag_finds_the_wrong_calls(tmp_path):
    """review.tsv: error rates among flagged and unflagged patients, and the AUROC of the uncertainty score for a
    wrong call or Dice < 0.5, against a recomputation by hand (every pair of bad and good patients)."""
    bids, out, manual = tmp_path / "bids", tmp_path / "bids" / "derivatives" / "bids_postop", tmp_path / "manual"
    make_bids(bids, {})
    manual.mkdir()
    (manual / "dataset_description.json").write_text(json.dumps(
        {"Name": "truth", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    # (predicted voxels, true voxels, flag, score): 1 ml = 1000 voxels; cut-off 0.175 ml = 175 voxels
    cases = {"01": (1000, 1000, False, 0.01), "02": (1000, 100, True, 0.30),   # wrong call (RT vs GTR), flagged
             "03": (100, 1000, False, 0.20),                                    # wrong call, not flagged
             "04": (1000, 3000, True, 0.25),                                    # right call, Dice 0.5 -> not bad
             "05": (600, 3000, False, 0.05), "06": (0, 0, False, 0.0)}          # Dice 0.33 (bad); both empty
    for label, (pred, true, flag, score) in cases.items():
        _participant_outputs(out, bids, label, model="m-A", residual_ml_voxels=pred, cutoff=0.175, truth=manual,
                             truth_voxels=true, uncertainty={"members_kind": "folds", "members_count": 3,
                                                             "review_flag": flag, "uncertainty_score": score})
    assert main([str(bids), str(out), "group", "-d", f"manual={manual}"]) == 0
    rows = [r.split("\t") for r in (out / "group" / "review.tsv").read_text().splitlines()]
    row = dict(zip(rows[0], rows[1], strict=True))
    bad = {"02": True, "03": True, "05": True, "01": False, "04": False, "06": False}
    flagged = [k for k, c in cases.items() if c[2]]
    unflagged = [k for k in cases if k not in flagged]
    assert (int(row["n_flagged"]), int(row["n_unflagged"]), int(row["n_bad"])) == (2, 4, 3)
    assert float(row["bad_rate_flagged"]) == pytest.approx(sum(bad[k] for k in flagged) / 2)
    assert float(row["bad_rate_unflagged"]) == pytest.approx(sum(bad[k] for k in unflagged) / 4)
    assert float(row["wrong_call_rate_flagged"]) == pytest.approx(0.5)
    def by_hand(patients) -> float:  # every (bad, good) pair of scores: 1 when bad is higher, 1/2 on a tie
        pairs = [(cases[b][3], cases[g][3]) for b in patients if bad[b] for g in patients if not bad[g]]
        return sum(1.0 if sb > sg else 0.5 if sb == sg else 0.0 for sb, sg in pairs) / len(pairs)

    assert float(row["auroc_score_bad"]) == pytest.approx(by_hand(bad))
    # among reference-positive patients only (true >= 175 voxels: 01, 03, 04, 05; bad 03 and 05)
    positive = [k for k, c in cases.items() if c[1] >= 175]
    assert int(row["n_positive_scored"]) == 4 and float(row["auroc_score_bad_positive"]) == pytest.approx(
        by_hand(positive))
    # the output, group level included, is a valid BIDS derivatives dataset
    from conftest import require_tool

    proc = subprocess.run([require_tool("bids-validator-deno"), str(out), "--json", "--datasetTypes", "derivative"],
                          capture_output=True, text=True, timeout=300)
    errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:5]
    assert (out / "group_summary.tsv").is_file() and (out / "group" / "review.tsv").is_file()
