"""Raidionics backend: runs the study's published AGU-Net models (ONNX) with onnxruntime.

A *Raidionics model folder* holds ``pre_processing.ini`` and either ``model.onnx`` or one sub-folder per
fold, each with a ``model.onnx`` (fold probability maps are averaged). The network's input tensor is named
``input``. What is done, in this order, mirrors the Raidionics segmentation back-end (raidionics_seg_lib):

1. every channel is resampled by nibabel to ``output_spacing`` (``nibabel.processing.resample_to_output``:
   the result is axis-aligned in RAS+ world space, order 1 for images, 0 for label channels);
2. background cropping: ``minimum`` keeps the bounding box of the first channel's voxels at or above
   ``int(0.2 × (max − min))``; ``brain_clip`` keeps the bounding box of the brain mask's largest
   connected component; ``brain_mask`` does the same and also zeroes voxels outside the mask. The same box
   is applied to every channel;
3. resizing: ``new_axial_size`` with 3 values resizes the whole box (full-volume mode); 2 values resize
   x, y to them and z by the y ratio (slab mode, non-overlapping axial slabs of ``slab_size``); no
   ``new_axial_size`` means patch-wise inference (``patch_size`` windows stepping by
   ``patch_size − patch_offset``, overlaps fused by maximum). Resizing is ``skimage.transform.resize``
   with its defaults (order 1, Gaussian anti-aliasing when shrinking), reimplemented with scipy;
4. image channels (not label channels): negative values set to 0, percentile clipping
   (``intensity_clipping_range``), then normalisation (``default`` = min-max, ``zeromean``,
   ``zeromean_nonzero``);
5. the channels are stacked last (``channels_last``, Raidionics' default) or first; the network's first
   output (the full-resolution one for deep-supervision models) goes through softmax/sigmoid when
   ``activation_layer_included`` is false.

Probabilities are mapped back by the geometric inverse of steps 1–3 (linear interpolation): resized back
to the box, put into the resampled grid (0 outside the box), resampled onto the first channel's grid
(exactly its shape and affine). The caller thresholds them (``optimal_thresholds``, see
:func:`class_threshold`). Raidionics itself resizes back with ``scipy.ndimage.zoom`` in corner-aligned
mode; the centre-aligned mapping used here is the exact inverse of the forward resize (they differ by
less than 0.15 voxel of the network grid).

Not supported (a clear :class:`ModelError` is raised): CT models, ``swap_training_input``, slab models
sliced other than axially.
"""

from __future__ import annotations

import configparser
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from bids_postop.configurations import CONFIGURATIONS, ConfigName
from bids_postop.core.images import load_3d, same_grid, write_like
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation.models import DEFAULT_THRESHOLD, ModelCard
from bids_postop.settings import DEFAULT_BRAIN_MODEL

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

Bbox = tuple[int, int, int, int, int, int]  # (x0, y0, z0, x1, y1, z1), end exclusive
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


# ------------------------------------------------------------------------------------------------
# Pre-processing steps: small pure functions on arrays (x, y, z) in the resampled RAS+ grid


