"""Write the embedded demo: a small raw BIDS dataset of simulated post-operative cases.

``write_demo_dataset(root)`` writes, deterministically for a seed and in a few seconds:

- ``dataset_description.json``, ``README``, ``participants.tsv`` / ``participants.json``
  (participant_id, site, source_case);
- two sites with different geometry: ``north`` (RAS, 1.2 mm isotropic, ``ce-gadolinium``) and
  ``south`` (LPS, 0.9×0.9×2.5 mm, affine tilted by a few degrees, ``ce-Gd``);
- per participant ``sub-XX/ses-postop/anat/``: ``sub-XX_ses-postop_ce-<label>_T1w.nii.gz``,
  ``sub-XX_ses-postop_T1w.nii.gz``, ``sub-XX_ses-postop_FLAIR.nii.gz`` and
  ``sub-XX/ses-preop/anat/sub-XX_ses-preop_ce-<label>_T1w.nii.gz`` (pre-op: other head position,
  rigid motion of 3–8° and 5–10 mm, and its own grid), each with a JSON sidecar;
- derivatives ``derivatives/preop_masks`` (pre-op tumour mask on the pre-op scan's grid) and
  ``derivatives/manual`` (ground-truth residual tumour ``..._ses-postop_label-tumor_mask.nii.gz``
  exactly on the post-op T1w-CE grid, plus the brain mask ``..._ses-postop_label-brain_mask.nii.gz``
  on the same grid).

Participants (default 4): sub-01 north RT, all inputs; sub-02 north GTR, all inputs; sub-03 south RT,
all inputs; sub-04 south RT with post-op T1w-CE and T1w only (configuration B). Further participants
(``n_participants > 4``) alternate sites and RT/GTR with all inputs.

Images are skull-stripped (0 outside the brain), as the shipped sources are. Simulation randomness comes
from ``numpy.random.default_rng([seed, participant_index])``; the demo models' training set
(:mod:`bids_postop.demo.training_set`) uses seeds ≥ 1000, so it never holds a demo participant.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nibabel as nib
import numpy as np

from bids_postop import __version__
from bids_postop.demo import simulate as sim

BIDS_VERSION: Final[str] = "1.10.0"
DATASET_NAME: Final[str] = (
    "bids_postop demo: simulated post-operative cases made from real pre-operative scans — not clinical data"
)


@dataclass(frozen=True)
class SiteGeometry:
    """Acquisition geometry of a demo site."""

    name: str
    axcodes: str
    spacing: tuple[float, float, float]
    oblique_deg: float
    ce_label: str
    preop_spacing: tuple[float, float, float]


SITES: Final[dict[str, SiteGeometry]] = {
    "north": SiteGeometry("north", "RAS", (1.2, 1.2, 1.2), 0.0, "gadolinium", (1.1, 1.1, 1.1)),
    "south": SiteGeometry("south", "LPS", (0.9, 0.9, 2.5), 4.0, "Gd", (1.0, 1.0, 2.0)),
}


@dataclass(frozen=True)
class DemoParticipant:
    """One demo participant: what was simulated and which inputs were written."""

    participant_id: str
    site: str
    source_case: str
    residual: bool
    has_flair: bool
    has_preop: bool
    residual_volume_ml: float
    ce_label: str

    @property
    def expected_configuration(self) -> str:
        """Richest configuration (SPEC.md) that this participant's inputs allow."""
        if self.has_preop:
            return "E" if self.has_flair else "D"
        return "C" if self.has_flair else "B"


@dataclass(frozen=True)
class DemoDataset:
    """What :func:`write_demo_dataset` wrote."""

    root: Path
    seed: int
    participants: tuple[DemoParticipant, ...]

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names, sorted."""
        return tuple(sorted({p.site for p in self.participants}))

    @property
    def residual_volumes_ml(self) -> dict[str, float]:
        """Ground-truth residual volume (ml, on the post-op T1w-CE grid) per participant id."""
        return {p.participant_id: p.residual_volume_ml for p in self.participants}


def _plan(n: int) -> list[tuple[str, bool, bool, bool]]:
    """(site, residual, has_flair, has_preop) per participant."""
    base = [("north", True, True, True), ("north", False, True, True), ("south", True, True, True),
            ("south", True, False, False)]
    out = base[:n]
    for i in range(len(out), n):
        out.append(("north" if i % 2 == 0 else "south", i % 3 != 1, True, True))
    return out


def _save(data: np.ndarray, affine: np.ndarray, path: Path, sidecar: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asfortranarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar, indent=2) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _derivative_description(name: str, description: str) -> dict:
    return {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_postop-demo", "Version": __version__, "Description": description}],
    }


README: Final[str] = """# bids_postop demo dataset

