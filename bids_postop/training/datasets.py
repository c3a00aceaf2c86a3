"""Training data: manual masks, data preparation shared with the participant level, nnU-Net raw datasets.

- Manual residual masks come from a derivatives dataset:
  ``sub-X/ses-<postop>/anat/sub-X_ses-<postop>[_desc-*]_label-tumor[_desc-*]_mask.nii[.gz]``, on the post-op
  T1w-CE grid (an empty mask = gross total resection).
- Every participant's inputs go through :func:`bids_postop.workflows.channels.init_channels_wf`, the very
  registration, brain extraction and skull stripping of the participant level, as one nipype workflow per
  participant with ``base_dir`` in the work directory (a rerun reuses finished steps).
- The nnU-Net v2 raw dataset of a configuration holds one case per participant, identifier ``sub-X``:
  ``imagesTr/sub-X_000c.nii.gz`` in the configuration's channel order, ``labelsTr/sub-X.nii.gz``, all in
  RAS+ voxel order (axis flips/permutations of the T1w-CE grid, :func:`bids_postop.core.images.to_ras`,
  no interpolation), read by nnU-Net's NibabelIO. The model card says so (``"nnunet": {"input_convention":
  "RAS"}``, :func:`bids_postop.training.nnunet.card_section`), and the inference adapter
  (:mod:`bids_postop.segmentation.nnunet`) then feeds nnU-Net the same RAS+ arrays whatever a participant's
  stored voxel order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_postop.bids.inputs import ParticipantInputs
from bids_postop.configurations import CONFIGURATIONS, Role
from bids_postop.core.images import load_3d, same_grid, to_ras
from bids_postop.errors import InputDataError

LOG = logging.getLogger("bids_postop.training")

# nnU-Net channel names: "noNorm" keeps the binary pre-op mask out of z-score normalisation.
CHANNEL_NAMES: dict[Role, str] = {
    "postop_t1ce": "T1w-CE",
    "postop_t1": "T1w",
    "postop_flair": "FLAIR",
    "preop_t1ce": "preop-T1w-CE",
    "preop_mask": "noNorm",
}
# nnU-Net dataset ids of the training datasets.
DATASET_IDS: dict[str, int] = {"A": 951, "B": 952, "C": 953, "D": 954, "E": 955}
LABELS = {"background": 0, "residual_tumor": 1}
_MASK_NAME = re.compile(r"_label-tumor(_desc-[a-zA-Z0-9]+)?_mask\.nii(\.gz)?$")


def dataset_name(config: str) -> str:
    """nnU-Net dataset folder name of a configuration, e.g. ``Dataset952_BidsPostopB``."""
    return f"Dataset{DATASET_IDS[config]}_BidsPostop{config}"


@dataclass(frozen=True)
class PreparedCase:
    """One participant ready for nnU-Net: prepared channels on the post-op T1w-CE grid and its manual mask."""

    participant_id: str  # "sub-X": also the nnU-Net case identifier
    site: str | None
    channels: Mapping[Role, Path]  # skull-stripped images (float32) / pre-op mask (uint8), T1w-CE grid
    label: Path  # the manual residual mask (original file)

    def has(self, config: str) -> bool:
        return set(CONFIGURATIONS[config]) <= set(self.channels)  # type: ignore[index]


def find_manual_mask(manual_root: Path, subject: str, session: str | None) -> Path | None:
    """The manual residual mask of a participant (``None`` when there is none).

    Several matches: the one without ``desc-`` wins, then the first name in sorted order.
    """
    folder = manual_root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    prefix = f"sub-{subject}_ses-{session}" if session else f"sub-{subject}"
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.iterdir() if p.name.startswith(prefix + "_") and _MASK_NAME.search(p.name)),
                   key=lambda p: ("_desc-" in p.name, p.name))
    if len(found) > 1:
        LOG.warning("sub-%s: %d manual masks; took %s", subject, len(found), found[0].name)
    return found[0] if found else None


def load_label(mask: Path, reference: Path) -> np.ndarray:
    """Manual mask as a bool array on ``reference``'s grid (its voxel order); empty is allowed (GTR)."""
    img = load_3d(mask, what="manual residual mask")
    ref = load_3d(reference, what="post-operative T1w-CE")
    if not same_grid(img, ref):
        raise InputDataError(f"the manual mask (shape {img.shape}) is not on the post-op T1w-CE grid of "
                             f"{reference.name} (shape {ref.shape}); manual masks must share its shape and affine",
                             mask)
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.allclose(data, np.round(data)):
        raise InputDataError("the manual mask holds non-integer values (a probability map?)", mask)
    return data > 0


def _node_name(text: str) -> str:
    return re.sub(r"\W", "_", text)


def prepare_participant(inputs: ParticipantInputs, roles: Sequence[Role], *, work_dir: Path,
                        brain_method: str = "deepbet", brain_model: str | None = None, device: str = "auto",
                        omp_nthreads: int = 1) -> dict[Role, Path]:
    """Run the participant level's registration + brain extraction + skull stripping for ``roles``.

    One nipype workflow ``prep_<participant>`` under ``work_dir``; finished steps are reused on a rerun.
    Returns the prepared file of every role, all on the post-op T1w-CE grid.
    """
    from nipype.interfaces.utility import Merge
    from nipype.pipeline import engine as pe

    from bids_postop.workflows.channels import init_channels_wf

    roles = [r for r in dict.fromkeys(["postop_t1ce", *roles]) if r in inputs.files]
    workflow = pe.Workflow(name=_node_name(f"prep_{inputs.participant_id}"), base_dir=str(work_dir))
    channels_wf = init_channels_wf(roles=roles, brain_method=brain_method, brain_model=brain_model, device=device,
                                   omp_nthreads=omp_nthreads)
    for role in roles:
        setattr(channels_wf.inputs.inputnode, role, str(inputs.files[role]))
    # nipype drops identity nodes from the executed graph: collect the outputs in a real node
    collect = pe.Node(Merge(len(roles)), name="collect")
    workflow.connect([(channels_wf, collect, [(f"outputnode.{role}", f"in{i}") for i, role in enumerate(roles, 1)])])
    graph = workflow.run(plugin="Linear")
    node = next(n for n in graph.nodes() if n.name == "collect")
    return {role: Path(f) for role, f in zip(roles, node.result.outputs.out, strict=True)}