def resampled_grid(shape: Sequence[int], affine: np.ndarray,
                   spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of ``nibabel.processing.resample_to_output`` for an image (RAS+, axis-aligned)."""
    from nibabel.spaces import vox2out_vox

    out_shape, out_affine = vox2out_vox((tuple(shape[:3]), affine), tuple(float(s) for s in spacing))
    return (int(out_shape[0]), int(out_shape[1]), int(out_shape[2])), out_affine


def resample_array(data: np.ndarray, affine: np.ndarray, grid: tuple[tuple[int, int, int], np.ndarray], *,
                   order: int) -> np.ndarray:
    """Resample ``data`` (voxel order of ``affine``) onto ``grid`` (shape, affine); 0 outside the image."""
    from nibabel.processing import resample_from_to

    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    return np.asarray(resample_from_to(image, grid, order=order, mode="constant", cval=0.0).dataobj,
                      dtype=np.float32)


def head_bbox(volume: np.ndarray) -> Bbox:
    """Raidionics' ``minimum`` cropping box: voxels ≥ ``int(0.2 × (max − min))`` (its threshold, as is)."""
    limit = int((float(volume.max()) - float(volume.min())) * 0.2)
    box = _bbox(volume >= limit)
    if box is None:
        raise InputDataError("the image is empty (no voxel above the background threshold)")
    return box


def brain_bbox(mask: np.ndarray) -> tuple[Bbox, np.ndarray]:
    """Box of the largest connected component (6-connectivity) of a brain mask, and the mask inside it."""
    labels, count = ndi.label(mask > 0)
    if count == 0:
        raise InputDataError("the brain mask is empty")
    sizes = np.bincount(labels.ravel())[1:]
    box = _bbox(labels == int(np.argmax(sizes)) + 1)
    assert box is not None  # a component of positive size has a box
    inside = np.zeros(mask.shape, dtype=bool)
    inside[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = True
    return box, (mask > 0) & inside


def _bbox(mask: np.ndarray) -> Bbox | None:
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]


def crop(volume: np.ndarray, box: Bbox) -> np.ndarray:
    return volume[box[0]:box[3], box[1]:box[4], box[2]:box[5]]


def resize_volume(volume: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """``skimage.transform.resize(volume, shape, order=order)`` with its defaults, for float input.

    Gaussian anti-aliasing (sigma = max(0, (factor − 1) / 2) per axis) when shrinking along any axis,
    centre-aligned interpolation with mirrored edges, output clipped to the input's range. float32 out.
    """
    volume = np.asarray(volume, dtype=np.float32)
    shape = tuple(int(s) for s in shape)
    if volume.shape == shape:
        return volume.copy()
    factors = np.divide(volume.shape, shape)
    filtered = volume
    if np.any(factors > 1):
        filtered = ndi.gaussian_filter(volume, np.maximum(0.0, (factors - 1) / 2), mode="mirror")
    out = ndi.zoom(filtered, 1 / factors, order=order, mode="mirror", grid_mode=True)
    return np.clip(out, volume.min(), volume.max()).astype(np.float32)


def slab_shape(shape: Sequence[int], axial_size: Sequence[int]) -> tuple[int, int, int]:
    """Raidionics' slab-mode resize target: x, y to ``axial_size``, z scaled by the y ratio."""
    return int(axial_size[0]), int(axial_size[1]), int(shape[2] * (axial_size[1] / shape[1]))


def resize_back(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`resize_volume` for probabilities: linear, centre-aligned, edges repeated."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape == tuple(shape):
        return volume
    return ndi.zoom(volume, np.divide(shape, volume.shape), order=1, mode="nearest", grid_mode=True)


def clip_intensities(volume: np.ndarray, percentiles: Sequence[float] = (0.0, 100.0)) -> np.ndarray:
    """MRI intensity clipping as Raidionics: negatives to 0, then clip to the given percentiles of the volume."""
    result = np.maximum(volume, 0).astype(np.float32)
    if percentiles[1] - percentiles[0] != 100:
        low, high = np.percentile(volume, list(percentiles))
        result = np.clip(result, low, high).astype(np.float32)
    return result


def normalize_intensities(volume: np.ndarray, method: str | None) -> np.ndarray:
    """``default`` = min-max to [0, 1]; ``zeromean`` = z-score; ``zeromean_nonzero`` = z-score of nonzero voxels
    (sample std), zeros kept; ``None`` = unchanged."""
    result = np.asarray(volume, dtype=np.float32).copy()
    if method == "default":
        low, high = float(result.min()), float(result.max())
        if high != low:
            result = (result - low) / (high - low)
    elif method == "zeromean":
        std = float(result.std())
        result = (result - float(result.mean())) / (std if std else 1.0)
    elif method == "zeromean_nonzero":
        nonzero = result != 0
        if nonzero.sum() > 1:
            values = result[nonzero]
            std = float(values.std(ddof=1))
            result[nonzero] = (values - float(values.mean())) / (std if std else 1.0)
    elif method is not None:
        raise ValueError(f"normalization method must be one of {NORMALIZATION_METHODS} or None; got {method!r}")
    return result.astype(np.float32)


def patch_starts(size: int, patch: int, offset: int) -> list[int]:
    """Window starts along one axis: every ``patch − offset`` voxels, the last window flush with the end."""
    if size <= patch:
        return [0]
    step = patch - offset
    starts = list(range(0, size - patch, step))
    return [*starts, size - patch]


def apply_activation(logits: np.ndarray, kind: str) -> np.ndarray:
    """Softmax over the last axis, or elementwise sigmoid."""
    if kind == "sigmoid":
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Prepared:
    """Network input (x, y, z, C) and the geometry needed to map outputs back."""

    data: np.ndarray
    grid: tuple[tuple[int, int, int], np.ndarray]  # resampled shape and affine (RAS+)
    box: Bbox
    reference_shape: tuple[int, int, int]
    reference_affine: np.ndarray


def preprocess(arrays: Sequence[np.ndarray], affine: np.ndarray, config: RaidionicsConfig, *,
               label_channels: Sequence[bool] | None = None, brain_mask: np.ndarray | None = None) -> Prepared:
    """Raidionics pre-processing of channels that share one grid (``affine``; any voxel order).

    ``label_channels`` marks channels that are label maps (nearest neighbour, no intensity steps).
    ``brain_mask`` (same grid) is needed for ``brain_mask`` / ``brain_clip`` cropping.
    """
    labels = list(label_channels) if label_channels is not None else [False] * len(arrays)
    shape = arrays[0].shape[:3]
    spacing = config.output_spacing or (float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).min()),) * 3
    grid = resampled_grid(shape, affine, spacing)
    resampled = [resample_array(a, affine, grid, order=0 if lab else 1) for a, lab in zip(arrays, labels,
                                                                                          strict=True)]
    inside = None
    if config.background_cropping == "minimum":
        box = head_bbox(resampled[0])
    elif config.background_cropping in ("brain_mask", "brain_clip"):
        if brain_mask is None:
            raise ModelError(f"the model crops to the brain (background_cropping = {config.background_cropping}); "
                             "give the brain mask of the first channel (brain_mask=...)")
        box, inside = brain_bbox(resample_array(brain_mask, affine, grid, order=0) > 0.5)
    else:
        box = (0, 0, 0, *grid[0])
    channels = []
    for volume, lab in zip(resampled, labels, strict=True):
        if inside is not None and config.background_cropping == "brain_mask":
            volume = np.where(inside, volume, 0).astype(np.float32)
        volume = crop(volume, box)
        if config.mode == "full":
            volume = resize_volume(volume, config.new_axial_size or (), order=0 if lab else 1)
        elif config.mode == "slab":
            volume = resize_volume(volume, slab_shape(volume.shape, config.new_axial_size or ()),
                                   order=0 if lab else 1)
        if not lab:
            volume = normalize_intensities(clip_intensities(volume, config.intensity_clipping_range),
                                           config.normalization_method)
        channels.append(volume)
    return Prepared(data=np.stack(channels, axis=-1).astype(np.float32), grid=grid, box=box,
                    reference_shape=(int(shape[0]), int(shape[1]), int(shape[2])), reference_affine=affine)


def to_reference_grid(probability: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Map one class's probability (network grid) back onto the reference grid; float32 in [0, 1]."""
    box = prepared.box
    boxed = resize_back(probability, (box[3] - box[0], box[4] - box[1], box[5] - box[2]))
    full = np.zeros(prepared.grid[0], dtype=np.float32)
    full[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = boxed
    back = resample_array(full, prepared.grid[1], (prepared.reference_shape, prepared.reference_affine), order=1)
    return np.clip(back, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Inference


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        return _providers(device)
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device[5:]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        LOG.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on the CPU")
        return ["CPUExecutionProvider"]
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


@lru_cache(maxsize=12)
def _session(path: str, device: str, threads: int) -> Any:
    """One onnxruntime session per model file, device and thread count, kept for the whole process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, sess_options=options, providers=_providers(device))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{path}: onnxruntime cannot load the model ({exc})") from exc


def _forward(session: Any, block: np.ndarray, config: RaidionicsConfig) -> np.ndarray:
    """Run one (x, y, z, C) block; returns raw outputs (x, y, z, classes)."""
    names = [i.name for i in session.get_inputs()]
    name = INPUT_NAME if INPUT_NAME in names else names[0]
    batch = block[None]
    if config.channels_order == "channels_first":
        batch = np.moveaxis(batch, -1, 1)
    output = np.asarray(session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0])
    if output.ndim == 5:
        output = output[0]
    if config.channels_order == "channels_first":
        output = np.moveaxis(output, 0, -1)
    if output.shape[:3] != block.shape[:3]:
        raise ModelError(f"the model returned shape {output.shape} for an input block of shape {block.shape} "
                         f"({config.channels_order}); check channels_order in {INI_NAME}")
    return output.astype(np.float32)


def _predict_slabs(session: Any, data: np.ndarray, config: RaidionicsConfig) -> np.ndarray:
    slab = int(config.slab_size or 1)
    depth = data.shape[2]
    pad = (-depth) % slab
    padded = np.pad(data, ((0, 0), (0, 0), (0, pad), (0, 0)), mode="edge") if pad else data
    parts = [_forward(session, padded[:, :, start:start + slab], config) for start in range(0, depth + pad, slab)]
    return np.concatenate(parts, axis=2)[:, :, :depth]


def _predict_patches(session: Any, data: np.ndarray, config: RaidionicsConfig) -> np.ndarray:
    patch = config.patch_size or (0, 0, 0)
    offset = config.patch_offset or tuple(p // 2 for p in patch)
    # pad both ends (edge values) where the volume is not larger than the patch, as Raidionics
    pads = [((p - s + 1) // 2,) * 2 if s <= p else (0, 0) for s, p in zip(data.shape[:3], patch, strict=True)]
    padded = np.pad(data, [*pads, (0, 0)], mode="edge")
    result: np.ndarray | None = None
    for x in patch_starts(padded.shape[0], patch[0], offset[0]):
        for y in patch_starts(padded.shape[1], patch[1], offset[1]):
            for z in patch_starts(padded.shape[2], patch[2], offset[2]):
                window = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                out = _forward(session, padded[window], config)
                if result is None:
                    result = np.full(padded.shape[:3] + (out.shape[-1],), -np.inf, dtype=np.float32)
                result[window] = np.maximum(result[window], out)  # Raidionics fuses overlaps by maximum
    assert result is not None
    return result[pads[0][0]:padded.shape[0] - pads[0][1], pads[1][0]:padded.shape[1] - pads[1][1],
                  pads[2][0]:padded.shape[2] - pads[2][1]]


def run_folds(model_paths: Sequence[Path], data: np.ndarray, config: RaidionicsConfig, *, device: str = "cpu",
              threads: int = 1) -> np.ndarray:
    """Class probabilities (x, y, z, classes) on the network grid, averaged over the fold models."""
    total: np.ndarray | None = None
    for path in model_paths:
        session = _session(str(path), device, int(threads))
        if config.mode == "full":
            out = _forward(session, data, config)
        elif config.mode == "slab":
            out = _predict_slabs(session, data, config)
        else:
            out = _predict_patches(session, data, config)
        if not config.activation_layer_included:
            out = apply_activation(out, config.activation_layer_type)
        total = out if total is None else total + out
    assert total is not None
    return (total / len(model_paths)).astype(np.float32)


def _model_folder(card: ModelCard) -> Path:
    return (card.folder / str(card.details.get("model_folder", "."))).resolve()


def _load_channels(channel_files: Sequence[str | Path], what: Sequence[str]) -> list[nib.Nifti1Image]:
    images = [load_3d(f, what=f"{w} channel") for f, w in zip(channel_files, what, strict=True)]
    for img, path in zip(images[1:], channel_files[1:], strict=True):
        if not same_grid(images[0], img):
            raise InputDataError(f"channel is not on the grid of {channel_files[0]}; register it first", path)
    return images


def _load_mask(brain_mask: str | Path | None, reference: nib.Nifti1Image, reference_path: str | Path) -> Any:
    if brain_mask is None:
        return None
    mask = load_3d(brain_mask, what="brain mask")
    if not same_grid(reference, mask):
        raise InputDataError(f"the brain mask is not on the grid of {reference_path}; resample it first", brain_mask)
    return np.asarray(mask.dataobj) > 0


def predict_probability(card: ModelCard, channel_files: Sequence[str | Path], *, brain_mask: Path | None = None,
                        device: str = "cpu", threads: int = 1, max_folds: int | None = None,
                        report: dict[str, Any] | None = None) -> np.ndarray:
    """Residual-tumour probability, float32, exactly on the first channel's grid (its shape and voxel order).

    ``channel_files`` are NIfTI files in the order of ``card.channels``, all on one grid (the post-op T1w-CE
    grid, after registration). ``brain_mask`` (same grid) is required by models that crop to the brain.
    Channels whose role is ``preop_mask`` are treated as label maps. Fold models are averaged (only the first
    ``max_folds`` when given: ``--fast``). ``report`` (a dict) receives the model files run.
    """
    if len(channel_files) != len(card.channels):
        raise ModelError(f"model {card.name} takes {len(card.channels)} channels ({', '.join(card.channels)}); "
                         f"got {len(channel_files)} files")
    folder = _model_folder(card)
    config = read_preprocessing_ini(folder)
    if config.number_inputs != len(card.channels):
        raise ModelError(f"{folder}: {INI_NAME} says number_inputs = {config.number_inputs}, the model card lists "
                         f"{len(card.channels)} channels")
    paths = model_files(folder)[:max_folds] if max_folds else model_files(folder)
    if report is not None:
        report.update(backend="raidionics", model_files=[str(p) for p in paths], n_networks=len(paths),
                      use_mirroring=False)
    images = _load_channels(channel_files, card.channels)
    mask = _load_mask(brain_mask, images[0], channel_files[0])
    arrays = [img.get_fdata(dtype=np.float32) for img in images]
    prepared = preprocess(arrays, images[0].affine, config,
                          label_channels=[role == "preop_mask" for role in card.channels], brain_mask=mask)
    probabilities = run_folds(paths, prepared.data, config, device=device, threads=threads)
    foreground = int(card.details.get("foreground_class", config.foreground_class))
    return to_reference_grid(probabilities[..., foreground], prepared)


BRAIN_MODEL = DEFAULT_BRAIN_MODEL  # the published Raidionics brain model (bids_postop-models fetch MRI_Brain)


def resolve_brain_model(spec: str | Path = BRAIN_MODEL) -> Path:
    """The folder of a Raidionics brain model given by ``--brain-model``: a folder path, or the name of a model
    installed with ``bids_postop-models fetch`` (default :data:`BRAIN_MODEL`).

    Checks now what :func:`extract_brain_raidionics` needs (``pre_processing.ini`` readable, one input, no
    brain cropping, a ``model.onnx``), so that a wrong model fails before any participant runs. Raises
    :class:`ModelError` naming the folder and the command that installs the model.
    """
    text = str(spec)
    path = Path(text).expanduser()
    fetch_hint = (f"install the published brain model with `bids_postop-models fetch {BRAIN_MODEL}` (or "
                  f"`bids_postop-models import Raidionics-{BRAIN_MODEL}-ONNX-v12.zip` offline) and pass "
                  f"--brain-model {BRAIN_MODEL}, or give the folder holding {INI_NAME} and {ONNX_NAME}")
    if path.is_dir():
        folder = path.resolve()
    elif "/" in text or text.startswith("."):
        raise ModelError(f"{path}: brain model folder not found; {fetch_hint}")
    else:
        from bids_postop.models import resolve_installed

        try:
            folder = resolve_installed(text)
        except ModelError as exc:
            raise ModelError(f"--brain-model {text}: {exc}" + ("" if text == BRAIN_MODEL else f"; or {fetch_hint}")
                             ) from exc
    if not (folder / INI_NAME).is_file():
        raise ModelError(f"{folder}: not a Raidionics model folder (no {INI_NAME}); {fetch_hint}")
    _brain_model_config(folder)
    model_files(folder)
    return folder


def _brain_model_config(folder: Path) -> RaidionicsConfig:
    """``folder``'s pre-processing, refused unless it suits a brain model (one input, no brain cropping)."""
    config = read_preprocessing_ini(folder)
    if config.number_inputs != 1:
        raise ModelError(f"{folder}: a brain model takes one input; {INI_NAME} says {config.number_inputs}")
    if config.background_cropping in ("brain_mask", "brain_clip"):
        raise ModelError(f"{folder}: a brain model cannot crop to the brain (background_cropping = "
                         f"{config.background_cropping})")
    return config


def brain_model_provenance(folder: str | Path) -> dict[str, Any]:
    """What the sidecars and the report say about a Raidionics brain model: name, folder, files' md5, record."""
    from bids_postop.models.registry import file_md5, read_install_record

    folder = Path(folder)
    record = read_install_record(folder)
    return {"method": "raidionics", "model": folder.name, "folder": str(folder),
            "onnx_md5": {str(p.relative_to(folder)): file_md5(p) for p in model_files(folder)},
            **({"installed_from": record} if record else {})}


def extract_brain_raidionics(image: str | Path, *, model_folder: str | Path, out_mask: str | Path,
                             device: str = "cpu", threads: int = 1) -> Path:
    """Brain mask with the Raidionics ``MRI_Brain`` model (an alternative to :mod:`bids_postop.core.brain`).

    The probability is thresholded at the model's ``optimal_thresholds`` (≥, 0.5 when absent) and reduced to
    its largest connected component. Returns ``out_mask``: uint8 0/1, shape ``image.shape[:3]``, written with
    the image's affine and sform/qform codes. Raises :class:`InputDataError` when no brain is found.
    """
    model_folder = Path(model_folder).expanduser().resolve()
    config = _brain_model_config(model_folder)
    img = load_3d(image, what="image for brain extraction")
    prepared = preprocess([img.get_fdata(dtype=np.float32)], img.affine, config)
    probabilities = run_folds(model_files(model_folder), prepared.data, config, device=device, threads=threads)
    probability = to_reference_grid(probabilities[..., config.foreground_class], prepared)
    threshold = class_threshold(config)
    mask = probability >= (DEFAULT_THRESHOLD if threshold is None else threshold)
    labels, count = ndi.label(mask)
    if count == 0:
        raise InputDataError(f"the Raidionics brain model ({model_folder.name}) found no brain in the image", image)
    mask = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    out_mask = Path(out_mask)
    out_mask.parent.mkdir(parents=True, exist_ok=True)
    return write_like(mask.astype(np.uint8), img, out_mask, dtype=np.uint8)
