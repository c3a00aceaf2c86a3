"""Model cards and model folders: which models exist, which configuration each takes, with which threshold.

A *bids_postop model* is a folder holding ``bids_postop_model.json`` (the model card) and the model's
files. A *model collection* is a folder whose sub-folders are models (one per configuration, say);
``--model demo`` is the collection shipped inside the package. A bare nnU-Net v2 trained-model folder
(``plans.json``, ``dataset.json``, ``fold_*``) is accepted too: its configuration is inferred from the
number of input channels and its threshold defaults to 0.5, both with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_postop.configurations import CONFIGURATIONS, ConfigName, Role
from bids_postop.core.uncertainty import CARD_SECTION, check_score_threshold
from bids_postop.errors import ModelError

CARD_NAME = "bids_postop_model.json"
DEMO_MODELS = Path(__file__).resolve().parents[1] / "data" / "models" / "demo"
DEFAULT_THRESHOLD = 0.5
LOG = logging.getLogger("bids_postop")


@dataclass(frozen=True)
class ModelCard:
    """What the pipeline needs to know about one trained model."""

    folder: Path
    name: str
    architecture: str  # "nnunet" (others arrive with the backends issue)
    configuration: ConfigName
    channels: tuple[Role, ...]
    threshold: float
    intended_use: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)  # architecture-specific section
    raw: Mapping[str, Any] = field(default_factory=dict)  # the whole card, for provenance

    @property
    def not_for_clinical_use(self) -> bool:
        """The card's boolean ``not_for_clinical_use`` (absent: False). A flag, never a text match: every
        output of a run with such a model says so (TSV column, measures JSON, report banner, final table)."""
        return bool(self.raw.get("not_for_clinical_use", False))

    @property
    def label(self) -> str:
        """The model's name made alphanumeric: the ``desc-`` value of its derivatives (``demo-B`` → ``demoB``), so
        that two models written into one output dataset never overwrite each other."""
        return re.sub(r"[^A-Za-z0-9]", "", self.name) or "model"

    @property
    def input_images(self) -> str:
        """What the model is fed: ``"skull-stripped"`` registered channels (nnU-Net and models trained here), or
        ``"registered"`` scans before skull stripping plus the brain mask (published Raidionics packages, as the
        official Raidionics pipeline feeds them)."""
        return str(self.details.get("input_images", "skull-stripped"))

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, "configuration": self.configuration,
                "channels": list(self.channels), "threshold": self.threshold,
                "intended_use": self.intended_use, "not_for_clinical_use": self.not_for_clinical_use,
                "channel_order_source": str(self.details.get("channel_order_source", "model card")),
                "input_images": self.input_images, "folder": str(self.folder)}


def read_card(folder: Path) -> ModelCard:
    """Read and check ``folder/bids_postop_model.json``."""
    path = folder / CARD_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the model card ({exc})") from exc
    try:
        config = raw["configuration"]
        channels = tuple(raw["channels"])
        architecture = raw["architecture"]
    except KeyError as exc:
        raise ModelError(f"{path}: the model card lacks the key {exc}") from exc
    if config not in CONFIGURATIONS:
        raise ModelError(f"{path}: configuration {config!r} is not one of {sorted(CONFIGURATIONS)}")
    if channels != CONFIGURATIONS[config]:
        raise ModelError(f"{path}: channels {list(channels)} do not match configuration {config} "
                         f"({list(CONFIGURATIONS[config])})")
    threshold = raw.get("threshold")
    if threshold is None:
        LOG.warning("%s: no threshold in the model card; using %.2f", path, DEFAULT_THRESHOLD)
        threshold = DEFAULT_THRESHOLD
    if not 0 < float(threshold) < 1:
        raise ModelError(f"{path}: threshold {threshold} is not in (0, 1)")
    return ModelCard(folder=folder, name=str(raw.get("name", folder.name)), architecture=architecture,
                     configuration=config, channels=channels, threshold=float(threshold),
                     intended_use=str(raw.get("intended_use", "")), details=raw.get(architecture, {}), raw=raw)


def _bare_nnunet_card(folder: Path) -> ModelCard:
    dataset = json.loads((folder / "dataset.json").read_text())
    n_channels = len(dataset.get("channel_names", dataset.get("modality", {})))
    by_count = {len(roles): name for name, roles in CONFIGURATIONS.items()}
    if n_channels not in by_count:
        raise ModelError(f"{folder}: nnU-Net model with {n_channels} input channels matches no configuration")
    config = by_count[n_channels]
    LOG.warning("%s: no %s; assuming configuration %s (channels %s) and threshold %.2f — write a model card "
                "to make this explicit", folder, CARD_NAME, config, ", ".join(CONFIGURATIONS[config]),
                DEFAULT_THRESHOLD)
    return ModelCard(folder=folder, name=folder.parent.name + "/" + folder.name, architecture="nnunet",
                     configuration=config, channels=CONFIGURATIONS[config], threshold=DEFAULT_THRESHOLD,
                     details={"trained_model_folder": "."}, raw={})


def _card_for(folder: Path) -> ModelCard | None:
    """The card of a model folder of any supported kind, or ``None`` when it is not a model folder."""
    if (folder / CARD_NAME).is_file():
        return read_card(folder)
    if (folder / "plans.json").is_file() and (folder / "dataset.json").is_file():
        return _bare_nnunet_card(folder)
    if (folder / "pre_processing.ini").is_file() and folder.name.find("Postop") >= 0:
        from bids_postop.segmentation.raidionics_model import card_for_raidionics_folder

        return card_for_raidionics_folder(folder)
    return None


def resolve_models(spec: str | Path) -> list[ModelCard]:
    """Models named by ``--model``: ``demo``, a model folder, a collection of model folders, a bare
    nnU-Net or Raidionics folder, or the name of a model installed with ``bids_postop-models fetch``."""
    if str(spec) == "demo":
        folder = DEMO_MODELS
    else:
        folder = Path(spec).expanduser().resolve()
        if not folder.is_dir() and "/" not in str(spec):
            from bids_postop.models import resolve_installed

            folder = resolve_installed(str(spec))
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder not found (give a model folder, a collection of models, "
                         f"the name of an installed model (bids_postop-models list), or 'demo')")
    card = _card_for(folder)
    if card is not None:
        return [card]
    cards = [c for sub in sorted(folder.iterdir()) if sub.is_dir() and (c := _card_for(sub)) is not None]
    if not cards:
        raise ModelError(f"{folder}: no {CARD_NAME} here or in its sub-folders, and not an nnU-Net "
                         f"trained-model folder (plans.json + dataset.json + fold_*) nor a Raidionics "
                         f"post-op model (pre_processing.ini + model.onnx)")
    seen: dict[str, Path] = {}
    for card in cards:
        if card.configuration in seen:
            raise ModelError(f"{folder}: two models for configuration {card.configuration}: "
                             f"{seen[card.configuration]} and {card.folder}; keep one per configuration")
        seen[card.configuration] = card.folder
    return cards


# --- the resolved model: what a run needs to know about a model, computed once per run ----------------------

# Files whose bytes make a model (cards, plans, weights); logs, validation outputs and install records do not.
DIGEST_PATTERNS = (CARD_NAME, "dataset.json", "plans.json", "pipeline.json", "pre_processing.ini", "*.onnx",
                   "*.pth", "*.pt", "*.h5", "*.keras")
_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def model_files_for_digest(folder: Path) -> list[Path]:
    """The files of a model folder that its content digest covers, sorted by relative path."""
    found = {p for pattern in DIGEST_PATTERNS for p in folder.rglob(pattern)
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def model_digest(folder: Path) -> str:
    """SHA-256 over the model's files (relative path and bytes, :func:`model_files_for_digest`).

    Replacing the weights in place (``bids_postop-models fetch --force``, retraining into the same folder) changes
    it, so work-directory caches keyed on it recompute. Cached per process on (path, size, mtime) of every file.
    """
    folder = Path(folder).resolve()
    files = model_files_for_digest(folder)
    key = (str(folder), tuple((f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                              for f in files))
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def reader_convention(card: ModelCard) -> str:
    """How the model's input arrays are oriented: nnU-Net models per their card or ``dataset.json`` reader
    (:func:`bids_postop.segmentation.nnunet.reader_convention`), Raidionics models on their native grid."""
    if card.architecture == "nnunet":
        from bids_postop.segmentation.nnunet import reader_convention as nnunet_reader

        return nnunet_reader(card)
    if card.architecture == "raidionics":
        return "native voxel order (raidionicsseg)"
    return "unknown"


@dataclass(frozen=True)
class ResolvedModel:
    """One model as a run uses it, built once per run (:func:`resolve`) and passed to the workflow: the card,
    the content digest (a segmentation node input, so cached results are reused only for the same model bytes),
    the reader convention and the inputs it wants."""

    card: ModelCard
    digest: str
    reader: str
    inputs: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.card.label

    @property
    def not_for_clinical_use(self) -> bool:
        return self.card.not_for_clinical_use

    def provenance(self) -> dict[str, Any]:
        return {**self.card.provenance(), "digest": f"sha256:{self.digest}", "reader": self.reader,
                "inputs": list(self.inputs), "derivatives_desc": self.label}


@dataclass(frozen=True)
class ReviewSettings:
    """What the model card says about its members (``"uncertainty"`` section, written by ``bids_postop-train``):
    the mirror-score threshold, each fold member's own probability threshold, and which members vote."""

    score_threshold: float | None = None
    member_thresholds: dict[str, float] | None = None  # member name (fold_k) -> threshold
    votes: dict[str, bool] | None = None  # member name -> counts in the GTR/RT agreement and volume interval

    def for_members(self, names: Sequence[str]) -> tuple[list[float] | None, list[bool] | None]:
        """Thresholds and votes in the members' order; ``None`` unless the card names every member."""
        thresholds = [self.member_thresholds[n] for n in names] \
            if self.member_thresholds and all(n in self.member_thresholds for n in names) else None
        votes = [self.votes[n] for n in names] if self.votes and all(n in self.votes for n in names) else None
        if votes is not None and not any(votes):
            votes = None  # every member out would leave no rule: fall back to all (the card cannot mean that)
        return thresholds, votes


