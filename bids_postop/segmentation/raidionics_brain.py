"""Brain extraction with a Raidionics brain model (the published ``MRI_Brain``, or a folder in that layout):
an alternative to :mod:`bids_postop.core.brain`'s HD-BET/deepbet, run by the Raidionics back-end
(:mod:`bids_postop.segmentation.raidionics`) and checked before any participant runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bids_postop.core.images import load_3d, write_like
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation.models import DEFAULT_THRESHOLD
from bids_postop.segmentation.raidionics import fold_files, preprocess, reconstruct, run_folds
from bids_postop.segmentation.raidionics_model import (
    INI_NAME,
    ONNX_NAME,
    RaidionicsConfig,
    RuntimeOptions,
    class_threshold,
    model_files,
    read_preprocessing_ini,
)
from bids_postop.settings import DEFAULT_BRAIN_MODEL

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
    from bids_postop.models.registry import read_install_record
    from bids_postop.models.transfer import file_md5

    folder = Path(folder)
    record = read_install_record(folder)
    return {"method": "raidionics", "model": folder.name, "folder": str(folder),
            "onnx_md5": {str(p.relative_to(folder)): file_md5(p) for p in model_files(folder)},
            **({"installed_from": record} if record else {})}


def extract_brain_raidionics(image: str | Path, *, model_folder: str | Path, out_mask: str | Path,
                             device: str = "cpu", threads: int = 1) -> Path:
    """Brain mask with the Raidionics ``MRI_Brain`` model (an alternative to :mod:`bids_postop.core.brain`).

    Run as the Raidionics application runs it through raidionicsseg (the first fold model only, probabilities
    mapped back to the image's grid, then thresholded at the model's ``optimal_thresholds``, ≥, 0.5 when absent);
    the mask is reduced to its largest connected component. Returns ``out_mask``: uint8 0/1, shape
    ``image.shape[:3]``, written with the image's affine and sform/qform codes. Raises :class:`InputDataError`
    when no brain is found.
    """
    model_folder = Path(model_folder).expanduser().resolve()
    config = _brain_model_config(model_folder)
    img = load_3d(image, what="image for brain extraction")
    prepared = preprocess([img.get_fdata(dtype=np.float32)], img.affine, config)
    runtime = RuntimeOptions()  # as the Raidionics application runs it: the first fold, thresholded after resampling
    probabilities = run_folds(fold_files(model_folder, runtime), prepared.data, config, runtime=runtime,
                              device=device, threads=threads)
    threshold = class_threshold(config)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    probability = reconstruct(probabilities, prepared, config.foreground_class, runtime=runtime, threshold=threshold)
    mask = probability >= threshold
    labels, count = ndi.label(mask)
    if count == 0:
        raise InputDataError(f"the Raidionics brain model ({model_folder.name}) found no brain in the image", image)
    mask = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    out_mask = Path(out_mask)
    out_mask.parent.mkdir(parents=True, exist_ok=True)
    return write_like(mask.astype(np.uint8), img, out_mask, dtype=np.uint8)
