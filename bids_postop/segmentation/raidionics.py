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

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from bids_postop.core.images import load_3d, same_grid
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation.models import ModelCard
from bids_postop.segmentation.raidionics_model import (
    INI_NAME,
    INPUT_NAME,
    NORMALIZATION_METHODS,
    RaidionicsConfig,
    model_files,
    read_preprocessing_ini,
)

LOG = logging.getLogger("bids_postop")

Bbox = tuple[int, int, int, int, int, int]  # (x0, y0, z0, x1, y1, z1), end exclusive


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
