"""A Raidionics model folder: its ``pre_processing.ini`` (the keys inference needs, read with raidionicsseg's
conventions and checked, every error naming the file and key), its ONNX files (one per fold or one), its
``pipeline.json`` (which scans the model takes, in which order), the runtime options raidionicsseg reads from its
own config file (folds, overlap, thresholding order), and the model card of a published post-operative model
folder (``MRI_GBM_Postop_FV_1p`` … ``_5p`` → configurations A … E). What is done with them is
:mod:`bids_postop.segmentation.raidionics`.

Channel order. A package's own ``pipeline.json`` (the Raidionics pipeline format: numbered steps, each with a
``task``; the model's ``Segmentation`` step lists its ``inputs`` ``"0"``, ``"1"``, … with ``timestamp``,
``sequence`` (``T1-CE``, ``T1-w``, ``FLAIR``), ``labels`` (``null`` for a scan, ``"Tumor"`` for a tumour mask)
and ``space``) gives the network's input order when present: input ``"0"``'s timestamp is the post-operative
session (the scan segmented), any other timestamp the pre-operative one. Without it, the built-in table
(``_1p`` … ``_5p`` → configurations A … E, in :data:`bids_postop.configurations.CONFIGURATIONS` order) is used.
The card records which (``details["channel_order_source"]``: ``"pipeline.json"`` or ``"built-in table"``).
"""

from __future__ import annotations

import configparser
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bids_postop.configurations import CONFIGURATIONS, ConfigName, Role
from bids_postop.errors import ModelError
from bids_postop.segmentation.models import DEFAULT_THRESHOLD, ModelCard

LOG = logging.getLogger("bids_postop")

INI_NAME = "pre_processing.ini"
PIPELINE_NAME = "pipeline.json"
ONNX_NAME = "model.onnx"
INPUT_NAME = "input"
CROPPING_MODES = ("minimum", "brain_mask", "brain_clip")
NORMALIZATION_METHODS = ("default", "zeromean", "zeromean_nonzero")
CHANNEL_ORDERS = ("channels_last", "channels_first")
ACTIVATIONS = ("softmax", "sigmoid")
ENSEMBLING_STRATEGIES = ("average", "maximum")
RECONSTRUCTION_ORDERS = ("resample_first", "resample_second")
# pipeline.json sequence names → our modality suffix
PIPELINE_SEQUENCES = {"T1-CE": "t1ce", "T1-w": "t1", "FLAIR": "flair"}
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
    intensity_clipping_values: tuple[float, ...] | None = None  # (low, high); used when the range is 0-100
    normalization_method: str | None = None  # None or one of NORMALIZATION_METHODS
    new_axial_size: tuple[int, ...] | None = None  # 3: full volume, 2: slab, None: patch-wise
    slicing_plane: str = "axial"
    swap_training_input: bool = False
    number_inputs: int = 1
    diffloader_pairs: tuple[tuple[int, int], ...] = ()  # extra channels |input_i - input_j|
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

    # raidionicsseg 1.5.2 crashes on "false" (its cropping returns None); here it means no cropping, as an
    # absent key does there
    cropping = get("PreProcessing", "background_cropping")
    cropping = None if cropping is None or cropping.lower() in ("false", "none") else cropping.lower()
    pairs_text = get("PreProcessing", "diffloader_pairs")
    try:
        pairs = tuple((int(a), int(b)) for a, b in (p.split(",") for p in pairs_text.split(";"))) if pairs_text \
            else ()
    except ValueError as exc:
        raise ModelError(f"{path}: diffloader_pairs = {pairs_text!r} is not 'i, j; k, l; ...'") from exc
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
        intensity_clipping_values=_numbers(get("PreProcessing", "intensity_clipping_values"), float, path,
                                           "intensity_clipping_values"),
        normalization_method=_choice(normalization, NORMALIZATION_METHODS, path, "normalization_method"),
        new_axial_size=_numbers(get("PreProcessing", "new_axial_size"), int, path, "new_axial_size", (2, 3)),
        slicing_plane=(get("PreProcessing", "slicing_plane") or "axial").lower(),
        swap_training_input=flag("PreProcessing", "swap_training_input", False),
        number_inputs=int(get("PreProcessing", "number_inputs") or 1),
        diffloader_pairs=pairs,
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
    if config.mode == "slab" and (config.slicing_plane != "axial" or not config.slab_size):
        raise ModelError(f"{path}: slab models need slicing_plane = axial and [Training] slab_size "
                         f"(got {config.slicing_plane!r}, {config.slab_size!r})")
    if config.mode == "patch" and config.patch_size is None:
        raise ModelError(f"{path}: no new_axial_size (patch-wise model) but no [Training] patch_size either")
    if config.patch_size and config.patch_offset and any(
            o >= p or o < 0 for o, p in zip(config.patch_offset, config.patch_size, strict=True)):
        raise ModelError(f"{path}: patch_offset {config.patch_offset} must be in [0, patch_size {config.patch_size})")
    for pair in config.diffloader_pairs:
        if not all(0 <= i < config.number_inputs for i in pair):
            raise ModelError(f"{path}: diffloader_pairs {pair} must index the {config.number_inputs} inputs")


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


