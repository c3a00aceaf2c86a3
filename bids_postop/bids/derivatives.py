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
from bids_postop.errors import OutputError

BIDS_VERSION = "1.10.0"
PIPELINE_NAME = "bids_postop"
RAW_LINK = "raw"
SUMMARY_COLUMNS = ("participant_id", "session_id", "site", "config", "model", "residual_volume_ml",
                   "resection_status", "preop_volume_ml", "eor_percent")
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
    """Final paths of one post-op session's derivatives, named from its contrast T1w."""

    anat_dir: Path
    residual_mask: Path
    residual_probseg: Path
    brain_mask: Path
    measures_tsv: Path
    measures_json: Path

    @classmethod
    def for_source(cls, output_dir: Path, source_t1ce: Path, subject: str, session: str | None) -> SessionOutputs:
        session_dir = output_dir / f"sub-{subject}" / (f"ses-{session}" if session else "")
        anat = session_dir / "anat"
        prefix = source_prefix(source_t1ce)
        session_prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        return cls(
            anat_dir=anat,
            residual_mask=anat / f"{prefix}_label-tumor_desc-residual_mask.nii.gz",
            residual_probseg=anat / f"{prefix}_label-tumor_desc-residual_probseg.nii.gz",
            brain_mask=anat / f"{prefix}_label-brain_mask.nii.gz",
            measures_tsv=session_dir / f"{session_prefix}_desc-residual_measures.tsv",
            measures_json=session_dir / f"{session_prefix}_desc-residual_measures.json",
        )

    def all_files(self) -> tuple[Path, ...]:
        images = (self.residual_mask, self.residual_probseg, self.brain_mask)
        return (*images, *(sidecar(p) for p in images), self.measures_tsv, self.measures_json)


def sidecar(image: Path) -> Path:
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return image.with_name(name[: -len(ext)] + ".json")
    return image.with_suffix(".json")


def bids_uri(path: Path, bids_dir: Path, *, dataset: str = RAW_LINK) -> str:
    """BIDS URI of an input file, relative to the dataset named in DatasetLinks."""
    try:
        rel = path.resolve().relative_to(bids_dir.resolve())
    except ValueError:
        return path.resolve().as_uri()
    return f"bids:{dataset}:{rel.as_posix()}"


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

def check_output_dir(output_dir: Path, bids_dir: Path) -> Path:
    """Refuse output directories that would damage or pollute the input dataset; check writability."""
    out = output_dir.resolve()
    bids = bids_dir.resolve()
    if out == bids:
        raise OutputError(f"{out}: the output directory is the BIDS dataset itself; use "
                          f"{bids / 'derivatives' / PIPELINE_NAME} instead")
    if bids in out.parents and (bids / "derivatives") not in (out, *out.parents):
        raise OutputError(f"{out}: the output directory lies inside the BIDS dataset outside derivatives/; "
                          f"use {bids / 'derivatives' / PIPELINE_NAME}")
    if out in bids.parents:
        raise OutputError(f"{out}: the output directory contains the BIDS dataset; choose a separate folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{unique_token()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write to the output directory ({exc.strerror}); for containers, "
                          f"bind it writable (docker -v {out}:/out, singularity -B {out}:/out)") from exc
    return out


def write_dataset_description(output_dir: Path, bids_dir: Path) -> Path:
    """Write dataset_description.json (and .bidsignore) once; later runs keep the first one."""
    dest = output_dir / "dataset_description.json"
    with output_lock(output_dir):
        if not dest.exists():
            atomic_write_json(dest, {
                "Name": "bids_postop: residual tumour segmentation in early post-operative MRI",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                                 "CodeURL": "https://pypi.org/project/bids_postop/"}],
                "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
                "DatasetLinks": {RAW_LINK: bids_dir.resolve().as_uri()},
            })
        ignore = output_dir / ".bidsignore"
        present = ignore.read_text().splitlines() if ignore.exists() else []
        wanted = [p for p in BIDSIGNORE if p not in present]
        if wanted:
            atomic_write_text(ignore, "\n".join([*present, *wanted]) + "\n")
    return dest


# --- participant level ----------------------------------------------------------------------------

def summary_row(values: Mapping[str, Any]) -> str:
    """One TSV (header + row) with SUMMARY_COLUMNS; unknown values are empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)

    def cell(value: Any) -> str:
        if value is None:
            return ""
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
) -> SessionOutputs:
    """Copy one session's results into place with sidecars and the measures TSV/JSON.

    ``sources`` maps role → input file used (for the Sources fields); ``measures`` is
    :meth:`ResidualMeasures.as_dict`.
    """
    outputs = SessionOutputs.for_source(output_dir, sources["postop_t1ce"], subject, session)
    source_uris = [bids_uri(p, bids_dir) for p in sources.values()]
    t1ce_uri = bids_uri(sources["postop_t1ce"], bids_dir)
    model_info = dict(model)
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
        "Model": model_info, "Configuration": configuration})
    atomic_copy(residual_mask, outputs.residual_mask)
    atomic_write_json(sidecar(outputs.residual_mask), {
        **common, "Type": "Lesion", "Sources": source_uris + [bids_uri(outputs.residual_probseg, output_dir,
                                                                          dataset="")],
        "Description": "Residual enhancing tumour: probability >= threshold, components smaller than "
                       f"{measures['min_component_voxels']} voxels removed",
        "Model": model_info, "Configuration": configuration, "Threshold": measures["threshold"],
        "ResidualVolume_ml": measures["residual_volume_ml"], "ResectionStatus": measures["resection_status"],
        "PreopVolume_ml": measures["preop_volume_ml"], "ExtentOfResection_percent": measures["eor_percent"]})
    row = {"participant_id": f"sub-{subject}", "session_id": f"ses-{session}" if session else None,
           "site": site, "config": configuration, "model": model.get("name"), **measures}
    atomic_write_text(outputs.measures_tsv, summary_row(row))
    atomic_write_json(outputs.measures_json, {
        "participant_id": row["participant_id"], "session_id": row["session_id"], "site": site,
        "configuration": configuration, "model": model_info, "measures": dict(measures),
        "sources": {role: bids_uri(p, bids_dir) for role, p in sources.items()},
        "provenance": dict(extra_provenance or {}),
        "definitions": {
            "residual_volume_ml": "voxel count x product of voxel sizes (mm^3) / 1000, on the T1w-CE grid",
            "resection_status": measures["gtr_rule"] + ", else RT (residual tumour)",
            "preop_volume_ml": "pre-operative tumour mask volume in its own grid",
            "eor_percent": "100 x (preop - residual) / preop; not clipped"}})
    return outputs


def read_summaries(output_dir: Path) -> list[dict[str, str]]:
    """All per-session measure rows under ``output_dir`` (for the final table and the group level)."""
    rows: list[dict[str, str]] = []
    for tsv in sorted(output_dir.glob("sub-*/**/*_desc-residual_measures.tsv")):
        with tsv.open(newline="") as handle:
            rows.extend(csv.DictReader(handle, delimiter="\t"))
    return rows


def existing_outputs(outputs: SessionOutputs) -> Sequence[Path]:
    return [p for p in outputs.all_files() if p.exists()]
