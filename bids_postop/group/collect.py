"""Find what the group level works on: participant results, manual annotations, folds and rater groups.

Predictions: every ``sub-X[/ses-Y]/*_measures.tsv`` of a derivatives dataset (any ``desc``: the participant
level names them after the model), with the measures JSON of the same name. The JSON's ``outputs`` gives
each row's residual mask (path relative to the dataset root); outputs of older versions without that key
fall back to ``anat/*_label-tumor_desc-<desc>_mask.nii.gz`` beside it (``desc`` of the measures file, e.g.
``residual``), with a note. One dataset may hold several models' results for a session: each model is its
own compared *source* (``<dataset>`` when the dataset holds one model, else ``<dataset>:<model label>``).

Architecture and configuration come from the model card recorded in the JSON (``model.architecture``:
``nnunet`` → nnU-Net, ``raidionics``/``agunet`` → AGU-Net; ``model.configuration``), never from the name.

Each row's *set* (for the paper's tables): ``validation`` with its fold when the JSON records an own-fold
prediction (``provenance.cross_validation.fold``, written by ``bids_postop-train``); else the fold of the
folds TSV / participants.tsv (``test``/``holdout`` = the test set); else ``test`` when the model card lists the
participant among its held-out test participants. An ensemble prediction of a participant the model was
trained on is set ``training`` (in no validation or test column).

Manual annotations: BIDS derivatives datasets holding masks with the entities ``suffix=mask``,
``label=tumor`` (pybids), e.g. ``sub-X[_ses-Y]_label-tumor[_desc-<rater>]_mask.nii.gz``; the rater is the
``desc`` value, else the dataset's name (``-d manual=PATH`` → ``manual``). The older entity order
``_desc-<rater>_label-tumor_mask`` is still read, with a deprecation note.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_postop.bids.inputs import normalize_label, read_sites
from bids_postop.errors import InputDataError, UsageError

Key = tuple[str, str | None]  # (subject label, session label or None), no "sub-"/"ses-" prefixes
HOLDOUT_FOLDS = ("test", "holdout", "hold-out")
MISSING = ("", "n/a", "N/A", "nan", "NaN", "None")
ARCHITECTURES = {"nnunet": "nnU-Net", "raidionics": "AGU-Net", "agunet": "AGU-Net"}
CV_KEY = "cross_validation"


def is_missing(value: object) -> bool:
    """``n/a``, an empty cell (outputs of older versions) or ``None``."""
    return value is None or (isinstance(value, str) and value.strip() in MISSING)


def architecture_label(card_architecture: str | None) -> str:
    """Display name of a model card's ``architecture``: nnU-Net, AGU-Net, else the value (``unknown``)."""
    if not card_architecture:
        return "unknown"
    return ARCHITECTURES.get(str(card_architecture).lower(), str(card_architecture))


def model_label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", name) or "model"


@dataclass(frozen=True)
class Prediction:
    """One session's participant-level result of one model in one derivatives dataset."""

    source: str  # the compared unit: dataset name, or dataset:model when the dataset holds several models
    key: Key
    row: Mapping[str, str]  # the measures TSV row, missing values as ""
    mask: Path | None
    dataset: str = ""
    model: Mapping[str, Any] = field(default_factory=dict)  # the model card as the measures JSON records it
    provenance: Mapping[str, Any] = field(default_factory=dict)
    measures: Mapping[str, Any] = field(default_factory=dict)  # the measures JSON's "measures"
    card_training: Mapping[str, Any] = field(default_factory=dict)  # the model card's "training" (if readable)
    uncertainty: Mapping[str, Any] = field(default_factory=dict)  # the measures JSON's "uncertainty" (members)

    @property
    def participant_id(self) -> str:
        return f"sub-{self.key[0]}"

    @property
    def session_id(self) -> str | None:
        return f"ses-{self.key[1]}" if self.key[1] else None

    @property
    def model_name(self) -> str:
        return str(self.model.get("name") or self.row.get("model") or "")

    @property
    def architecture(self) -> str:
        return architecture_label(self.model.get("architecture"))

    @property
    def configuration(self) -> str:
        return str(self.model.get("configuration") or self.row.get("config") or "")

    @property
    def cv_fold(self) -> str | None:
        """The fold of an own-fold (cross-validation) prediction, from the measures JSON."""
        cv = self.provenance.get(CV_KEY) or {}
        return None if cv.get("fold") is None else str(cv["fold"])

    def cutoff(self) -> tuple[float | None, bool | None]:
        """The participant level's GTR cut-off (ml) and inclusive rule: TSV columns ``gtr_cutoff_ml`` /
        ``gtr_inclusive``, else the JSON's ``measures`` (``gtr_cutoff_ml``, ``gtr_rule``); ``None`` if unknown."""
        ml = _float(self.row.get("gtr_cutoff_ml"))
        if ml is None:
            ml = _float(self.measures.get("gtr_cutoff_ml"))
        inclusive = _bool(self.row.get("gtr_inclusive"))
        if inclusive is None and isinstance(self.measures.get("gtr_rule"), str):
            inclusive = "<=" in self.measures["gtr_rule"]
        return ml, inclusive