@dataclass(frozen=True)
class RuntimeOptions:
    """What raidionicsseg reads from its run configuration (``[Runtime]`` of its config.ini), not from the model.

    ``folds_ensembling`` false: only the first fold model runs (raidionicsseg's default, and the Raidionics
    application's); true: every fold, fused by ``ensembling_strategy`` (``average`` or ``maximum``).
    ``overlapping_ratio`` (None: the ini's ``patch_offset``, else no overlap) sets the patch offset to
    ``int(ratio × patch_size)`` and the slab step to ``int(slab_size − ratio × slab_size)``.
    ``reconstruction_order`` ``resample_first``: probabilities are mapped to the scan's grid, then thresholded
    (what the Raidionics application writes); ``resample_second``: thresholded on the network grid, then mapped
    with nearest-neighbour interpolation (the probability map is then that 0/1 mask).
    """

    folds_ensembling: bool = False
    ensembling_strategy: str = "average"
    overlapping_ratio: float | None = None
    reconstruction_order: str = "resample_first"

    def as_dict(self) -> dict[str, Any]:
        return {"folds_ensembling": self.folds_ensembling, "ensembling_strategy": self.ensembling_strategy,
                "overlapping_ratio": self.overlapping_ratio, "reconstruction_order": self.reconstruction_order}


# Models trained by bids_postop-train average their folds unless their card says otherwise.
PROJECT_RUNTIME = RuntimeOptions(folds_ensembling=True)


def runtime_options(details: Mapping[str, Any], *, default: RuntimeOptions = PROJECT_RUNTIME,
                    where: str = "model card") -> RuntimeOptions:
    """The card's ``runtime`` mapping (keys of :class:`RuntimeOptions`) over ``default``, checked."""
    given = details.get("runtime") or {}
    if not isinstance(given, Mapping):
        raise ModelError(f"{where}: 'runtime' must be a mapping of {list(RuntimeOptions().as_dict())}")
    unknown = set(given) - set(RuntimeOptions().as_dict())
    if unknown:
        raise ModelError(f"{where}: unknown runtime option(s) {sorted(unknown)}; allowed: "
                         f"{list(RuntimeOptions().as_dict())}")
    values = {**default.as_dict(), **given}
    if values["ensembling_strategy"] not in ENSEMBLING_STRATEGIES:
        raise ModelError(f"{where}: runtime ensembling_strategy {values['ensembling_strategy']!r} is not one of "
                         f"{list(ENSEMBLING_STRATEGIES)}")
    if values["reconstruction_order"] not in RECONSTRUCTION_ORDERS:
        raise ModelError(f"{where}: runtime reconstruction_order {values['reconstruction_order']!r} is not one of "
                         f"{list(RECONSTRUCTION_ORDERS)}")
    ratio = values["overlapping_ratio"]
    if ratio is not None and not (isinstance(ratio, int | float) and 0 <= ratio < 1):
        raise ModelError(f"{where}: runtime overlapping_ratio {ratio!r} must be null or in [0, 1)")
    return RuntimeOptions(folds_ensembling=bool(values["folds_ensembling"]),
                          ensembling_strategy=str(values["ensembling_strategy"]),
                          overlapping_ratio=None if ratio is None else float(ratio),
                          reconstruction_order=str(values["reconstruction_order"]))


