"""BIDS-Derivatives output: names, sidecars, dataset_description.json, atomic writes.

The only module that writes into the output directory. Every file is written to a temporary name in
its final folder and moved into place with ``os.replace``, so a killed run never leaves a half-written
file under a final name. Files shared by concurrent participant jobs (dataset_description.json,
.bidsignore) are written under an exclusive lock.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_postop import __version__

BIDS_VERSION = "1.10.0"
PIPELINE_NAME = "bids_postop"
RAW_LINK = "raw"
SUMMARY_COLUMNS = ("participant_id", "session_id", "site", "config", "model", "residual_volume_ml",
                   "resection_status", "preop_volume_ml", "eor_percent", "threshold", "gtr_cutoff_ml",
                   "gtr_inclusive", "not_for_clinical_use", "rano_resect_class", "measurable_lesions",
                   "sum_bidimensional_mm2", "review_flag", "rt_fraction_members", "residual_volume_ml_min",
                   "residual_volume_ml_max", "mirror_score")
MISSING = "n/a"  # BIDS: a missing TSV value is n/a, never an empty cell
COLUMN_DEFINITIONS = {
    "participant_id": "participant (sub-<label>)",
    "session_id": "post-operative session (ses-<label>), n/a without sessions",
    "site": "site (hospital) from participants.tsv",
    "config": "input configuration used (A: T1w-CE; B: +T1w; C: +FLAIR; D: B + pre-op T1w-CE and mask; E: all)",
    "model": "the model's name (its card: measures JSON 'model')",
    "residual_volume_ml": "residual enhancing tumour: voxel count x |det(affine)| / 1000 on the T1w-CE grid, "
                          "rounded to 1e-6 ml (before the GTR cut-off), ml",
    "resection_status": "GTR (gross total resection) when the residual is below the cut-off, else RT",
    "preop_volume_ml": "pre-operative tumour mask volume in its own grid, ml; n/a without a pre-operative mask",
    "eor_percent": "extent of resection, 100 x (preop - residual) / preop; not clipped (negative flags a problem)",
    "threshold": "probability threshold of the model the mask was made with",
    "gtr_cutoff_ml": "GTR cut-off (ml) this participant was classified with",
    "gtr_inclusive": "true: a residual equal to the cut-off is GTR (the study's code); false: RT (the paper)",
    "not_for_clinical_use": "true when the model card flags the model as not for clinical use (e.g. the demo "
                            "model): do not use these results for patient care",
    "rano_resect_class": "RANO resect class (Karschnia et al. 2023; docs/rano.md): 1, 2A, 2B, 3A, 3B, 4; 1/2A when "
                         "no non-enhancing residual mask was given; n/a when undecidable",
    "measurable_lesions": "residual enhancing components with both perpendicular axial diameters >= 10 mm on >= 2 "
                          "axial slices (RANO 2010)",
    "sum_bidimensional_mm2": "sum of the products of perpendicular axial diameters over the (at most 5) largest "
                             "measurable components, mm^2; 0 when none is measurable",
    "review_flag": "true when the model's members disagree on GTR/RT, their volume range crosses the cut-off, or "
                   "the mirror score exceeds the threshold chosen on validation folds: check this patient; n/a when "
                   "nothing varies",
    "mirror_score": "1 - agreement of each network's mirrored test-time passes (0: they agree, 1: disjoint), mean "
                    "over the model's networks; n/a without test-time mirroring (docs/uncertainty.md)",
    "rt_fraction_members": "share of the model's members (folds, or mirrored test-time passes) that call RT",
    "residual_volume_ml_min": "smallest residual volume among the model's members, ml",
    "residual_volume_ml_max": "largest residual volume among the model's members, ml",
}
# What BIDS does not define, kept out of validation the way fMRIPrep does for its reports and logs.
# Directory patterns without a trailing slash: the BIDS validator (3.x) does not match "dir/" at any depth.
BIDSIGNORE = ("*_measures.tsv", "*_measures.json", "logs", "*.html", "figures", "sub-*/figures", "*.toml", "group",
              "group_summary.*")


def source_prefix(source: str | Path) -> str:
    """``sub-01_ses-postop_ce-gadolinium_T1w.nii.gz`` → ``sub-01_ses-postop_ce-gadolinium``."""
    name = Path(source).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name.rsplit("_", 1)[0]


@dataclass(frozen=True)
class SessionOutputs:
    """Final paths of one post-op session's derivatives for one model, named from its contrast T1w.

    The model's label (:attr:`bids_postop.segmentation.models.ModelCard.label`) is the ``desc-`` value of the
    residual mask, probability map and measures files, so that two models written into one output dataset keep
    both results (``sub-01_ses-postop_ce-gd_label-tumor_desc-demoB_mask.nii.gz``). The brain mask does not depend
    on the model: ``<source>_desc-brain_mask.nii.gz``, as nipreps name theirs.
    """

    anat_dir: Path
    residual_mask: Path
    residual_probseg: Path
    brain_mask: Path
    measures_tsv: Path
    measures_json: Path
    uncertainty_map: Path  # written only when the model has members (folds or mirrored passes)

    @classmethod
    def for_source(cls, output_dir: Path, source_t1ce: Path, subject: str, session: str | None, *,
                   model_label: str) -> SessionOutputs:
        if not model_label.isalnum():
            raise ValueError(f"model label {model_label!r} must be alphanumeric (a BIDS desc value)")
        session_dir = output_dir / f"sub-{subject}" / (f"ses-{session}" if session else "")
        anat = session_dir / "anat"
        prefix = source_prefix(source_t1ce)
        session_prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        return cls(
            anat_dir=anat,
            residual_mask=anat / f"{prefix}_label-tumor_desc-{model_label}_mask.nii.gz",
            residual_probseg=anat / f"{prefix}_label-tumor_desc-{model_label}_probseg.nii.gz",
            brain_mask=anat / f"{prefix}_desc-brain_mask.nii.gz",
            measures_tsv=session_dir / f"{session_prefix}_desc-{model_label}_measures.tsv",
            measures_json=session_dir / f"{session_prefix}_desc-{model_label}_measures.json",
            uncertainty_map=anat / f"{prefix}_label-tumor_desc-{model_label}Uncertainty_probseg.nii.gz",
        )

    def all_files(self) -> tuple[Path, ...]:
        images = (self.residual_mask, self.residual_probseg, self.brain_mask)
        return (*images, *(sidecar(p) for p in images), self.measures_tsv, self.measures_json)

    def relative(self, output_dir: Path) -> dict[str, str]:
        """The image paths relative to the output dataset's root (recorded in the measures JSON: the group level
        pairs each measures file with exactly the masks it describes)."""
        root = Path(output_dir)
        return {"residual_mask": self.residual_mask.relative_to(root).as_posix(),
                "residual_probseg": self.residual_probseg.relative_to(root).as_posix(),
                "brain_mask": self.brain_mask.relative_to(root).as_posix()}


def sidecar(image: Path) -> Path:
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return image.with_name(name[: -len(ext)] + ".json")
    return image.with_suffix(".json")


def bids_uri(path: Path, bids_dir: Path, *, dataset: str = RAW_LINK,
             derivatives: Mapping[str, Path] | None = None) -> str:
    """BIDS URI of an input file, relative to the dataset of DatasetLinks that holds it: ``bids_dir`` (named
    ``dataset``) or one of the ``-d`` ``derivatives`` datasets (by name; the deepest folder wins, so a -d dataset
    inside ``bids_dir/derivatives/`` is named as itself). A file in none of them keeps a ``file://`` URI."""
    resolved = path.resolve()
    roots = [(dataset, Path(bids_dir).resolve()), *((n, Path(r).resolve()) for n, r in (derivatives or {}).items())]
    holders = [(name, root) for name, root in roots if root == resolved or root in resolved.parents]
    if not holders:
        return resolved.as_uri()
    name, root = max(holders, key=lambda item: len(item[1].parts))
    return f"bids:{name}:{resolved.relative_to(root).as_posix()}"