def _float(value: object) -> float | None:
    if is_missing(value):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if is_missing(value):
        return None
    text = str(value).strip().lower()
    return True if text in ("true", "1", "yes") else False if text in ("false", "0", "no") else None


def entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name (``sub-01_ses-post_desc-r1_label-tumor_mask.nii.gz`` → {sub, ses, desc, label})."""
    stem = name.split(".", 1)[0]
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)


def _key(participant_id: str, session_id: str | None) -> Key:
    session = "" if is_missing(session_id) else str(session_id).strip()
    return normalize_label(participant_id.strip()), (session[4:] if session.startswith("ses-") else session) or None


def read_measures(tsv: Path) -> list[dict[str, str]]:
    """Rows of one measures TSV; ``n/a`` and empty cells become ``""``."""
    with tsv.open(newline="") as handle:
        return [{k: ("" if is_missing(v) else v) for k, v in row.items() if k is not None}
                for row in csv.DictReader(handle, delimiter="\t")]


def _card_training(model: Mapping[str, Any]) -> dict:
    folder = model.get("folder")
    if not folder:
        return {}
    try:
        card = json.loads((Path(folder) / "bids_postop_model.json").read_text())
    except (OSError, ValueError):
        return {}
    return dict(card.get("training") or {}) if isinstance(card, dict) else {}


def _mask_of(dataset: Path, tsv: Path, outputs: Mapping[str, Any] | None, notes: list[str]) -> Path | None:
    if outputs and outputs.get("residual_mask"):
        path = dataset / str(outputs["residual_mask"])
        return path if path.exists() else None
    desc = entities(tsv.name).get("desc", "residual")
    masks = sorted((tsv.parent / "anat").glob(f"*_label-tumor_desc-{desc}_mask.nii*"))
    if masks:
        notes.append(f"{tsv.parent.relative_to(dataset)}: the measures JSON has no 'outputs' (written by an older "
                     f"version): the mask was found by name ({masks[0].name})")
    return masks[0] if masks else None


def collect_predictions(dataset: Path, name: str, bids_dir: Path, *, notes: list[str] | None = None,
                        required: bool = True) -> list[Prediction]:
    """Every measures row of ``dataset`` with its residual mask (``None`` when missing); site filled in from
    participants.tsv when the row has none. ``notes`` receives what the user should know (fallbacks)."""
    notes = notes if notes is not None else []
    if not dataset.is_dir():
        if not required:
            return []
        raise UsageError(f"{dataset}: the derivatives dataset of '{name}' does not exist")
    files = sorted(dataset.glob("sub-*/**/*_measures.tsv"))
    if not files:
        if not required:
            return []
        raise InputDataError(f"no sub-*/[ses-*/]*_measures.tsv; run the participant level first "
                             f"(bids_postop BIDS_DIR {dataset} participant)", dataset)
    sites = read_sites(bids_dir)
    fallback_notes: list[str] = []
    raw: list[tuple[dict, dict, Path | None]] = []
    for tsv in files:
        try:
            data = json.loads(tsv.with_suffix(".json").read_text())
        except (OSError, ValueError):
            data = {}
        mask = _mask_of(dataset, tsv, data.get("outputs"), fallback_notes)
        for row in read_measures(tsv):
            raw.append((row, data, mask))
    if fallback_notes:
        notes.append(f"{name}: {len(fallback_notes)} measures JSON(s) without 'outputs' (older version): masks "
                     f"paired by file name, e.g. {fallback_notes[0]}")
    if not any(data for _, data, _ in raw):
        notes.append(f"{name}: no measures JSON beside the measures TSVs: architecture, configuration, fold and "
                     f"cut-off are unknown for its rows")
    models = {str((data.get("model") or {}).get("name") or row.get("model") or "") for row, data, _ in raw}
    cards: dict[str, dict] = {}
    out = []
    for row, data, mask in raw:
        key = _key(row["participant_id"], row.get("session_id"))
        if not row.get("site"):
            row["site"] = sites.get(key[0], "")
        model = dict(data.get("model") or {})
        model_name = str(model.get("name") or row.get("model") or "")
        source = name if len(models) <= 1 else f"{name}:{model_label(model_name)}"
        if model_name not in cards:
            cards[model_name] = _card_training(model)
        out.append(Prediction(source=source, key=key, row=row, mask=mask, dataset=name, model=model,
                              provenance=dict(data.get("provenance") or {}), measures=dict(data.get("measures") or {}),
                              card_training=cards[model_name], uncertainty=dict(data.get("uncertainty") or {})))
    return out


# --- manual annotations -------------------------------------------------------------------------------------

def _mask_entities(path: Path) -> dict[str, Any] | None:
    from bids.layout import parse_file_entities

    ent = parse_file_entities(str(path), config=["bids", "derivatives"])
    if ent.get("suffix") != "mask" or ent.get("label") != "tumor" or ent.get("extension") not in (".nii.gz", ".nii"):
        return None
    return ent


def collect_annotations(manual: Mapping[str, Path], *, notes: list[str] | None = None
                        ) -> tuple[dict[Key, dict[str, Path]], str | None]:
    """(session → rater → mask) over the manual datasets, and the default reference rater: the masks without
    ``desc`` of the first dataset given, when it has any. Masks are found by their pybids entities
    (``suffix=mask``, ``label=tumor``), grouped by ``desc``."""
    notes = notes if notes is not None else []
    found: dict[Key, dict[str, Path]] = {}
    origin: dict[str, str] = {}  # rater → dataset it came from
    default: str | None = None
    for name, root in manual.items():
        if not Path(root).is_dir():
            raise UsageError(f"{root}: the manual-annotation dataset '{name}' does not exist")
        files = [(p, e) for p in sorted(Path(root).glob("sub-*/**/anat/*")) if (e := _mask_entities(p))]
        if not files:
            raise UsageError(f"{root}: no sub-*/[ses-*/]anat/*_label-tumor[_desc-<rater>]_mask.nii.gz in the "
                             f"manual-annotation dataset '{name}'")
        old_order = [p.name for p, e in files if "desc" in e and p.name.find("_desc-") < p.name.find("_label-")]
        if old_order:
            notes.append(f"{name}: {len(old_order)} mask(s) named with the entity order _desc-<rater>_label-tumor "
                         f"(e.g. {old_order[0]}): deprecated, still read; BIDS orders label before desc: "
                         f"sub-X_ses-Y_label-tumor_desc-<rater>_mask.nii.gz")
        for path, ent in files:
            rater = str(ent.get("desc", name))
            if origin.setdefault(rater, name) != name:
                rater = f"{name}-{rater}"  # the same desc in two datasets: keep both apart
                origin.setdefault(rater, name)
            if default is None and "desc" not in ent:
                default = rater
            key = (str(ent.get("subject", "")), ent.get("session"))
            if rater in found.get(key, {}):
                notes.append(f"{name}: several masks of rater '{rater}' for sub-{key[0]}; "
                             f"{found[key][rater].name} is used, {path.name} ignored")
                continue
            found.setdefault(key, {})[rater] = path
    return found, default


def annotations_for(key: Key, annotations: Mapping[Key, Mapping[str, Path]]) -> Mapping[str, Path]:
    """The annotations of one session; an annotation without session serves every session of its subject."""
    if key in annotations:
        return annotations[key]
    if key[1] is not None and (key[0], None) in annotations:
        return annotations[(key[0], None)]
    return {}


# --- folds and sets -----------------------------------------------------------------------------------------

def read_folds(folds_tsv: Path | None, bids_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(participant label → fold, site → fold) from ``folds_tsv`` (columns ``participant_id`` or ``site``,
    and ``fold``; ``bids_postop-train``'s splits.tsv is one), else from a ``fold`` column of participants.tsv;
    empty when neither is given."""
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
        return {normalize_label(r["participant_id"]): r["fold"] for r in rows if not is_missing(r.get("fold"))}, {}
    if "site" in header:
        return {}, {r["site"]: r["fold"] for r in rows if not is_missing(r.get("fold"))}
    raise UsageError(f"{path}: the folds TSV needs a 'participant_id' or a 'site' column beside 'fold'; found {header}")


def is_holdout(fold: str) -> bool:
    return fold.strip().lower() in HOLDOUT_FOLDS


def fold_and_set(prediction: Prediction, folds: tuple[dict[str, str], dict[str, str]]) -> tuple[str, str, str]:
    """(fold, set, where the fold came from) of one prediction; set is validation, test, training or unknown
    (rule in the module docstring)."""
    pid = prediction.participant_id
    if prediction.cv_fold is not None:
        return prediction.cv_fold, "validation", "measures JSON (own-fold prediction)"
    trained_on = {p for f in prediction.card_training.get("folds") or [] for p in f.get("validation") or []}
    if pid in trained_on:
        return "", "training", "model card (the model was trained on this participant)"
    by_participant, by_site = folds
    fold = by_participant.get(prediction.key[0]) or by_site.get(prediction.row.get("site", ""), "")
    if fold:
        return fold, "test" if is_holdout(fold) else "validation", "folds TSV"
    if pid in set(prediction.card_training.get("test_participants") or []):
        return "test", "test", "model card (held-out test participant)"
    return "", "unknown", ""
