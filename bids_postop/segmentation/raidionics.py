"""Raidionics backend: runs Raidionics-format models (the study's published AGU-Net models, ONNX) with onnxruntime
and gives the result of the official inference library, **raidionicsseg 1.5.2** (PyPI; BSD-2-Clause, SINTEF
Digital). The steps below follow that library's source (``PreProcessing/``, ``Inference/``, ``Utils/``), read
and re-implemented here rather than called: calling it would bring its pins (``SimpleITK<=2.4.1``, aenum, h5py)
into the runtime, make it write every input to disk in its own layout, and inherit its crashes; matching it keeps
onnxruntime (and scikit-image, already there through nnU-Net) and is checked against it side by side on real
scans (``tests/test_raidionics_parity.py``).

A *Raidionics model folder* holds ``pre_processing.ini`` and one sub-folder per fold with a ``model.onnx`` (or
only a top-level ``model.onnx``). The network's input tensor is named ``input``. The inputs are files on one grid
(``input0`` is the scan segmented; here the post-op T1w-CE); per input, in raidionicsseg's order:

1. label or image, **by content** (its rule): a volume with more than 25 distinct values, or values above 255 or
   below −1, is an image; anything else (a tumour mask) is a label map (nearest-neighbour, no intensity steps);
2. background cropping **in the scan's own voxel grid**: ``minimum`` keeps the bounding box of input0's voxels at
   or above ``int(0.2 × (max − min))``; ``brain_clip`` the box of the brain mask's largest connected component;
   ``brain_mask`` the same box, with every voxel outside the mask (or outside that box) set to 0 first. One box
   for every input;
3. resampling of the cropped block to ``output_spacing`` (default: its smallest voxel size) with
   ``nibabel.processing.resample_to_output`` (RAS+ axis-aligned; order 1, 0 for labels; 0 outside);
4. resizing with ``skimage.transform.resize`` (its defaults: Gaussian anti-aliasing when shrinking, for labels
   too): ``new_axial_size`` with 3 values is the whole volume's shape (full-volume mode), 2 values set x, y and
   scale z by the y ratio (slab mode); none means patch-wise inference;
5. images only: negatives set to 0, then clipping to the ``intensity_clipping_range`` percentiles or, when that
   range is 0–100, to ``intensity_clipping_values``; then normalisation (``default`` min-max, ``zeromean``,
   ``zeromean_nonzero``), in float32;
6. ``diffloader_pairs`` add the channels ``|input_i − input_j|`` (after step 4, then step 5);
   ``swap_training_input`` transposes x and y.

Inference: channels last or first (``channels_order``). Full-volume mode runs the whole block; slab mode runs
axial slabs of ``slab_size`` (edge-padded at the end) stepping by ``int(slab_size − ratio × slab_size)``; patch
mode runs ``patch_size`` windows stepping by ``patch_size − offset`` (offset: ``int(ratio × patch_size)`` with a
runtime ``overlapping_ratio``, else the ini's ``patch_offset``, else 0), the last window flush with the end,
volumes smaller than a patch edge-padded at both ends. Overlaps are fused by maximum. The network's **first
output** is used. Without ``activation_layer_included`` the softmax/sigmoid is applied (per run in full-volume
mode, after fusion in patch and slab modes). Folds (runtime options, :class:`RuntimeOptions`): the first fold
only, unless ``folds_ensembling`` (then ``average`` or ``maximum`` of the folds' probabilities).

Back to the scan (raidionicsseg's reconstruction): the class probabilities are resized to the resampled block's
shape with ``scipy.ndimage.zoom(order=1)`` (its defaults: corner-aligned, constant 0 outside), resampled onto the
cropped block (``nibabel.processing.resample_from_to``, order 1, 0 outside) and put in place (0 outside the
box): exactly the first channel's shape and voxel order. ``reconstruction_order = resample_first`` (default):
the caller thresholds this probability (``optimal_thresholds``, :func:`class_threshold`); ``resample_second``:
thresholded on the network grid, then carried back with nearest-neighbour interpolation (a 0/1 map).

Where raidionicsseg 1.5.2 crashes, this backend does what the configuration evidently means (and says so):
``background_cropping = false`` (treated as no cropping, as an absent key is there); a full-volume TF model with
``deep_supervision = false`` (raidionicsseg only unwraps the output list for deep supervision or Torch models:
the first output is used here too); a slab-mode volume whose depth is not a multiple of ``slab_size`` (padded and
cropped back); a model folder with only a top-level ``model.onnx`` (raidionicsseg only lists files in
sub-folders). One deliberate difference: in slab mode raidionicsseg never applies the activation, so a model
without ``activation_layer_included`` gave logits there; here it gives probabilities. Not supported (a clear
:class:`ModelError`): CT models, slab models sliced other than axially, test-time augmentation.
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
from bids_postop.segmentation.backend import NO_MEMBERS, Members, Prediction
from bids_postop.segmentation.models import ModelCard
from bids_postop.segmentation.raidionics_model import (
    INI_NAME,
    INPUT_NAME,
    NORMALIZATION_METHODS,
    PROJECT_RUNTIME,
    RaidionicsConfig,
    RuntimeOptions,
    model_files,
    network_channel_order,
    read_preprocessing_ini,
    runtime_options,
)

LOG = logging.getLogger("bids_postop")

OFFICIAL_LIBRARY = "raidionicsseg 1.5.2"  # the library whose result this backend gives (see the module docstring)
Bbox = tuple[int, int, int, int, int, int]  # (x0, y0, z0, x1, y1, z1), end exclusive
Grid = tuple[tuple[int, int, int], np.ndarray]  # shape and affine

__all__ = ["OFFICIAL_LIBRARY", "Prepared", "fuse_folds", "predict", "predict_probability", "preprocess",
           "read_preprocessing_ini", "run_folds", "to_network_grid", "to_reference_grid"]


# ------------------------------------------------------------------------------------------------
# Pre-processing steps: small pure functions on arrays (x, y, z)


def is_label_volume(volume: np.ndarray) -> bool:
    """raidionicsseg's rule: a label map has at most 25 distinct values, all within [−1, 255]."""
    volume = np.asarray(volume)
    if volume.max() > 255 or volume.min() < -1:
        return False
    return len(np.unique(volume)) <= 25


