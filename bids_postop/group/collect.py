"""Find what the group level works on: participant results, manual annotations, folds and rater groups.

Predictions: the participant level's ``sub-X[/ses-Y]/..._desc-residual_measures.tsv`` rows, with the mask
``sub-X[/ses-Y]/anat/*_label-tumor_desc-residual_mask.nii.gz`` beside them. Manual annotations: BIDS
derivatives datasets holding ``sub-X[/ses-Y]/anat/sub-X[_ses-Y][_desc-<rater>]_label-tumor_mask.nii.gz``;
a mask's rater is its ``desc`` value, else the dataset's name (``-d manual=PATH`` → ``manual``).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bids_postop.bids.derivatives import read_summaries
from bids_postop.bids.inputs import normalize_label, read_sites
from bids_postop.errors import InputDataError, UsageError

Key = tuple[str, str | None]  # (subject label, session label or None), no "sub-"/"ses-" prefixes
HOLDOUT_FOLDS = ("test", "holdout", "hold-out")
MASK_SUFFIXES = ("_label-tumor_mask.nii.gz", "_label-tumor_mask.nii")


@dataclass(frozen=True)
class Prediction:
    """One session's participant-level result in one derivatives dataset (``source``)."""

    source: str
    key: Key
    row: Mapping[str, str]
    mask: Path | None

    @property
    def participant_id(self) -> str:
        return f"sub-{self.key[0]}"

    @property
    def session_id(self) -> str | None:
        return f"ses-{self.key[1]}" if self.key[1] else None


def entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name (``sub-01_ses-post_desc-r1_label-tumor_mask.nii.gz`` → {sub, ses, desc, label})."""
    stem = name.split(".", 1)[0]
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)


def _key(participant_id: str, session_id: str | None) -> Key:
    session = (session_id or "").strip()
    return normalize_label(participant_id.strip()), (session[4:] if session.startswith("ses-") else session) or None


def collect_predictions(dataset: Path, source: str, bids_dir: Path) -> list[Prediction]:
    """Every measures row of ``dataset`` with its residual mask (``None`` when missing); site filled in
    from participants.tsv when the row has none."""
    if not dataset.is_dir():
        raise UsageError(f"{dataset}: the derivatives dataset of '{source}' does not exist")
    rows = read_summaries(dataset)
    if not rows:
        raise InputDataError(f"no *_desc-residual_measures.tsv under sub-*/; run the participant level first "
                             f"(bids_postop BIDS_DIR {dataset} participant)", dataset)
    sites = read_sites(bids_dir)
    out = []
    for row in rows:
        key = _key(row["participant_id"], row.get("session_id"))
        row = dict(row)
        if not row.get("site"):
            row["site"] = sites.get(key[0], "")
        folder = dataset / f"sub-{key[0]}" / (f"ses-{key[1]}" if key[1] else "") / "anat"
        masks = sorted(folder.glob("*_label-tumor_desc-residual_mask.nii*"))
        out.append(Prediction(source=source, key=key, row=row, mask=masks[0] if masks else None))
    return out


def collect_annotations(manual: Mapping[str, Path]) -> tuple[dict[Key, dict[str, Path]], str | None]:
    """(session → rater → mask) over the manual datasets, and the default reference rater: the masks
    without ``desc`` of the first dataset given, when it has any."""
    found: dict[Key, dict[str, Path]] = {}
    origin: dict[str, str] = {}  # rater → dataset it came from
    default: str | None = None
    for name, root in manual.items():
        if not Path(root).is_dir():
            raise UsageError(f"{root}: the manual-annotation dataset '{name}' does not exist")
        files = [p for p in sorted(Path(root).glob("sub-*/**/anat/*")) if p.name.endswith(MASK_SUFFIXES)]
        if not files:
            raise UsageError(f"{root}: no sub-*/[ses-*/]anat/*_label-tumor_mask.nii.gz in the manual-annotation "
                             f"dataset '{name}'")
        for path in files:
            ent = entities(path.name)
            rater = ent.get("desc", name)
            if origin.setdefault(rater, name) != name:
                rater = f"{name}-{rater}"  # the same desc in two datasets: keep both apart
                origin.setdefault(rater, name)
            if default is None and "desc" not in ent:
                default = rater
            found.setdefault((ent.get("sub", ""), ent.get("ses")), {})[rater] = path
    return found, default


def annotations_for(key: Key, annotations: Mapping[Key, Mapping[str, Path]]) -> Mapping[str, Path]:
    """The annotations of one session; an annotation without session serves every session of its subject."""
    if key in annotations:
        return annotations[key]
    if key[1] is not None and (key[0], None) in annotations:
        return annotations[(key[0], None)]
    return {}


def read_folds(folds_tsv: Path | None, bids_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(participant label → fold, site → fold) from ``folds_tsv`` (columns ``participant_id`` or ``site``,
    and ``fold``), else from a ``fold`` column of participants.tsv; empty when neither is given."""
    path = folds_tsv if folds_tsv is not None else bids_dir / "participants.tsv"
    if not path.is_file():
        if folds_tsv is not None:
            raise UsageError(f"{folds_tsv}: the folds TSV does not exist")
        return {}, {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    header = list(rows[0]) if rows else []
    if "fold" not in header:
        if folds_tsv is not None:
            raise UsageError(f"{folds_tsv}: a 'fold' column is needed, with 'participant_id' or 'site'; "
                             f"found {header}")
        return {}, {}
    if "participant_id" in header:
        return {normalize_label(r["participant_id"]): r["fold"] for r in rows if r.get("fold") not in ("", "n/a")}, {}
    if "site" in header:
        return {}, {r["site"]: r["fold"] for r in rows if r.get("fold") not in ("", "n/a")}
    raise UsageError(f"{path}: the folds TSV needs a 'participant_id' or a 'site' column beside 'fold'; found {header}")


def fold_of(prediction: Prediction, folds: tuple[dict[str, str], dict[str, str]]) -> str:
    by_participant, by_site = folds
    return by_participant.get(prediction.key[0]) or by_site.get(prediction.row.get("site", ""), "")


def is_holdout(fold: str) -> bool:
    return fold.strip().lower() in HOLDOUT_FOLDS