Simulated early post-operative brain MRI made from real **pre-operative** scans — not clinical data.
Written by `bids_postop-demo` (`bids_postop.demo.dataset.write_demo_dataset`).

Each participant's post-operative session was simulated from one of three public pre-operative cases
shipped with bids_postop (TCGA-DU-7294 and TCGA-FG-6692 from TCIA TCGA-LGG, CC BY 3.0; BraTS 2023 MET
case 00110-000; see `source_case` in participants.tsv and bids_postop/data/real/SOURCES.md): a resection
cavity was carved into the real tumour, residual enhancing fragments were left on its rim for some
participants, and a thin enhancing rim and blood products (not tumour) were added. The pre-operative
session is the real contrast-enhanced T1w, moved to another head position and resampled to its own grid.

Sites differ in geometry: `north` (RAS, 1.2 mm isotropic, `ce-gadolinium`) and `south` (LPS,
0.9×0.9×2.5 mm, slightly oblique, `ce-Gd`). sub-04 has no FLAIR and no pre-operative session.
Images are skull-stripped.

Derivatives:
- `derivatives/preop_masks`: pre-operative tumour masks, on the pre-operative scan's grid.
- `derivatives/manual`: ground truth — simulated residual tumour (`label-tumor`, empty for gross total
  resection) and the brain mask (`label-brain`), exactly on the post-operative T1w-CE grid.
"""


def write_demo_dataset(root: Path, *, seed: int = 0, n_participants: int = 4) -> DemoDataset:
    """Write the demo raw BIDS dataset (and its derivatives) at ``root`` and describe it.

    Deterministic for a given ``seed``. ``n_participants`` ≥ 1 (the demo uses 4). Existing files of the
    same names are overwritten; other files under ``root`` are left alone.
    """
    if n_participants < 1:
        raise ValueError("n_participants must be >= 1")
    root = Path(root)
    _write_dataset_files(root, name=DATASET_NAME, readme=README,
                         site_levels={"north": "RAS, 1.2 mm isotropic", "south": "LPS, 0.9x0.9x2.5 mm, oblique"})
    participants: list[DemoParticipant] = []
    for i, (site_name, residual, has_flair, has_preop) in enumerate(_plan(n_participants)):
        rng = np.random.default_rng([seed, i])
        case_name = sim.CASE_NAMES[(i + seed) % len(sim.CASE_NAMES)]
        participants.append(_write_participant(root, f"sub-{i + 1:02d}", SITES[site_name], case_name, rng,
                                               residual=residual, has_flair=has_flair, has_preop=has_preop))
    _write_participants_tsv(root, participants)
    return DemoDataset(root=root, seed=seed, participants=tuple(participants))


def _write_dataset_files(root: Path, *, name: str, readme: str, site_levels: dict[str, str]) -> None:
    """dataset_description.json, README, participants.json and the two derivatives' descriptions."""
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "dataset_description.json", {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC-BY-3.0 (derived from TCIA TCGA-LGG) and BraTS 2023 data-use terms; see README",
        "Authors": ["bids_postop developers (simulation)"],
        "GeneratedBy": [{"Name": "bids_postop-demo", "Version": __version__,
                         "Description": "simulated post-operative cases made from real pre-operative scans"}],
        "SourceDatasets": [{"URL": "https://github.com/BrainLesion/tutorials"}],
    })
    (root / "README").write_text(readme)
    _write_json(root / "participants.json", {
        "participant_id": {"Description": "participant label"},
        "site": {"Description": "simulated acquisition site (geometry differs between sites)", "Levels": site_levels},
        "source_case": {"Description": "real pre-operative case the simulation was made from "
                                       "(bids_postop/data/real/SOURCES.md)"},
    })
    _write_json(root / "derivatives" / "preop_masks" / "dataset_description.json", _derivative_description(
        "bids_postop demo: pre-operative tumour masks",
        "real tumour masks of the source cases, resampled onto the pre-operative scans"))
    _write_json(root / "derivatives" / "manual" / "dataset_description.json", _derivative_description(
        "bids_postop demo: ground truth (simulated residual tumour and brain masks)",
        "simulated residual tumour on the post-operative T1w-CE grid"))