def pipeline_channel_order(folder: str | Path, model_name: str | None = None) -> tuple[Role, ...] | None:
    """The network's input roles, in order, from the package's ``pipeline.json``; ``None`` when it has none.

    The step used is the ``Segmentation`` step whose ``model`` is ``model_name`` (default: the folder's name), else
    the last ``Segmentation`` step that does not segment the brain. Raises :class:`ModelError` naming the file and
    the input that no role matches.
    """
    path = Path(folder) / PIPELINE_NAME
    if not path.is_file():
        return None
    try:
        steps = json.loads(path.read_text())
        candidates = [v for _, v in sorted(steps.items(), key=lambda kv: int(kv[0]))
                      if isinstance(v, Mapping) and v.get("task") == "Segmentation"]
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}: cannot read the Raidionics pipeline ({exc})") from exc
    name = model_name or Path(folder).name
    mine = [v for v in candidates if v.get("model") == name] or \
        [v for v in candidates if [str(t).lower() for t in v.get("target", [])] != ["brain"]]
    if not mine:
        raise ModelError(f"{path}: no Segmentation step for model {name} (a step with \"task\": \"Segmentation\" "
                         f"and \"model\": \"{name}\")")
    inputs = mine[-1].get("inputs") or {}
    try:
        ordered = [inputs[str(i)] for i in range(len(inputs))]
    except KeyError as exc:
        raise ModelError(f"{path}: the Segmentation step's inputs must be numbered \"0\" … \"{len(inputs) - 1}\"") \
            from exc
    if not ordered:
        raise ModelError(f"{path}: the Segmentation step for {name} lists no inputs")
    postop_time = ordered[0].get("timestamp")
    roles: list[Role] = []
    for index, item in enumerate(ordered):
        sequence = PIPELINE_SEQUENCES.get(str(item.get("sequence")))
        session = "postop" if item.get("timestamp") == postop_time else "preop"
        if item.get("labels"):
            role = "preop_mask" if session == "preop" and str(item["labels"]).lower() == "tumor" else None
        else:
            role = f"{session}_{sequence}" if sequence else None
        if role not in ("postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask"):
            raise ModelError(f"{path}: input \"{index}\" ({item.get('sequence')}, timestamp {item.get('timestamp')}, "
                             f"labels {item.get('labels')}) is none of the scans bids_postop provides (post-op "
                             f"T1-CE/T1-w/FLAIR, pre-op T1-CE and its tumour mask)")
        roles.append(role)  # type: ignore[arg-type]
    if roles[0] != "postop_t1ce" or len(set(roles)) != len(roles):
        raise ModelError(f"{path}: the inputs {roles} must start with the post-operative T1-CE and name each scan once")
    return tuple(roles)


def configuration_of(roles: tuple[Role, ...], where: str) -> ConfigName:
    """The configuration (A … E) made of exactly these roles, in any order."""
    for name, config_roles in CONFIGURATIONS.items():
        if set(config_roles) == set(roles):
            return name
    raise ModelError(f"{where}: the inputs {list(roles)} match no configuration "
                     f"({', '.join(f'{k}: {list(v)}' for k, v in CONFIGURATIONS.items())})")