# --- atomic writing -------------------------------------------------------------------------------

def unique_token() -> str:
    """Host, PID and a random part: PIDs repeat across containers (PID 1) and cluster nodes."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _temp_name(final: Path) -> Path:
    # keep the extension so that writers choosing compression by name (nibabel) still work
    name = final.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else final.suffix
    return final.with_name(f".{name}.{unique_token()}.tmp{suffix}")


def atomic_copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def atomic_write_text(dest: Path, text: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def atomic_write_json(dest: Path, data: Any) -> Path:
    return atomic_write_text(dest, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Exclusive lock for files that concurrent participant jobs share."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".bids_postop.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- dataset level --------------------------------------------------------------------------------

ACKNOWLEDGEMENT = ("Cite the method (Helland, Bouget et al., Segmentation of glioblastomas in early post-operative "
                   "multi-modal MRI with deep neural networks, Scientific Reports 13, 18897, 2023) and bids_postop "
                   "with the versions in logs/CITATION.md, which also names the model, brain extraction and "
                   "registration used.")


def container_description() -> dict[str, str] | None:
    """The container this run is in, from the variables the images set (BIDS ``Container``), else ``None``."""
    kind = os.environ.get("BIDS_POSTOP_CONTAINER_TYPE")
    if not kind:
        return None
    return {"Type": kind, "Tag": os.environ.get("BIDS_POSTOP_CONTAINER_TAG", f"bids_postop:{__version__}")}


def write_dataset_description(output_dir: Path, bids_dir: Path, *,
                              derivatives: Mapping[str, Path] | None = None) -> Path:
    """Write or update dataset_description.json (and .bidsignore) under the output lock.

    ``GeneratedBy`` names the running version first (a rerun with another version updates it; earlier versions
    stay listed after it); ``DatasetLinks`` names the input dataset (``raw``) and every ``-d`` dataset, so that
    ``Sources`` are ``bids:<name>:<path>`` URIs; ``License``, ``HowToAcknowledge`` and, inside the images,
    ``Container`` are set. Other keys a user added are kept.
    """
    dest = output_dir / "dataset_description.json"
    links = {RAW_LINK: Path(bids_dir).resolve().as_uri(),
             **{name: Path(path).resolve().as_uri() for name, path in (derivatives or {}).items()}}
    with output_lock(output_dir):
        try:
            current = json.loads(dest.read_text()) if dest.exists() else {}
        except ValueError:
            current = {}
        ours = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": "https://pypi.org/project/bids_postop/"}
        container = container_description()
        if container:
            ours["Container"] = container
        earlier = [g for g in current.get("GeneratedBy", []) if isinstance(g, dict)
                   and not (g.get("Name") == PIPELINE_NAME and g.get("Version") == __version__)]
        sources = current.get("SourceDatasets", [])
        if not any(isinstance(s, dict) and s.get("URL") == links[RAW_LINK] for s in sources):
            sources = [{"URL": links[RAW_LINK]}, *sources]
        description = {
            "Name": "bids_postop: residual tumour segmentation in early post-operative MRI",
            "BIDSVersion": BIDS_VERSION,
            **current,
            "DatasetType": "derivative",
            "GeneratedBy": [ours, *earlier],
            "SourceDatasets": sources,
            "DatasetLinks": {**current.get("DatasetLinks", {}), **links},
            "License": current.get("License", "The license of the input dataset applies to these derivatives"),
            "HowToAcknowledge": ACKNOWLEDGEMENT,
        }
        if description != current:
            atomic_write_json(dest, description)
        ignore = output_dir / ".bidsignore"
        present = ignore.read_text().splitlines() if ignore.exists() else []
        wanted = [p for p in BIDSIGNORE if p not in present]
        if wanted:
            atomic_write_text(ignore, "\n".join([*present, *wanted]) + "\n")
    return dest


# --- participant level ----------------------------------------------------------------------------

def summary_row(values: Mapping[str, Any]) -> str:
    """One TSV (header + row) with SUMMARY_COLUMNS; unknown values are ``n/a``, booleans ``true``/``false``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)

    def cell(value: Any) -> str:
        if value is None or value == "":
            return MISSING
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    writer.writerow([cell(values.get(c)) for c in SUMMARY_COLUMNS])
    return buffer.getvalue()