def prepare_cases(participants: Sequence[ParticipantInputs], *, configs: Sequence[str], manual_root: Path,
                  work_dir: Path, brain_method: str = "deepbet", brain_model: str | None = None, device: str = "auto",
                  omp_nthreads: int = 1,
                  progress: Callable[[str], None] = LOG.info) -> list[PreparedCase]:
    """Prepare every participant that has a manual mask and the inputs of at least one of ``configs``."""
    wanted: set[Role] = {r for c in configs for r in CONFIGURATIONS[c]}  # type: ignore[index]
    cases: list[PreparedCase] = []
    for i, p in enumerate(participants, 1):
        usable = [c for c in configs if set(CONFIGURATIONS[c]) <= set(p.files)]  # type: ignore[index]
        if not usable:
            LOG.warning("%s: not used for training: lacks inputs of configuration(s) %s (has %s)",
                        p.participant_id, ", ".join(configs), ", ".join(sorted(p.files)))
            continue
        mask = find_manual_mask(manual_root, p.subject, p.postop_session)
        if mask is None:
            LOG.warning("%s: not used for training: no manual mask %s_label-tumor_mask.nii.gz under %s",
                        p.participant_id, p.participant_id + (f"_ses-{p.postop_session}" if p.postop_session
                                                              else ""), manual_root)
            continue
        try:
            load_label(mask, p.files["postop_t1ce"])
        except InputDataError as exc:
            LOG.warning("%s: not used for training: %s", p.participant_id, exc)
            continue
        progress(f"data preparation {i}/{len(participants)}: {p.participant_id} "
                 f"({', '.join(r for r in p.files if r in wanted)})")
        files = prepare_participant(p, [r for r in wanted if r in p.files], work_dir=work_dir,
                                    brain_method=brain_method, brain_model=brain_model, device=device,
                                    omp_nthreads=omp_nthreads)
        cases.append(PreparedCase(participant_id=p.participant_id, site=p.site, channels=files, label=mask))
    return cases


def _save_ras(array: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype: type) -> None:
    """Write ``array`` (reference voxel order) in RAS+ voxel order with the matching canonical affine."""
    ras_affine = nib.as_closest_canonical(reference).affine  # header only: data is not read
    out = nib.Nifti1Image(np.asarray(to_ras(array, reference.affine), dtype=dtype), ras_affine)
    out.set_qform(ras_affine, code=1)
    out.set_sform(ras_affine, code=1)
    out.header.set_slope_inter(1, 0)
    nib.save(out, str(path))


def trained_on(name: str | None) -> str:
    """A model card description's " on '<training dataset Name>'" (empty when the dataset has no Name)."""
    return f" on {name!r}" if name else ""


def write_raw_dataset(raw_dir: Path, config: str, cases: Sequence[PreparedCase], *, description: str = "") -> str:
    """Write the nnU-Net v2 raw dataset of ``config`` (replacing any previous one); return its data hash.

    The hash (sha256 over dataset.json and every image and label file, in name order) names the exact
    training data in the model card and tells a resumed run whether preprocessing is still valid.
    """
    roles = CONFIGURATIONS[config]  # type: ignore[index]
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(raw_dir / sub, ignore_errors=True)
        (raw_dir / sub).mkdir(parents=True)
    for case in cases:
        reference = load_3d(case.channels["postop_t1ce"], what="prepared post-op T1w-CE")
        for c, role in enumerate(roles):
            img = load_3d(case.channels[role], what=f"prepared {role}")
            if not same_grid(img, reference):
                raise InputDataError(f"prepared {role} is not on the post-op T1w-CE grid", case.channels[role])
            dtype = np.uint8 if role == "preop_mask" else np.float32
            data = np.asanyarray(img.dataobj)
            data = (data > 0) if role == "preop_mask" else data
            _save_ras(data, reference, raw_dir / "imagesTr" / f"{case.participant_id}_{c:04d}.nii.gz", dtype)
        label = load_label(case.label, case.channels["postop_t1ce"])
        _save_ras(label, reference, raw_dir / "labelsTr" / f"{case.participant_id}.nii.gz", np.uint8)
    dataset_json = {
        "channel_names": {str(c): CHANNEL_NAMES[r] for c, r in enumerate(roles)},
        "labels": LABELS,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        # nibabel reads the RAS+ files as (z, y, x) = array.transpose(2, 1, 0), spacing reversed: the arrays
        # the inference adapter (bids_postop.segmentation.nnunet) hands to nnU-Net
        "overwrite_image_reader_writer": "NibabelIO",
        "name": f"bids_postop configuration {config}",
        "description": description or f"bids_postop training data, configuration {config} "
                                      f"({', '.join(roles)}), skull-stripped, RAS+ voxel order",
    }
    (raw_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    return hash_files([raw_dir / "dataset.json", *sorted((raw_dir / "imagesTr").iterdir()),
                       *sorted((raw_dir / "labelsTr").iterdir())], root=raw_dir)


def hash_files(files: Sequence[Path], *, root: Path) -> str:
    """sha256 over the relative names and bytes of ``files``."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
