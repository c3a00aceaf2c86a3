"""Shared test helpers: tiny NIfTI images and BIDS skeletons made on the fly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("BIDS_POSTOP_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
# .ci/run lists the tools the test extra installs: there a missing one fails its tests instead of skipping
REQUIRED_TOOLS = set(os.environ.get("BIDS_POSTOP_REQUIRED_TOOLS", "").split())


def require_tool(name: str) -> str:
    """The executable ``name`` (beside this Python, else on PATH); skip the test when it is missing,
    fail instead when CI says it must be there."""
    from bids_postop.executables import find_executable

    exe = find_executable(name)
    if exe is None:
        if name in REQUIRED_TOOLS:
            pytest.fail(f"{name} is required here (BIDS_POSTOP_REQUIRED_TOOLS) but not installed")
        pytest.skip(f"{name} not installed")
    return exe


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
        pytest.skip(f"real data not found at {REAL} (set BIDS_POSTOP_REAL_DATA)")
    return REAL
