"""Shared test helpers: tiny NIfTI images and BIDS skeletons made on the fly."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("BIDS_POSTOP_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
SKIP_ALLOWLIST = Path(__file__).with_name("skip_allowlist.txt")


def require_tool(name: str) -> str:
    """The executable ``name`` (beside this Python, else on PATH); the test fails when it is missing (the test
    extra and .ci/run install every tool the tests use: a missing one is a broken install, not a reason to skip)."""
    from bids_postop.executables import find_executable

    exe = find_executable(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (scripts/install.sh test installs it; .ci/run installs system tools)")
    return exe


# --- no silent skips: a skip whose reason is not on tests/skip_allowlist.txt fails the run --------------------

def _allowed_skip_patterns() -> list[re.Pattern]:
    lines = SKIP_ALLOWLIST.read_text().splitlines() if SKIP_ALLOWLIST.is_file() else []
    return [re.compile(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test was skipped for a reason not on the allow-list (``tests/skip_allowlist.txt``, one
    regular expression per line, each with the why in a comment): a component that cannot run here must fail its
    test, not vanish from the results."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    patterns = _allowed_skip_patterns()
    unexpected = [(report.nodeid, _skip_reason(report)) for report in reporter.stats.get("skipped", [])
                  if not any(p.search(_skip_reason(report)) for p in patterns)]
    if unexpected:
        reporter.write_sep("=", "skips not on tests/skip_allowlist.txt (they fail the run)", red=True)
        for nodeid, reason in unexpected:
            reporter.write_line(f"{nodeid}: {reason}")
        if session.exitstatus == 0:
            session.exitstatus = 1


def affine_for(orientation: str, spacing=(1.0, 1.0, 1.0), *, oblique_deg: float = 0.0) -> np.ndarray:
    """An affine with the given axis codes (e.g. 'RAS', 'LPS', 'PLI'), spacing and optional obliquity."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    rot = np.zeros((3, 3))
    for col, code in enumerate(orientation):
        row, sign = axes[code]
        rot[row, col] = sign * spacing[col]
    if oblique_deg:
        t = np.deg2rad(oblique_deg)
        tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        rot = tilt @ rot
    aff = np.eye(4)
    aff[:3, :3] = rot
    aff[:3, 3] = [-40.0, 30.0, -20.0]
    return aff


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def blob_image(shape=(24, 24, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, size=shape).astype(np.float32)
    img[6:12, 8:14, 4:9] += 200
    return img


def make_bids(root: Path, participants: dict[str, dict[str, str | None]], *, sites: dict[str, str] | None = None,
              preop_masks: dict[str, str] | None = None, shape=(24, 24, 16)) -> Path:
    """A BIDS skeleton with real (tiny) NIfTI files.

    ``participants`` maps label → {relative path under sub-<label>/: None}; ``preop_masks`` maps label
    → session label for a derivatives/preop dataset with a tumour mask.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    rows = ["participant_id\tsite"] + [f"sub-{s}\t{(sites or {}).get(s, 'n/a')}" for s in participants]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    for i, (label, files) in enumerate(participants.items()):
        for rel in files:
            write_nifti(root / f"sub-{label}" / rel, blob_image(shape, seed=i))
    if preop_masks:
        deriv = root / "derivatives" / "preop"
        deriv.mkdir(parents=True, exist_ok=True)
        (deriv / "dataset_description.json").write_text(json.dumps({
            "Name": "masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "manual"}]}))
        for label, ses in preop_masks.items():
            mask = np.zeros(shape, np.uint8)
            mask[6:12, 8:14, 4:9] = 1
            anat = deriv / f"sub-{label}" / f"ses-{ses}" / "anat"
            write_nifti(anat / f"sub-{label}_ses-{ses}_label-tumor_mask.nii.gz", mask)
    return root


@pytest.fixture
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.fail(f"real data not found at {REAL} (set BIDS_POSTOP_REAL_DATA)")
    return REAL


# --- a tiny trained nnU-Net v2 model, trained once per session (slow: about a minute) -----------------------

TINY_NNUNET_DATASET_ID = 977
_TINY_NNUNET_SCRIPT = r'''
import json, os, sys
from pathlib import Path
import nibabel as nib
import numpy as np

root = Path(sys.argv[1])

def case(seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 15, (48, 48, 32)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    c = (rng.integers(14, 34), rng.integers(14, 34), rng.integers(10, 22))
    x, y, z = np.ogrid[:48, :48, :32]
    r = rng.uniform(4, 7)
    label[(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r * r] = 1
    image[label > 0] += 250
    return image, label

if __name__ == "__main__":
    from bids_postop.training import nnunet as T

    paths = T.set_nnunet_paths(root)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    name = f"Dataset{int(sys.argv[2]):03d}_Tiny"
    raw = paths["nnUNet_raw"] / name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    cases = [f"case{i}" for i in range(4)]
    for i, cid in enumerate(cases):
        image, label = case(i)
        nib.save(nib.Nifti1Image(image, affine), raw / "imagesTr" / f"{cid}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / "labelsTr" / f"{cid}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1wCE"}, "labels": {"background": 0, "tumor": 1}, "numTraining": 4,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIO"}))
    image, _ = case(99)
    (root / "test_input").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), root / "test_input" / "test_0000.nii.gz")
    tiny = T.TinyNetwork(patch_size=(32, 32, 32), target_spacing=1.5)
    pp = T.plan_and_preprocess(int(sys.argv[2]), data_hash="tiny", tiny=tiny)
    (pp / "splits_final.json").write_text(json.dumps([{"train": cases[:3], "val": cases[3:]}]))
    T.train_fold(int(sys.argv[2]), 0, options=T.TrainingOptions(device="cpu", epochs=3, iterations=12, tiny=tiny))
    T.export_model(int(sys.argv[2]), root / "exported", [0])
'''


@pytest.fixture(scope="session")
def tiny_nnunet(tmp_path_factory) -> dict[str, Path]:
    """A tiny nnU-Net v2 model trained on 4 synthetic one-channel cases (bright spheres in noise), fold 0.

    Trained in a fresh interpreter (nnU-Net reads its folders from the environment at import and spawns
    workers). Returns ``root`` (holding raw/, preprocessed/, results/: the values of nnUNet_raw,
    nnUNet_preprocessed, nnUNet_results), ``results`` (the trainer folder with the full checkpoint),
    ``model`` (the exported, stripped model folder: plans.json, dataset.json, fold_0) and ``test_input``
    (a folder with one unseen case, ``test_0000.nii.gz``).
    """
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_nnunet")
    env = {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false"}
    proc = subprocess.run([sys.executable, "-c", _TINY_NNUNET_SCRIPT, str(root), str(TINY_NNUNET_DATASET_ID)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    name = f"Dataset{TINY_NNUNET_DATASET_ID:03d}_Tiny"
    return {"root": root, "results": root / "results" / name / "nnUNetTrainer__nnUNetPlans__3d_fullres",
            "model": root / "exported" / "nnunet", "test_input": root / "test_input"}


# three hospitals over the six participants of write_demo_dataset(seed=5, n_participants=6): enough for
# hospital folds plus a held-out test site in the training tests
THREE_SITES = {"sub-01": "north", "sub-02": "north", "sub-03": "south", "sub-04": "south",
               "sub-05": "east", "sub-06": "east"}


def read_tsv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def write_three_site_demo(bids: Path) -> None:
    """The demo dataset (6 participants) with its two sites relabelled into the three of THREE_SITES
    (geometry stays per participant)."""
    import csv

    from bids_postop.demo.dataset import write_demo_dataset

    write_demo_dataset(bids, seed=5, n_participants=6)
    rows = read_tsv(bids / "participants.tsv")
    with (bids / "participants.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "site": THREE_SITES[r["participant_id"]]} for r in rows)