def _write_participants_tsv(root: Path, participants: Sequence[DemoParticipant]) -> None:
    rows = ["participant_id\tsite\tsource_case", *(f"{p.participant_id}\t{p.site}\t{p.source_case}"
                                                    for p in participants)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def _write_participant(root: Path, sub: str, site: SiteGeometry, case_name: str, rng: np.random.Generator, *,
                       residual: bool, has_flair: bool, has_preop: bool,
                       head_pose: Callable[[np.ndarray], np.ndarray] | None = None) -> DemoParticipant:
    """Simulate one participant and write its scans, manual masks and pre-op mask under ``root``.

    ``head_pose(center)`` (training sets only) draws a 4×4 world transform of the post-operative head
    (about the brain centre, mm); the pre-operative head moves from there. Without it no random number is
    drawn beyond those of the demo, so the demo stays what it was.
    """
    preop_root = root / "derivatives" / "preop_masks"
    manual_root = root / "derivatives" / "manual"
    case = sim.load_case(case_name)
    s = sim.simulate_postop_case(case, rng, residual=residual)
    center = np.append(np.argwhere(case.brain_mask).mean(axis=0), 1.0) @ case.affine.T
    pose = head_pose(center[:3]) if head_pose is not None else None
    # post-op grid of the site (the post-op head position is the source case's world frame, moved by pose)
    tilt = (sim.rotation_matrix(rng.uniform(-1, 1, size=3) * site.oblique_deg / np.sqrt(3))
            if site.oblique_deg else np.eye(3))
    shape, aff = sim.grid_covering(s.brain_mask, s.affine, spacing=site.spacing, axcodes=site.axcodes,
                                   rotation=tilt, world_transform=pose)
    brain = sim.resample_to_grid(s.brain_mask, s.affine, shape, aff, order=0, world_transform=pose) > 0
    onto_post = sim.GridSampler(s.affine, aff, brain, world_transform=pose)
    anat = root / sub / "ses-postop" / "anat"
    images = {f"ce-{site.ce_label}_T1w": s.postop_t1ce, "T1w": s.postop_t1}
    if has_flair:
        images["FLAIR"] = s.postop_flair
    for suffix, arr in images.items():
        data = sim.to_int16(onto_post(arr, order=1))
        side = {"SeriesDescription": f"simulated post-operative {suffix.replace('_', ' ')}",
                "Manufacturer": "simulated (bids_postop-demo)", "InstitutionName": site.name}
        if suffix.startswith("ce-"):
            side["ContrastBolusIngredient"] = "GADOLINIUM"
        _save(data, aff, anat / f"{sub}_ses-postop_{suffix}.nii.gz", side)
    truth = onto_post(s.residual_mask, order=0) > 0
    man = manual_root / sub / "ses-postop" / "anat"
    _save(truth.astype(np.uint8), aff, man / f"{sub}_ses-postop_label-tumor_mask.nii.gz",
          {"Description": "simulated residual tumour (ground truth); empty for gross total resection",
           "Sources": [f"bids::{sub}/ses-postop/anat/{sub}_ses-postop_ce-{site.ce_label}_T1w.nii.gz"]})
    _save(brain.astype(np.uint8), aff, man / f"{sub}_ses-postop_label-brain_mask.nii.gz",
          {"Description": "brain mask of the simulation", "Type": "Brain"})

    if has_preop:
        motion = sim.random_rigid(rng, center[:3], degrees=(3.0, 8.0), mm=(5.0, 10.0))
        motion = motion if pose is None else motion @ pose
        ptilt = (sim.rotation_matrix(rng.uniform(-1, 1, size=3) * site.oblique_deg / np.sqrt(3))
                 if site.oblique_deg else np.eye(3))
        pshape, paff = sim.grid_covering(case.brain_mask, case.affine, spacing=site.preop_spacing,
                                         axcodes=site.axcodes, rotation=ptilt, world_transform=motion)
        pbrain = sim.resample_to_grid(case.brain_mask, case.affine, pshape, paff, order=0,
                                      world_transform=motion) > 0
        onto_pre = sim.GridSampler(case.affine, paff, pbrain, world_transform=motion)
        pre = sim.to_int16(onto_pre(s.preop_t1ce, order=1))
        pname = f"{sub}_ses-preop_ce-{site.ce_label}_T1w.nii.gz"
        _save(pre, paff, root / sub / "ses-preop" / "anat" / pname,
              {"SeriesDescription": "pre-operative contrast-enhanced T1w (real scan, moved and resampled)",
               "Manufacturer": "simulated (bids_postop-demo)", "InstitutionName": site.name,
               "ContrastBolusIngredient": "GADOLINIUM"})
        pmask = onto_pre(s.preop_mask, order=0)
        _save((pmask > 0).astype(np.uint8), paff,
              preop_root / sub / "ses-preop" / "anat" / f"{sub}_ses-preop_label-tumor_mask.nii.gz",
              {"Description": "pre-operative tumour mask of the source case (all tumour labels)",
               "Sources": [f"bids::{sub}/ses-preop/anat/{pname}"]})
    return DemoParticipant(sub, site.name, case_name, residual, has_flair, has_preop,
                           sim.mask_volume_ml(truth, aff), site.ce_label)

