"""The study's AGU-Net as a Keras 3 model (TensorFlow backend): a full-volume 3-D U-Net with attention gates,
multi-scale inputs and deep supervision.

Layout (channels last, ``(batch, x, y, z, channels)``):

- encoder level ``k`` (filters ``filters[k]``): two 3×3×3 convolutions, each followed by batch normalisation
  and ReLU. Levels ``k ≥ 1`` first max-pool the previous level by 2 and concatenate a *multi-scale input*:
  the network input average-pooled by ``2**k`` and passed through one 3×3×3 convolution (+ BN + ReLU);
- decoder level ``k`` (from the deepest but one up to 0): the coarser features (gating signal ``g``) are
  upsampled by 2 (nearest) and convolved; the skip features ``x`` of level ``k`` go through an *attention
  gate* (Oktay et al. 2018): ``α = σ(ψ(ReLU(θ(x) + φ(g))))`` with ``θ`` a 2×2×2 stride-2 convolution,
  ``φ`` and ``ψ`` 1×1×1 convolutions, ``α`` upsampled by 2 and multiplied with ``x``; both are concatenated
  and go through two 3×3×3 convolutions;
- *deep supervision*: every decoder level ends in a 1×1×1 convolution to ``n_classes`` logits, upsampled
  (nearest) to the input size, then softmax. Output 0 is the full-resolution one — the one inference uses
  (and the only one the ONNX export keeps); the others only add to the training loss.

Every spatial size must be divisible by ``2 ** (len(filters) - 1)``. Layer names are fixed by position
(``enc2_conv1``, ``att1_theta``, …) and do not depend on the number of input channels, so that a trained model
can initialise one with another number of inputs (:func:`adapt_from`).

This module imports Keras inside its functions: importing it does not start TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

STUDY_FILTERS = (16, 32, 128, 256, 256)
STUDY_SHAPE = (128, 128, 144)


@dataclass(frozen=True)
class NetworkSpec:
    """What defines an AGU-Net: spatial input shape (x, y, z, voxels at 1 mm), inputs, filters per level."""

    shape: tuple[int, int, int] = STUDY_SHAPE
    n_inputs: int = 1
    filters: tuple[int, ...] = STUDY_FILTERS
    n_classes: int = 2
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.filters) - 1)
        if len(self.shape) != 3 or any(s <= 0 or s % factor for s in self.shape):
            raise ValueError(f"input shape {self.shape}: every size must be a positive multiple of {factor} "
                             f"(2 ** (levels - 1) with {len(self.filters)} levels)")
        if len(self.filters) < 2 or any(f <= 0 for f in self.filters):
            raise ValueError(f"filters {self.filters}: at least 2 levels of positive filter counts")
        if self.n_inputs < 1 or self.n_classes < 2:
            raise ValueError(f"n_inputs {self.n_inputs} must be >= 1 and n_classes {self.n_classes} >= 2")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkSpec:
        x, y, z = (int(s) for s in data["shape"])
        return cls(shape=(x, y, z), n_inputs=int(data["n_inputs"]), filters=tuple(data["filters"]),
                   n_classes=int(data.get("n_classes", 2)), deep_supervision=bool(data.get("deep_supervision", True)))


TINY_SPEC = NetworkSpec(shape=(32, 32, 32), filters=(4, 8, 8, 8, 8))


def _conv_bn_relu(x: Any, filters: int, name: str) -> Any:
    from keras import layers

    x = layers.Conv3D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _attention_gate(x: Any, g: Any, inter: int, name: str) -> Any:
    from keras import layers

    theta = layers.Conv3D(inter, 2, strides=2, padding="valid", name=f"{name}_theta")(x)
    phi = layers.Conv3D(inter, 1, name=f"{name}_phi")(g)
    f = layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([theta, phi]))
    alpha = layers.Conv3D(1, 1, activation="sigmoid", name=f"{name}_psi")(f)
    alpha = layers.UpSampling3D(2, name=f"{name}_up")(alpha)
    return layers.Multiply(name=f"{name}_gate")([x, alpha])  # (…, C) × (…, 1): broadcast over channels


def build_agunet(spec: NetworkSpec = NetworkSpec()) -> Any:
    """The Keras model of ``spec``: input ``input`` (batch, x, y, z, n_inputs); outputs softmax probabilities
    (batch, x, y, z, n_classes), full resolution first, then (deep supervision) the coarser decoder levels."""
    import keras
    from keras import layers

    inputs = keras.Input((*spec.shape, spec.n_inputs), name="input")
    x = inputs
    scaled = inputs
    skips = []
    for level, filters in enumerate(spec.filters):
        if level > 0:
            x = layers.MaxPooling3D(2, name=f"enc{level}_pool")(x)
            scaled = layers.AveragePooling3D(2, name=f"msi{level}_pool")(scaled)
            side = _conv_bn_relu(scaled, filters, f"msi{level}")
            x = layers.Concatenate(name=f"enc{level}_concat")([x, side])
        x = _conv_bn_relu(x, filters, f"enc{level}_1")
        x = _conv_bn_relu(x, filters, f"enc{level}_2")
        skips.append(x)
    outputs = []
    for level in range(len(spec.filters) - 2, -1, -1):
        filters = spec.filters[level]
        gated = _attention_gate(skips[level], x, max(filters // 2, 1), f"att{level}")
        up = layers.UpSampling3D(2, name=f"dec{level}_up")(x)
        up = _conv_bn_relu(up, filters, f"dec{level}_upconv")
        x = layers.Concatenate(name=f"dec{level}_concat")([up, gated])
        x = _conv_bn_relu(x, filters, f"dec{level}_1")
        x = _conv_bn_relu(x, filters, f"dec{level}_2")
        if level == 0 or spec.deep_supervision:
            logits = layers.Conv3D(spec.n_classes, 1, name=f"out{level}_logits")(x)
            if level > 0:
                logits = layers.UpSampling3D(2 ** level, name=f"out{level}_up")(logits)
            outputs.append(layers.Softmax(axis=-1, name=f"out{level}")(logits))
    outputs.reverse()  # full resolution first
    return keras.Model(inputs, outputs, name="agunet")


def spec_of(model: Any) -> NetworkSpec:
    """The :class:`NetworkSpec` of a model built by :func:`build_agunet` (read from its layers)."""
    x, y, z = (int(s) for s in model.inputs[0].shape[1:4])
    n_inputs = int(model.inputs[0].shape[-1])
    filters = []
    level = 0
    while True:
        try:
            filters.append(int(model.get_layer(f"enc{level}_1_conv").filters))
        except ValueError:
            break
        level += 1
    if not filters:
        raise ValueError(f"model {model.name!r} is not an AGU-Net built by bids_postop (no layer enc0_1_conv)")
    n_classes = int(model.outputs[0].shape[-1])
    return NetworkSpec(shape=(x, y, z), n_inputs=n_inputs, filters=tuple(filters), n_classes=n_classes,
                       deep_supervision=len(model.outputs) > 1)


def adapt_weights(old: Sequence[np.ndarray], new_shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray] | None:
    """Weights of one layer adapted to a new number of input channels, or ``None`` when that is impossible.

    Equal shapes are copied. A convolution kernel (…, C_in, C_out) whose only difference is C_in keeps its
    first ``min(old, new)`` input channels; extra channels get the mean of the old ones (the first channel,
    post-op T1w-CE, keeps exactly the filters it learnt).
    """
    out = []
    for weight, shape in zip(old, new_shapes, strict=True):
        weight = np.asarray(weight)
        if weight.shape == tuple(shape):
            out.append(weight.copy())
            continue
        if weight.ndim != len(shape) or weight.ndim < 2 or weight.shape[:-2] != tuple(shape[:-2]) \
                or weight.shape[-1] != shape[-1]:
            return None
        keep = min(weight.shape[-2], shape[-2])
        adapted = np.repeat(weight.mean(axis=-2, keepdims=True), shape[-2], axis=-2)
        adapted[..., :keep, :] = weight[..., :keep, :]
        out.append(adapted.astype(weight.dtype))
    return out


def adapt_from(source: Any, target: Any) -> dict[str, list[str]]:
    """Copy ``source``'s weights into ``target`` layer by layer (matched by name), adapting the layers that
    read the input to ``target``'s number of input channels (:func:`adapt_weights`).

    Returns ``{"copied": [...], "adapted": [...], "missing": [...]}`` (layer names). Raises ``ValueError``
    when fewer than half of ``target``'s weighted layers could be initialised (not the same architecture).
    """
    report: dict[str, list[str]] = {"copied": [], "adapted": [], "missing": []}
    weighted = [layer for layer in target.layers if layer.weights]
    for layer in weighted:
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            report["missing"].append(layer.name)
            continue
        old = src.get_weights()
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if len(old) != len(shapes):
            report["missing"].append(layer.name)
            continue
        new = adapt_weights(old, shapes)
        if new is None:
            report["missing"].append(layer.name)
            continue
        layer.set_weights(new)
        same = all(np.shape(a) == b for a, b in zip(old, shapes, strict=True))
        report["copied" if same else "adapted"].append(layer.name)
    if len(report["copied"]) + len(report["adapted"]) < len(weighted) / 2:
        raise ValueError(f"the initial model shares too few layers with this AGU-Net "
                         f"({len(report['copied']) + len(report['adapted'])} of {len(weighted)} by name and shape); "
                         f"give a model trained with bids_postop-train --architecture agunet")
    return report