def head_bbox(volume: np.ndarray) -> Bbox:
    """The ``minimum`` cropping box: voxels ≥ ``int(0.2 × (max − min))`` (raidionicsseg's threshold, as is)."""
    limit = int((float(volume.max()) - float(volume.min())) * 0.2)
    box = _bbox(volume >= limit)
    if box is None:
        raise InputDataError("the image is empty (no voxel above the background threshold)")
    return box


def brain_bbox(mask: np.ndarray) -> tuple[Bbox, np.ndarray]:
    """Box of the largest connected component (6-connectivity) of a brain mask, and the mask inside that box."""
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


def crop(volume: np.ndarray, box: Bbox | None) -> np.ndarray:
    return volume if box is None else volume[box[0]:box[3], box[1]:box[4], box[2]:box[5]]


def default_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """raidionicsseg's spacing without ``output_spacing``: the smallest voxel size (as the NIfTI header stores it)."""
    smallest = float(np.float32(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))).min())
    return smallest, smallest, smallest


def resampled_grid(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> Grid:
    """Shape and affine of ``nibabel.processing.resample_to_output`` for an image (RAS+, axis-aligned)."""
    from nibabel.spaces import vox2out_vox

    out_shape, out_affine = vox2out_vox((tuple(shape[:3]), affine), tuple(float(s) for s in spacing))
    return (int(out_shape[0]), int(out_shape[1]), int(out_shape[2])), out_affine


def resample_array(data: np.ndarray, affine: np.ndarray, grid: Grid, *, order: int) -> np.ndarray:
    """Resample ``data`` (voxel order of ``affine``) onto ``grid``; 0 outside the image; the input's float dtype."""
    from nibabel.processing import resample_from_to

    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating) and order > 0:
        data = data.astype(np.float64)
    out = resample_from_to(nib.Nifti1Image(data, affine), grid, order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj)


