"""AGU-Net → Raidionics-format model package, the format the participant level runs with onnxruntime
(:mod:`bids_postop.segmentation.raidionics`).

A package folder holds:

- ``pre_processing.ini``: 1 mm resampling, ``brain_clip`` cropping (the bounding box of the brain mask),
  z-score normalisation (``zeromean``), full-volume resize to the network's input shape (``new_axial_size``
  with 3 values), ``number_inputs``, ``channels_last``; [Training] ``nb_classes = 2``, ``classes``,
  ``optimal_thresholds`` (the threshold chosen on the validation folds), ``activation_layer_included = true``
  (the network ends in softmax);
- ``model.onnx`` (one model), or one sub-folder per fold each holding a ``model.onnx`` (the backend averages
  the folds' probabilities);
- ``bids_postop_model.json``: the model card (``architecture: raidionics``, configuration, channels,
  threshold), so that ``bids_postop --model FOLDER`` and ``resolve_models`` load it.

The ONNX file is written by Keras 3's own exporter (``model.export(path, format="onnx")``, which converts
the traced TensorFlow function with tf2onnx): input tensor ``input`` (batch, x, y, z, channels), one output
``output`` — the full-resolution softmax (deep-supervision outputs are dropped). :func:`write_onnx` and
:func:`export_package` need TensorFlow and run in the worker process (``python -m bids_postop.agunet.worker
export``); the ini and card writers do not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bids_postop.agunet.architecture import NetworkSpec
from bids_postop.configurations import CONFIGURATIONS

INI_NAME = "pre_processing.ini"
ONNX_NAME = "model.onnx"
CARD_NAME = "bids_postop_model.json"
OUTPUT_NAME = "output"
CLASSES = ("background", "tumor")


def preprocessing_ini_text(spec: NetworkSpec, *, threshold: float | None = None,
                           cropping: str = "brain_clip") -> str:
    """The ``pre_processing.ini`` of an AGU-Net with ``spec`` (the keys our Raidionics backend reads)."""
    lines = [
        "[Default]",
        "imaging_modality = MRI",
        "training_backend = TF",
        "task = segmentation",
        "",
        "[PreProcessing]",
        "output_spacing = 1.0, 1.0, 1.0",
        f"background_cropping = {cropping}",
        "intensity_clipping_range = 0.0, 100.0",
        "normalization_method = zeromean",
        f"new_axial_size = {', '.join(str(s) for s in spec.shape)}",
        "slicing_plane = axial",
        f"number_inputs = {spec.n_inputs}",
        "channels_order = channels_last",
        "",
        "[Training]",
        f"nb_classes = {spec.n_classes}",
        f"classes = {', '.join(CLASSES[:spec.n_classes])}",
        "deep_supervision = false  # the ONNX file holds only the full-resolution output",
        "activation_layer_included = true",
        "activation_layer_type = softmax",
    ]
    if threshold is not None:
        lines.append(f"optimal_thresholds = {threshold:g}")
    return "\n".join(lines) + "\n"


def write_preprocessing_ini(folder: str | Path, spec: NetworkSpec, *, threshold: float | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INI_NAME
    _write_atomic(path, preprocessing_ini_text(spec, threshold=threshold))
    return path


def write_model_card(folder: str | Path, *, configuration: str, threshold: float, name: str | None = None,
                     description: str = "", extra: Mapping[str, Any] | None = None) -> Path:
    """``bids_postop_model.json`` of a package folder (architecture ``raidionics``, model files in the folder)."""
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration {configuration!r} is not one of {sorted(CONFIGURATIONS)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} is not in (0, 1)")
    folder = Path(folder)
    card = {
        "schema_version": 1,
        "name": name or folder.name,
        "description": description or f"AGU-Net (full volume, Raidionics ONNX format) for residual glioblastoma "
                                      f"on early post-operative MRI, input configuration {configuration}",
        "intended_use": "research; trained with bids_postop-train --architecture agunet, not validated for "
                        "clinical use",
        "not_for_clinical_use": True,
        "architecture": "raidionics",
        "configuration": configuration,
        "channels": list(CONFIGURATIONS[configuration]),  # type: ignore[index]
        "threshold": float(threshold),
        "raidionics": {"model_folder": ".", "foreground_class": 1},
        **(extra or {}),
    }
    path = folder / CARD_NAME
    _write_atomic(path, json.dumps(card, indent=2) + "\n")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# TensorFlow side (worker process only)


def inference_model(model: Any) -> Any:
    """The single-output model inference runs: input → full-resolution softmax (output 0)."""
    import keras

    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=f"{model.name}_inference")


def write_onnx(model: Any, path: str | Path) -> Path:
    """Export ``model`` (Keras, channels last) to ONNX: input ``input``, one output ``output``.

    Raises ``RuntimeError`` when the exported graph does not have that interface.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.onnx")
    import tensorflow as tf

    single = inference_model(model)
    # an explicit signature: Keras otherwise exports only models it has called once (a loaded model was not)
    signature = [tf.TensorSpec((None, *single.inputs[0].shape[1:]), tf.float32, name="input")]
    single.export(str(tmp), format="onnx", verbose=False, input_signature=signature)
    proto = onnx.load(str(tmp))
    inputs = [i.name for i in proto.graph.input]
    if inputs != ["input"]:
        raise RuntimeError(f"the exported ONNX graph has inputs {inputs}; the Raidionics format needs one input "
                           f"named 'input' (name the Keras input layer 'input')")
    if len(proto.graph.output) != 1:
        raise RuntimeError(f"the exported ONNX graph has {len(proto.graph.output)} outputs; expected 1")
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
    proto.graph.output[0].name = OUTPUT_NAME
    proto.producer_name = "bids_postop (keras 3 export, tf2onnx)"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def export_package(model: Any, folder: str | Path, *, configuration: str | None = None,
                   threshold: float | None = None, folds: Sequence[Any] = (),
                   card_extra: Mapping[str, Any] | None = None) -> Path:
    """Write a Raidionics package for one Keras model (``model``), or for several fold models (``folds``,
    each into ``fold_k/model.onnx``; ``model`` then gives only the specification). A model card is
    written when ``configuration`` is given (its threshold: ``threshold``, else 0.5)."""
    from bids_postop.agunet.architecture import spec_of

    folder = Path(folder)
    spec = spec_of(model)
    write_preprocessing_ini(folder, spec, threshold=threshold)
    if folds:
        for k, fold_model in enumerate(folds):
            write_onnx(fold_model, folder / f"fold_{k}" / ONNX_NAME)
    else:
        write_onnx(model, folder / ONNX_NAME)
    if configuration is not None:
        write_model_card(folder, configuration=configuration, threshold=0.5 if threshold is None else threshold,
                         extra=card_extra)
    return folder