def review_settings(card: ModelCard) -> ReviewSettings:
    """The card's ``uncertainty`` section (:class:`ReviewSettings`); a malformed section raises ``ModelError``."""
    section = card.raw.get(CARD_SECTION) or {}
    where = card.folder / CARD_NAME
    if not isinstance(section, dict):
        raise ModelError(f"{where}: {CARD_SECTION!r} must be an object, got {section!r}")
    try:
        limit = check_score_threshold(section.get("score_threshold"), where=f"{CARD_SECTION}.score_threshold")
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    members = section.get("members") or {}
    if not isinstance(members, dict):
        raise ModelError(f"{where}: {CARD_SECTION}.members must be an object (member name -> settings)")
    thresholds, votes = {}, {}
    for name, entry in members.items():
        threshold = entry.get("threshold") if isinstance(entry, dict) else None
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise ModelError(f"{where}: {CARD_SECTION}.members.{name}.threshold must be a probability between 0 "
                             f"and 1; got {threshold!r}")
        thresholds[str(name)] = float(threshold)
        votes[str(name)] = bool(entry.get("votes", True))
    return ReviewSettings(limit, thresholds or None, votes or None)


def score_threshold(card: ModelCard) -> float | None:
    """The model card's ``uncertainty.score_threshold`` (chosen on validation folds), or ``None`` when absent."""
    return review_settings(card).score_threshold


def resolve(spec: str | Path) -> list[ResolvedModel]:
    """The models named by ``--model`` (:func:`resolve_models`), each with its digest and reader convention; a
    malformed ``uncertainty`` section fails here, before any participant runs."""
    out = []
    for card in resolve_models(spec):
        review_settings(card)
        inputs = tuple(f"{role} ({'registered' if role.endswith('_mask') else card.input_images})"
                       for role in card.channels) + \
            (("brain_mask",) if card.architecture == "raidionics" else ())
        out.append(ResolvedModel(card=card, digest=model_digest(card.folder), reader=reader_convention(card),
                                 inputs=inputs))
    return out