def write_session_outputs(
    output_dir: Path,
    bids_dir: Path,
    *,
    subject: str,
    session: str | None,
    site: str | None,
    sources: Mapping[str, Path],
    residual_mask: Path,
    residual_probseg: Path,
    brain_mask: Path,
    measures: Mapping[str, Any],
    model: Mapping[str, Any],
    configuration: str,
    extra_provenance: Mapping[str, Any] | None = None,
    derivatives: Mapping[str, Path] | None = None,
    uncertainty: Mapping[str, Any] | None = None,
    uncertainty_map: Path | None = None,
) -> SessionOutputs:
    """Copy one session's results into place with sidecars and the measures TSV/JSON.

    ``sources`` maps role → input file used (for the Sources fields); ``measures`` is
    :meth:`ResidualMeasures.as_dict`; ``model`` is the resolved model's provenance (name, architecture, digest,
    ``derivatives_desc``: the ``desc-`` value of this model's files).
    """
    label = str(model.get("derivatives_desc") or "".join(ch for ch in str(model.get("name", "")) if ch.isalnum())
                or "model")
    outputs = SessionOutputs.for_source(output_dir, sources["postop_t1ce"], subject, session, model_label=label)
    source_uris = [bids_uri(p, bids_dir, derivatives=derivatives) for p in sources.values()]
    t1ce_uri = bids_uri(sources["postop_t1ce"], bids_dir, derivatives=derivatives)
    model_info = dict(model)
    not_clinical = bool(model_info.get("not_for_clinical_use", False))
    common = {"SpatialReference": t1ce_uri}
    atomic_copy(brain_mask, outputs.brain_mask)
    brain_extraction = dict((extra_provenance or {}).get("brain_extraction") or {})
    atomic_write_json(sidecar(outputs.brain_mask), {
        **common, "Type": "Brain", "Sources": [t1ce_uri],
        "Description": "Brain mask computed on the post-operative contrast-enhanced T1w",
        **({"BrainExtraction": brain_extraction} if brain_extraction else {})})
    atomic_copy(residual_probseg, outputs.residual_probseg)
    atomic_write_json(sidecar(outputs.residual_probseg), {
        **common, "Sources": source_uris, "Description": "Residual tumour probability (mean over model folds)",
        "Model": model_info, "Configuration": configuration, "NotForClinicalUse": not_clinical})
    atomic_copy(residual_mask, outputs.residual_mask)
    atomic_write_json(sidecar(outputs.residual_mask), {
        **common, "Type": "Lesion", "Sources": source_uris + [bids_uri(outputs.residual_probseg, output_dir,
                                                                          dataset="")],
        "Description": "Residual enhancing tumour: probability >= threshold, components smaller than "
                       f"{measures['min_component_voxels']} voxels removed",
        "Model": model_info, "Configuration": configuration, "Threshold": measures["threshold"],
        "ResidualVolume_ml": measures["residual_volume_ml"], "ResectionStatus": measures["resection_status"],
        "PreopVolume_ml": measures["preop_volume_ml"], "ExtentOfResection_percent": measures["eor_percent"],
        "NotForClinicalUse": not_clinical})
    relative = outputs.relative(output_dir)
    if uncertainty_map is not None:
        atomic_copy(uncertainty_map, outputs.uncertainty_map)
        atomic_write_json(sidecar(outputs.uncertainty_map), {
            **common, "Sources": [bids_uri(outputs.residual_probseg, output_dir, dataset="")],
            "Description": "Uncertainty of the residual tumour probability: "
                           + str((uncertainty or {}).get("map_definition", "the model members' spread")),
            "MembersKind": (uncertainty or {}).get("members_kind"),
            "MembersCount": (uncertainty or {}).get("members_count"),
            "Model": model_info, "NotForClinicalUse": not_clinical})
        relative["uncertainty_map"] = outputs.uncertainty_map.relative_to(output_dir).as_posix()
    else:  # this run had no members (e.g. --fast): an earlier run's map would describe another prediction
        outputs.uncertainty_map.unlink(missing_ok=True)
        sidecar(outputs.uncertainty_map).unlink(missing_ok=True)
    spread = dict(uncertainty or {})
    inclusive = measures.get("gtr_inclusive", "<=" in str(measures.get("gtr_rule", "")))
    row = {"participant_id": f"sub-{subject}", "session_id": f"ses-{session}" if session else None,
           "site": site, "config": configuration, "model": model.get("name"), **measures,
           "gtr_inclusive": bool(inclusive), "not_for_clinical_use": not_clinical,
           **{key: spread.get(key) for key in ("review_flag", "rt_fraction_members", "residual_volume_ml_min",
                                               "residual_volume_ml_max", "mirror_score")}}
    atomic_write_text(outputs.measures_tsv, summary_row(row))
    atomic_write_json(outputs.measures_json, {
        "participant_id": row["participant_id"], "session_id": row["session_id"], "site": site,
        "configuration": configuration, "model": model_info, "not_for_clinical_use": not_clinical,
        "measures": dict(measures),
        "uncertainty": spread or None,
        "outputs": relative,
        "sources": {role: bids_uri(p, bids_dir, derivatives=derivatives) for role, p in sources.items()},
        "provenance": dict(extra_provenance or {}),
        # one description per column of the measures TSV (its column dictionary), and of the other keys
        "definitions": {**COLUMN_DEFINITIONS,
                        "resection_status": measures["gtr_rule"] + ", else RT (residual tumour)",
                        "outputs": "the files these measures describe, relative to the derivatives dataset's root",
                        "uncertainty": "what the model's members (folds, or mirrored test-time passes) say: see "
                                       "docs/uncertainty.md"}})
    return outputs


def measures_files(output_dir: Path) -> list[Path]:
    """Every per-session measures TSV under ``output_dir`` (any model's ``desc-``)."""
    return sorted(output_dir.glob("sub-*/**/*_measures.tsv"))


def read_summaries(output_dir: Path) -> list[dict[str, str]]:
    """All per-session measure rows under ``output_dir`` (for the final table and the group level); values as
    written (``n/a`` = missing)."""
    rows: list[dict[str, str]] = []
    for tsv in measures_files(output_dir):
        with tsv.open(newline="") as handle:
            rows.extend(csv.DictReader(handle, delimiter="\t"))
    return rows


def existing_outputs(outputs: SessionOutputs) -> Sequence[Path]:
    return [p for p in outputs.all_files() if p.exists()]
