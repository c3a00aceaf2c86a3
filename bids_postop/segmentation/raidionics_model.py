"""A Raidionics model folder: its ``pre_processing.ini`` (the keys inference needs, read with Raidionics'
conventions and checked, every error naming the file and key), its ONNX files (one per fold or one), and the
model card of a published post-operative model folder (``MRI_GBM_Postop_FV_1p`` … ``_5p`` → configurations
A … E). What is done with them is :mod:`bids_postop.segmentation.raidionics`."""

from __future__ import annotations

import configparser
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bids_postop.configurations import CONFIGURATIONS, ConfigName
from bids_postop.errors import ModelError
from bids_postop.segmentation.models import DEFAULT_THRESHOLD, ModelCard

LOG = logging.getLogger("bids_postop")

INI_NAME = "pre_processing.ini"
ONNX_NAME = "model.onnx"
INPUT_NAME = "input"
CROPPING_MODES = ("minimum", "brain_mask", "brain_clip")
NORMALIZATION_METHODS = ("default", "zeromean", "zeromean_nonzero")
CHANNEL_ORDERS = ("channels_last", "channels_first")
ACTIVATIONS = ("softmax", "sigmoid")
# Published post-operative models → configuration (channel order as in SPEC.md / configurations.py).
POSTOP_MODEL_PATTERN = re.compile(r"MRI_GBM_Postop_FV_([1-5])p")
POSTOP_CONFIGURATIONS: dict[int, ConfigName] = {1: "A", 2: "B", 3: "C", 4: "D", 5: "E"}

Mode = Literal["full", "slab", "patch"]


@dataclass(frozen=True)
class RaidionicsConfig:
    """The keys of a Raidionics ``pre_processing.ini`` that inference needs (defaults as in Raidionics)."""

    imaging_modality: str = "MRI"
    training_backend: str = "TF"
    task: str = "segmentation"
    output_spacing: tuple[float, float, float] | None = None  # mm; None: the smallest input spacing
    background_cropping: str | None = None  # None or one of CROPPING_MODES
    intensity_clipping_range: tuple[float, float] = (0.0, 100.0)  # percentiles
    normalization_method: str | None = None  # None or one of NORMALIZATION_METHODS
    new_axial_size: tuple[int, ...] | None = None  # 3: full volume, 2: slab, None: patch-wise
    slicing_plane: str = "axial"
    swap_training_input: bool = False
    number_inputs: int = 1
    channels_order: str = "channels_last"
    nb_classes: int = 2
    classes: tuple[str, ...] = ()
    slab_size: int | None = None
    patch_size: tuple[int, int, int] | None = None
    patch_offset: tuple[int, int, int] | None = None  # None: half the patch
    optimal_thresholds: tuple[float, ...] = ()
    deep_supervision: bool = False
    activation_layer_included: bool = True
    activation_layer_type: str = "softmax"

    @property
    def mode(self) -> Mode:
        if self.new_axial_size is None:
            return "patch"
        return "full" if len(self.new_axial_size) == 3 else "slab"

    @property
    def foreground_class(self) -> int:
        """Index of the first target class: 0 for sigmoid outputs, 1 (after background) for softmax."""
        return 0 if self.activation_layer_type == "sigmoid" else 1


def _value(parser: configparser.ConfigParser, section: str, key: str) -> str | None:
    """A value with Raidionics' conventions: ``#`` starts a comment, an empty value means unset."""
    if not parser.has_option(section, key):
        return None
    value = parser.get(section, key, raw=True).split("#")[0].strip()
    return value or None


def _numbers(text: str | None, kind: type, path: Path, key: str, count: tuple[int, ...] | None = None) -> Any:
    if text is None:
        return None
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ModelError(f"{path}: {key} = {text!r} is not a comma-separated list of {kind.__name__}") from exc
    if count is not None and len(values) not in count:
        raise ModelError(f"{path}: {key} = {text!r} must have {' or '.join(map(str, count))} values")
    return values