def network_channel_order(card: ModelCard) -> tuple[tuple[Role, ...], str]:
    """The roles in the network's input order and where that order comes from.

    A ``pipeline.json`` in the model folder wins; else the card's ``channel_order`` (with its
    ``channel_order_source``); else the card's channels (``"model card"``).
    """
    folder = (card.folder / str(card.details.get("model_folder", "."))).resolve()
    order = pipeline_channel_order(folder)
    if order is not None:
        source = "pipeline.json"
    elif card.details.get("channel_order"):
        order = tuple(card.details["channel_order"])
        source = str(card.details.get("channel_order_source", "model card"))
    else:
        order, source = tuple(card.channels), "model card"
    if sorted(order) != sorted(card.channels):
        raise ModelError(f"{folder}: the network's inputs {list(order)} ({source}) are not the card's channels "
                         f"{list(card.channels)}")
    return order, source


def card_for_raidionics_folder(folder: str | Path) -> ModelCard:
    """A model card for a Raidionics post-operative model folder that has no ``bids_postop_model.json``.

    The channel order comes from the package's ``pipeline.json`` when present, else from the folder name
    (``MRI_GBM_Postop_FV_1p`` … ``_5p`` → configurations A … E); the threshold is the tumour class's
    ``optimal_thresholds`` (0.5, with a warning, when the file has none). The card asks for what the official
    pipeline feeds such a model (``details["input_images"] = "registered"``: the registered scans, not
    skull-stripped) and raidionicsseg's runtime defaults (first fold only, ``details["runtime"]``).
    """
    folder = Path(folder).expanduser().resolve()
    config = read_preprocessing_ini(folder)
    match = POSTOP_MODEL_PATTERN.search(folder.name)
    order = pipeline_channel_order(folder)
    if order is not None:
        configuration = configuration_of(order, str(folder / PIPELINE_NAME))
        if match is not None and POSTOP_CONFIGURATIONS[int(match.group(1))] != configuration:
            raise ModelError(f"{folder}: {PIPELINE_NAME} lists the inputs of configuration {configuration} "
                             f"({', '.join(order)}), the folder name {match.group(0)} those of "
                             f"{POSTOP_CONFIGURATIONS[int(match.group(1))]}")
        source = "pipeline.json"
    elif match is None:
        raise ModelError(f"{folder}: not one of the published post-operative models (folder name should contain "
                         f"MRI_GBM_Postop_FV_1p … _5p, or the folder should hold a {PIPELINE_NAME}); write a "
                         f"bids_postop_model.json with architecture 'raidionics' to use another Raidionics model")
    else:
        configuration = POSTOP_CONFIGURATIONS[int(match.group(1))]
        order, source = CONFIGURATIONS[configuration], "built-in table"
    channels = CONFIGURATIONS[configuration]
    if config.number_inputs != len(channels):
        raise ModelError(f"{folder}: {INI_NAME} says number_inputs = {config.number_inputs}, but "
                         f"the model takes {len(channels)} channels ({', '.join(order)}; {source})")
    model_files(folder)  # fail now, not at the first participant
    threshold = class_threshold(config)
    if threshold is None:
        LOG.warning("%s: no optimal_thresholds in %s; using %.2f", folder, INI_NAME, DEFAULT_THRESHOLD)
        threshold = DEFAULT_THRESHOLD
    if not 0 < threshold < 1:
        raise ModelError(f"{folder}: optimal threshold {threshold} is not in (0, 1)")
    return ModelCard(
        folder=folder, name=match.group(0) if match else folder.name, architecture="raidionics",
        configuration=configuration, channels=channels, threshold=threshold,
        intended_use=("Raidionics AGU-Net model for residual glioblastoma on early post-operative MRI "
                      "(Helland, Bouget et al., Sci Rep 2023)"),
        details={"model_folder": ".", "foreground_class": config.foreground_class, "channel_order": list(order),
                 "channel_order_source": source, "input_images": "registered",
                 "runtime": RuntimeOptions().as_dict()},
        raw={})