def network_shape(shape: Sequence[int], config: RaidionicsConfig) -> tuple[int, int, int]:
    """The resize target: ``new_axial_size`` (3 values), or x, y to it and z scaled by the y ratio (slab mode)."""
    size = config.new_axial_size
    if size is None:
        return int(shape[0]), int(shape[1]), int(shape[2])
    if len(size) == 3:
        return int(size[0]), int(size[1]), int(size[2])
    return int(size[0]), int(size[1]), int(shape[2] * (size[1] / shape[1]))


def resize_volume(volume: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """``skimage.transform.resize(volume, shape, order=order)`` with its defaults (as raidionicsseg calls it)."""
    from skimage.transform import resize

    shape = tuple(int(s) for s in shape)
    volume = np.asarray(volume)
    return volume.copy() if volume.shape == shape else resize(volume, shape, order=order)


def clip_intensities(volume: np.ndarray, percentiles: Sequence[float] = (0.0, 100.0),
                     values: Sequence[float] | None = None) -> np.ndarray:
    """raidionicsseg's MRI clipping: negatives to 0; then the ``percentiles`` (of the result), or, when those are
    0–100, the ``values`` (low, high; applied where the input lies outside them)."""
    volume = np.asarray(volume)
    result = volume.copy()
    result[result < 0] = 0
    if percentiles[1] - percentiles[0] != 100:
        low, high = np.percentile(result, list(percentiles))
        result = np.clip(result, low, high)
    elif values is not None and len(values) >= 2 and values[1] > values[0]:
        result[volume < values[0]] = values[0]
        result[volume > values[1]] = values[1]
    return result


def normalize_intensities(volume: np.ndarray, method: str | None) -> np.ndarray:
    """raidionicsseg's MRI normalisation, in float32: ``default`` = min-max to [0, 1]; ``zeromean`` = z-score;
    ``zeromean_nonzero`` = z-score of the nonzero voxels (sample std), zeros kept; ``None`` = unchanged. A constant
    volume is left as is."""
    result = np.asarray(volume).astype(np.float32)
    if method == "zeromean":
        mean, std = np.mean(result), np.std(result)
        if std != 0:
            result = (result - mean) / std
    elif method == "zeromean_nonzero":
        nonzero = result != 0
        values = result[nonzero]
        if values.size > 1:
            std = np.std(values, ddof=1)
            if std != 0:
                result[nonzero] = (values - np.mean(values)) / std
    elif method == "default":
        low, high = np.min(result), np.max(result)
        if high - low != 0:
            result = (result - low) / (high - low)
    elif method is not None:
        raise ValueError(f"normalization method must be one of {NORMALIZATION_METHODS} or None; got {method!r}")
    return result.astype(np.float32)


def patch_starts(size: int, patch: int, offset: int) -> list[int]:
    """Window starts along one axis: every ``patch − offset`` voxels, the last window flush with the end."""
    if size <= patch:
        return [0]
    step = patch - offset
    return [*range(0, size - patch, step), size - patch]


def apply_activation(logits: np.ndarray, kind: str) -> np.ndarray:
    """Softmax over the last axis (shifted by the maximum), or elementwise sigmoid."""
    if kind == "sigmoid":
        return (1 / (1 + np.exp(-logits))).astype(np.float32)
    shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return (shifted / np.sum(shifted, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Prepared:
    """Network input (x, y, z, C) and the geometry needed to map outputs back.

    ``box`` crops the scan's own grid (``None``: no cropping); ``block_affine`` is the cropped block's affine as
    raidionicsseg keeps it (the scan's affine, not shifted: a frame choice that does not change any value);
    ``grid`` is the resampled block (RAS+); ``swap`` says x and y were transposed for the network.
    """

    data: np.ndarray
    grid: Grid
    box: Bbox | None
    reference_shape: tuple[int, int, int]
    reference_affine: np.ndarray
    block_shape: tuple[int, int, int]
    swap: bool = False
    label_channels: tuple[bool, ...] = ()


def _foreground(first: np.ndarray, config: RaidionicsConfig,
                brain_mask: np.ndarray | None) -> tuple[Bbox | None, np.ndarray | None]:
    """The cropping box on the scan's grid and, for ``brain_mask`` cropping, the voxels kept."""
    if config.background_cropping == "minimum":
        return head_bbox(first), None
    if config.background_cropping in ("brain_mask", "brain_clip"):
        if brain_mask is None:
            raise ModelError(f"the model crops to the brain (background_cropping = {config.background_cropping}); "
                             "give the brain mask of the first channel (brain_mask=...)")
        box, inside = brain_bbox(np.asarray(brain_mask))
        return box, inside if config.background_cropping == "brain_mask" else None
    return None, None


def _to_network(volume: np.ndarray, affine: np.ndarray, box: Bbox | None, spacing: Sequence[float],
                config: RaidionicsConfig, *, order: int) -> tuple[np.ndarray, Grid]:
    """Crop (scan grid) → resample the block → resize: raidionicsseg's geometry for one input (float64)."""
    block = np.asarray(crop(volume, box), dtype=np.float64)
    grid = resampled_grid(block.shape, affine, spacing)
    resampled = resample_array(block, affine, grid, order=order)
    if config.new_axial_size is not None:
        resampled = resize_volume(resampled, network_shape(resampled.shape, config), order=order)
    return resampled, grid


def preprocess(arrays: Sequence[np.ndarray], affine: np.ndarray, config: RaidionicsConfig, *,
               brain_mask: np.ndarray | None = None, label_channels: Sequence[bool] | None = None) -> Prepared:
    """raidionicsseg's pre-processing of inputs that share one grid (``affine``, any voxel order).

    ``arrays[0]`` is the scan segmented (its grid is the output's). ``brain_mask`` (same grid) is needed for
    ``brain_mask`` / ``brain_clip`` cropping. ``label_channels`` overrides the by-content rule
    (:func:`is_label_volume`) that decides which inputs are label maps.
    """
    if len(arrays) != config.number_inputs:
        raise ModelError(f"the model takes {config.number_inputs} inputs ({INI_NAME}); got {len(arrays)}")
    labels = tuple(bool(v) for v in label_channels) if label_channels is not None else \
        tuple(is_label_volume(a) for a in arrays)
    shape = tuple(int(s) for s in arrays[0].shape[:3])
    box, inside = _foreground(np.asarray(arrays[0], dtype=np.float64), config, brain_mask)
    block_shape = tuple(int(s) for s in crop(arrays[0], box).shape[:3])
    spacing = config.output_spacing or default_spacing(affine)
    grid: Grid | None = None
    raw, channels = [], []
    for volume, label in zip(arrays, labels, strict=True):
        volume = np.asarray(volume, dtype=np.float64)
        if inside is not None:
            volume = np.where(inside, volume, 0.0)
        data, block_grid = _to_network(volume, affine, box, spacing, config, order=0 if label else 1)
        grid = grid or block_grid
        raw.append(data)
        channels.append(data if label else normalize_intensities(
            clip_intensities(data, config.intensity_clipping_range, config.intensity_clipping_values),
            config.normalization_method))
    for i, j in config.diffloader_pairs:
        channels.append(normalize_intensities(clip_intensities(
            np.abs(raw[i] - raw[j]), config.intensity_clipping_range, config.intensity_clipping_values),
            config.normalization_method))
    data = np.stack(channels, axis=-1).astype(np.float32)
    if config.swap_training_input:
        data = np.ascontiguousarray(np.transpose(data, (1, 0, 2, 3)))
    assert grid is not None
    return Prepared(data=data, grid=grid, box=box, reference_shape=shape, reference_affine=np.asarray(affine),
                    block_shape=block_shape, swap=config.swap_training_input, label_channels=labels)


def to_network_grid(volume: np.ndarray, prepared: Prepared, config: RaidionicsConfig, *, order: int = 1
                    ) -> np.ndarray:
    """Carry another array of the scan's grid (a training label, say) through the inputs' geometry: crop,
    resample, resize, swap; no intensity steps. float32 (x, y, z) on the network grid."""
    spacing = config.output_spacing or default_spacing(prepared.reference_affine)
    out, _ = _to_network(np.asarray(volume, dtype=np.float64), prepared.reference_affine, prepared.box, spacing,
                         config, order=order)
    return np.ascontiguousarray(np.transpose(out, (1, 0, 2)) if prepared.swap else out, dtype=np.float32)


def to_reference_grid(probability: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Map one class's map (network grid) back onto the scan's grid, as raidionicsseg reconstructs it.

    float maps: ``scipy.ndimage.zoom(order=1)`` to the resampled block, resampled (order 1) onto the cropped block,
    0 outside the box; float32. uint8 maps (thresholded): the same with order 0; uint8.
    """
    data = np.asarray(probability)
    order = 0 if data.dtype == np.uint8 else 1
    if prepared.swap:
        data = np.transpose(data, (1, 0, 2))
    if data.shape != prepared.grid[0]:
        data = ndi.zoom(data, np.divide(prepared.grid[0], data.shape), order=order)
    from nibabel.processing import resample_from_to

    block = resample_from_to(nib.Nifti1Image(data, prepared.grid[1]), (prepared.block_shape,
                                                                        prepared.reference_affine), order=order)
    block_data = np.asarray(block.dataobj)
    if prepared.box is None:
        full = block_data
    else:
        box = prepared.box
        full = np.zeros(prepared.reference_shape, dtype=block_data.dtype)
        full[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = block_data
    return full if order == 0 else np.clip(full, 0.0, 1.0).astype(np.float32)


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
    """Run one (x, y, z, C) block; the network's first output as (x, y, z, classes), raw."""
    names = [i.name for i in session.get_inputs()]
    name = INPUT_NAME if INPUT_NAME in names else names[0]
    batch = block[None]
    first = config.channels_order == "channels_first"
    if first:
        batch = np.transpose(batch, (0, 4, 1, 2, 3))
    if config.swap_training_input:  # raidionicsseg moves z in front of the spatial axes
        batch = np.transpose(batch, (0, 1, 4, 2, 3) if first else (0, 3, 1, 2, 4))
    output = np.asarray(session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0])
    if output.ndim != 5:
        raise ModelError(f"the model's first output has shape {output.shape}; a (batch, x, y, z, classes) "
                         f"segmentation output was expected")
    if first:
        output = np.transpose(output, (0, 2, 3, 4, 1))
    if config.swap_training_input:
        output = np.transpose(output, (0, 2, 3, 1, 4))
    output = output[0]
    if output.shape[:3] != block.shape[:3]:
        raise ModelError(f"the model returned shape {output.shape} for an input block of shape {block.shape} "
                         f"({config.channels_order}); check channels_order in {INI_NAME}")
    return output.astype(np.float32)


def _predict_slabs(session: Any, data: np.ndarray, config: RaidionicsConfig, runtime: RuntimeOptions) -> np.ndarray:
    slab = int(config.slab_size or 1)
    step = slab if runtime.overlapping_ratio is None else int(slab - runtime.overlapping_ratio * slab)
    depth = data.shape[2]
    pad = (-depth) % slab
    padded = np.pad(data, ((0, 0), (0, 0), (0, pad), (0, 0)), mode="edge") if pad else data
    result: np.ndarray | None = None
    for index in range(int(np.ceil(depth / step))):
        z0 = index * step
        z1 = min(padded.shape[2], z0 + slab)
        out = _forward(session, padded[:, :, z0:z1], config)
        if result is None:
            result = np.full(padded.shape[:3] + (out.shape[-1],), -np.inf, dtype=np.float32)
        result[:, :, z0:z1] = np.maximum(result[:, :, z0:z1], out)
    assert result is not None
    return result[:, :, :depth]


def _patch_offsets(config: RaidionicsConfig, runtime: RuntimeOptions) -> tuple[int, int, int]:
    patch = config.patch_size or (0, 0, 0)
    if runtime.overlapping_ratio is not None:
        return tuple(int(runtime.overlapping_ratio * p) for p in patch)  # type: ignore[return-value]
    return config.patch_offset or (0, 0, 0)


def _predict_patches(session: Any, data: np.ndarray, config: RaidionicsConfig, runtime: RuntimeOptions
                     ) -> np.ndarray:
    patch = config.patch_size or (0, 0, 0)
    offset = _patch_offsets(config, runtime)
    # pad both ends (edge values) where the volume is not larger than the patch, as raidionicsseg
    pads = [(int(np.ceil((p - s) / 2)),) * 2 if s <= p else (0, 0) for s, p in zip(data.shape[:3], patch,
                                                                                      strict=True)]
    padded = np.pad(data, [*pads, (0, 0)], mode="edge")
    result: np.ndarray | None = None
    for x in patch_starts(padded.shape[0], patch[0], offset[0]):
        for y in patch_starts(padded.shape[1], patch[1], offset[1]):
            for z in patch_starts(padded.shape[2], patch[2], offset[2]):
                window = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                out = _forward(session, padded[window], config)
                if result is None:  # raidionicsseg starts from -100 and fuses overlaps by maximum
                    result = np.full(padded.shape[:3] + (out.shape[-1],), -100.0, dtype=np.float32)
                result[window] = np.maximum(result[window], out)
    assert result is not None
    return result[pads[0][0]:padded.shape[0] - pads[0][1], pads[1][0]:padded.shape[1] - pads[1][1],
                  pads[2][0]:padded.shape[2] - pads[2][1]]


def run_network(path: str | Path, data: np.ndarray, config: RaidionicsConfig, *,
                runtime: RuntimeOptions | None = None, device: str = "cpu", threads: int = 1) -> np.ndarray:
    """Class probabilities (x, y, z, classes), float32, of one model file on the prepared input."""
    runtime = runtime or RuntimeOptions()
    session = _session(str(path), device, int(threads))
    if config.mode == "full":
        out = _forward(session, data, config)
    elif config.mode == "slab":
        out = _predict_slabs(session, data, config, runtime)
    else:
        out = _predict_patches(session, data, config, runtime)
    if not config.activation_layer_included:
        out = apply_activation(out, config.activation_layer_type)
    return out.astype(np.float32)


def run_folds(model_paths: Sequence[Path], data: np.ndarray, config: RaidionicsConfig, *,
              runtime: RuntimeOptions | None = None, strategy: str = "average", device: str = "cpu",
              threads: int = 1) -> np.ndarray:
    """Class probabilities (x, y, z, classes) of the given model files fused by ``strategy`` (``average`` or
    ``maximum``). Which fold files to run is the caller's choice (:func:`fold_files`)."""
    runtime = runtime or RuntimeOptions()
    return fuse_folds([run_network(p, data, config, runtime=runtime, device=device, threads=threads)
                       for p in model_paths], strategy)


def fuse_folds(outputs: Sequence[np.ndarray], strategy: str = "average") -> np.ndarray:
    """The folds' class probabilities (x, y, z, classes) fused by ``strategy`` (``average`` or ``maximum``), as
    raidionicsseg fuses them; one fold's as they are."""
    if not outputs:
        raise ModelError("no model file to run")
    if len(outputs) == 1:
        return outputs[0]
    stacked = np.stack(outputs, axis=-1)
    fused = np.amax(stacked, axis=-1) if strategy == "maximum" else np.average(stacked, axis=-1)
    return fused.astype(np.float32)


def fold_files(folder: Path, runtime: RuntimeOptions, max_folds: int | None = None) -> tuple[Path, ...]:
    """The fold models raidionicsseg runs: the first only, unless ``folds_ensembling``; at most ``max_folds``."""
    paths = model_files(folder)
    if not runtime.folds_ensembling:
        paths = paths[:1]
    return paths[:max_folds] if max_folds else paths


def reconstruct(probabilities: np.ndarray, prepared: Prepared, class_index: int, *, runtime: RuntimeOptions,
                threshold: float) -> np.ndarray:
    """One class back on the scan's grid: its probability (``resample_first``) or, for ``resample_second``, the
    network-grid mask (probability ≥ ``threshold``) carried back by nearest neighbour, as 0/1 float32."""
    probability = probabilities[..., class_index]
    if runtime.reconstruction_order == "resample_first":
        return to_reference_grid(probability, prepared)
    return to_reference_grid((probability >= threshold).astype(np.uint8), prepared).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The backend entry point


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
    return np.asarray(mask.get_fdata()).astype(np.uint8) != 0  # raidionicsseg reads it as uint8


def predict_probability(card: ModelCard, channel_files: Sequence[str | Path], *, brain_mask: Path | None = None,
                        device: str = "cpu", threads: int = 1, max_folds: int | None = None,
                        report: dict[str, Any] | None = None) -> np.ndarray:
    """Residual-tumour probability, float32, exactly on the first channel's grid (its shape and voxel order):
    :func:`predict`'s probability."""
    return predict(card, channel_files, brain_mask=brain_mask, device=device, threads=threads, max_folds=max_folds,
                   report=report).probability


def predict(card: ModelCard, channel_files: Sequence[str | Path], *, brain_mask: Path | None = None,
            device: str = "cpu", threads: int = 1, max_folds: int | None = None, keep_members: bool = False,
            report: dict[str, Any] | None = None) -> Prediction:
    """Residual-tumour probability, float32, exactly on the first channel's grid (its shape and voxel order), and
    with ``keep_members`` the ensemble's members (:class:`bids_postop.segmentation.backend.Members`).

    ``channel_files`` are NIfTI files in the order of ``card.channels`` (post-op T1w-CE first), all on one grid;
    they are given to the network in its own order (:func:`network_channel_order`: the package's
    ``pipeline.json``, else the card). ``brain_mask`` (same grid) is required by models that crop to the brain.
    Folds and thresholding order follow the card's runtime options (published folders: raidionicsseg's defaults,
    the first fold only; models trained here: every fold averaged); ``max_folds`` caps the folds run
    (``--fast``). ``report`` (a dict) receives what was run.

    Members (``keep_members``): each fold's probability when several folds run (kind ``"folds"``; the foreground
    class kept at the network's resolution, brought back by the ensemble's reconstruction on demand; for
    ``resample_second`` models each member is its own thresholded 0/1 map, as the ensemble is); Raidionics runs no
    test-time augmentation, so one fold has none (``"none"``). The ensemble is the same with or without members.
    """
    if len(channel_files) != len(card.channels):
        raise ModelError(f"model {card.name} takes {len(card.channels)} channels ({', '.join(card.channels)}); "
                         f"got {len(channel_files)} files")
    folder = _model_folder(card)
    config = read_preprocessing_ini(folder)
    order, source = network_channel_order(card)
    if config.number_inputs != len(order):
        raise ModelError(f"{folder}: {INI_NAME} says number_inputs = {config.number_inputs}, the model card lists "
                         f"{len(card.channels)} channels")
    by_role = dict(zip(card.channels, channel_files, strict=True))
    files = [by_role[role] for role in order]
    runtime = runtime_options(card.details, default=RuntimeOptions() if not card.raw else PROJECT_RUNTIME,
                              where=str(card.folder))
    paths = fold_files(folder, runtime, max_folds)
    images = _load_channels(files, order)
    mask = _load_mask(brain_mask, images[0], files[0])
    arrays = [img.get_fdata(dtype=np.float32) for img in images]
    prepared = preprocess(arrays, images[0].affine, config, brain_mask=mask)
    if report is not None:
        report.update(backend="raidionics", matches=OFFICIAL_LIBRARY, model_files=[str(p) for p in paths],
                      n_networks=len(paths), use_mirroring=False, channel_order=list(order),
                      channel_order_source=source,
                      label_channels=[r for r, lab in zip(order, prepared.label_channels, strict=True) if lab],
                      **runtime.as_dict())
    outputs = [run_network(p, prepared.data, config, runtime=runtime, device=device, threads=threads)
               for p in paths]
    foreground = int(card.details.get("foreground_class", config.foreground_class))
    members = NO_MEMBERS
    if keep_members and len(outputs) > 1:
        kept = [np.ascontiguousarray(out[..., foreground:foreground + 1]) for out in outputs]
        box = None if prepared.box is None else (slice(prepared.box[0], prepared.box[3]),
                                                 slice(prepared.box[1], prepared.box[4]),
                                                 slice(prepared.box[2], prepared.box[5]))

        def member(index: int) -> np.ndarray:  # 0 outside the cropping box, as the ensemble
            full = reconstruct(kept[index], prepared, 0, runtime=runtime, threshold=card.threshold)
            return full if box is None else np.ascontiguousarray(full[box])

        members = Members("folds", tuple(p.parent.name for p in paths), member, box)
    probabilities = fuse_folds(outputs, runtime.ensembling_strategy)
    del outputs
    return Prediction(reconstruct(probabilities, prepared, foreground, runtime=runtime, threshold=card.threshold),
                      members)