def _choice(value: str | None, allowed: tuple[str, ...], path: Path, key: str) -> str | None:
    if value is not None and value not in allowed:
        raise ModelError(f"{path}: {key} = {value!r} is not one of {list(allowed)}")
    return value


def read_preprocessing_ini(path: str | Path) -> RaidionicsConfig:
    """Parse a Raidionics ``pre_processing.ini`` (the file, or the model folder holding it).

    Raises :class:`ModelError` naming the file, the key and the allowed values when a value is not usable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INI_NAME
    parser = configparser.ConfigParser()
    try:
        with path.open() as handle:
            parser.read_file(handle)
    except (OSError, configparser.Error) as exc:
        raise ModelError(f"{path}: cannot read the Raidionics pre-processing file ({exc})") from exc

    def get(section: str, key: str) -> str | None:
        return _value(parser, section, key)

    def flag(section: str, key: str, default: bool) -> bool:
        value = get(section, key)
        return default if value is None else value.lower() == "true"

    cropping = get("PreProcessing", "background_cropping")
    cropping = None if cropping is None or cropping.lower() in ("false", "none") else cropping.lower()
    normalization = get("PreProcessing", "normalization_method")
    normalization = None if normalization is None or normalization.lower() == "none" else normalization.lower()
    config = RaidionicsConfig(
        imaging_modality=get("Default", "imaging_modality") or "MRI",
        training_backend=get("Default", "training_backend") or "TF",
        task=get("Default", "task") or "segmentation",
        output_spacing=_numbers(get("PreProcessing", "output_spacing"), float, path, "output_spacing", (3,)),
        background_cropping=_choice(cropping, CROPPING_MODES, path, "background_cropping"),
        intensity_clipping_range=_numbers(get("PreProcessing", "intensity_clipping_range"), float, path,
                                          "intensity_clipping_range", (2,)) or (0.0, 100.0),
        normalization_method=_choice(normalization, NORMALIZATION_METHODS, path, "normalization_method"),
        new_axial_size=_numbers(get("PreProcessing", "new_axial_size"), int, path, "new_axial_size", (2, 3)),
        slicing_plane=(get("PreProcessing", "slicing_plane") or "axial").lower(),
        swap_training_input=flag("PreProcessing", "swap_training_input", False),
        number_inputs=int(get("PreProcessing", "number_inputs") or 1),
        channels_order=_choice(get("PreProcessing", "channels_order") or "channels_last", CHANNEL_ORDERS, path,
                               "channels_order") or "channels_last",
        nb_classes=int(get("Training", "nb_classes") or 2),
        classes=tuple(c.strip() for c in (get("Training", "classes") or "").split(",") if c.strip()),
        slab_size=_numbers(get("Training", "slab_size"), int, path, "slab_size", (1,))[0]
        if get("Training", "slab_size") else None,
        patch_size=_numbers(get("Training", "patch_size"), int, path, "patch_size", (3,)),
        patch_offset=_numbers(get("Training", "patch_offset"), int, path, "patch_offset", (3,)),
        optimal_thresholds=_numbers(get("Training", "optimal_thresholds"), float, path, "optimal_thresholds") or (),
        deep_supervision=flag("Training", "deep_supervision", False),
        activation_layer_included=flag("Training", "activation_layer_included", True),
        activation_layer_type=_choice((get("Training", "activation_layer_type") or "softmax").lower(), ACTIVATIONS,
                                      path, "activation_layer_type") or "softmax",
    )
    _check_supported(config, path)
    return config


def _check_supported(config: RaidionicsConfig, path: Path) -> None:
    if config.imaging_modality != "MRI":
        raise ModelError(f"{path}: imaging_modality = {config.imaging_modality!r}; only MRI models are supported")
    if config.swap_training_input:
        raise ModelError(f"{path}: swap_training_input = true is not supported")
    if config.mode == "slab" and (config.slicing_plane != "axial" or not config.slab_size):
        raise ModelError(f"{path}: slab models need slicing_plane = axial and [Training] slab_size "
                         f"(got {config.slicing_plane!r}, {config.slab_size!r})")
    if config.mode == "patch" and config.patch_size is None:
        raise ModelError(f"{path}: no new_axial_size (patch-wise model) but no [Training] patch_size either")
    if config.patch_size and config.patch_offset and any(
            o >= p or o < 0 for o, p in zip(config.patch_offset, config.patch_size, strict=True)):
        raise ModelError(f"{path}: patch_offset {config.patch_offset} must be in [0, patch_size {config.patch_size})")


def class_threshold(config: RaidionicsConfig, class_index: int | None = None) -> float | None:
    """The probability threshold of one class, as Raidionics reads ``optimal_thresholds``.

    One value per class (background included for softmax models) is indexed by class; any other count
    means the first value applies to every class. ``None`` when the file gives no threshold.
    """
    index = config.foreground_class if class_index is None else class_index
    thresholds = config.optimal_thresholds
    if not thresholds:
        return None
    return float(thresholds[index] if len(thresholds) == config.nb_classes else thresholds[0])


def model_files(folder: str | Path) -> tuple[Path, ...]:
    """The ONNX files of a model folder: one per fold sub-folder, else the folder's own ``model.onnx``."""
    folder = Path(folder)
    folds = tuple(sorted(sub / ONNX_NAME for sub in folder.iterdir() if (sub / ONNX_NAME).is_file()))
    if folds:
        if (folder / ONNX_NAME).is_file():
            LOG.info("%s: using the %d fold models in its sub-folders; the top-level %s is not used",
                     folder, len(folds), ONNX_NAME)
        return folds
    if (folder / ONNX_NAME).is_file():
        return (folder / ONNX_NAME,)
    raise ModelError(f"{folder}: no {ONNX_NAME} here or in its sub-folders (a Raidionics model folder holds "
                     f"{INI_NAME} and {ONNX_NAME}, or one sub-folder per fold with a {ONNX_NAME})")


def card_for_raidionics_folder(folder: str | Path) -> ModelCard:
    """A model card for a Raidionics post-operative model folder that has no ``bids_postop_model.json``.

    ``MRI_GBM_Postop_FV_1p`` … ``_5p`` (in the folder name) map to configurations A … E; the threshold is
    the tumour class's ``optimal_thresholds`` (0.5, with a warning, when the file has none).
    """
    folder = Path(folder).expanduser().resolve()
    config = read_preprocessing_ini(folder)
    match = POSTOP_MODEL_PATTERN.search(folder.name)
    if match is None:
        raise ModelError(f"{folder}: not one of the published post-operative models (folder name should contain "
                         f"MRI_GBM_Postop_FV_1p … _5p); write a bids_postop_model.json with architecture "
                         f"'raidionics' to use another Raidionics model")
    configuration = POSTOP_CONFIGURATIONS[int(match.group(1))]
    channels = CONFIGURATIONS[configuration]
    if config.number_inputs != len(channels):
        raise ModelError(f"{folder}: {INI_NAME} says number_inputs = {config.number_inputs}, but "
                         f"{match.group(0)} takes {len(channels)} channels ({', '.join(channels)})")
    model_files(folder)  # fail now, not at the first participant
    threshold = class_threshold(config)
    if threshold is None:
        LOG.warning("%s: no optimal_thresholds in %s; using %.2f", folder, INI_NAME, DEFAULT_THRESHOLD)
        threshold = DEFAULT_THRESHOLD
    if not 0 < threshold < 1:
        raise ModelError(f"{folder}: optimal threshold {threshold} is not in (0, 1)")
    return ModelCard(
        folder=folder, name=match.group(0), architecture="raidionics", configuration=configuration,
        channels=channels, threshold=threshold,
        intended_use=("Raidionics AGU-Net model for residual glioblastoma on early post-operative MRI "
                      "(Helland, Bouget et al., Sci Rep 2023)"),
        details={"model_folder": ".", "foreground_class": config.foreground_class}, raw={})
