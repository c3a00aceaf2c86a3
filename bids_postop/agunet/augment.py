"""The study's AGU-Net augmentation, on numpy arrays (no TensorFlow), as the paper lists it: horizontal and
vertical flipping, rotation in [−20°, 20°] and translation up to 10 %, each applied with p = 0.5.

The training arrays are in RAS+ voxel order (x: left→right, y: posterior→anterior, z: inferior→superior;
:mod:`bids_postop.agunet.data`), so on an axial slice

- horizontal flip = mirror along x (left–right), with p = 0.5;
- vertical flip = mirror along y (anterior–posterior), independently with p = 0.5 — the superior–inferior
  axis is never flipped (an upside-down head is no training case);
- rotation by an angle uniform in ±20° in the axial (x, y) plane, about the volume centre, p = 0.5 (the paper
  names no plane; the flips' axial convention is kept);
- translation by up to 10 % of the size along every axis (uniform, independently per axis), p = 0.5.

Images (x, y, z, C) are interpolated linearly with edge values repeated outside (z-scored background is
negative, not 0); the label (x, y, z), a soft tumour fraction in [0, 1], linearly with 0 outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

HORIZONTAL_AXIS = 0  # x, left–right
VERTICAL_AXIS = 1  # y, anterior–posterior
ROTATION_PLANE = (0, 1)  # axial


@dataclass(frozen=True)
class Augmentation:
    probability: float = 0.5
    max_rotation_deg: float = 20.0
    max_translation: float = 0.10  # fraction of the size along each axis


def _each_channel(image: np.ndarray, fn) -> np.ndarray:
    return np.stack([fn(image[..., c]) for c in range(image.shape[-1])], axis=-1).astype(np.float32)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            params: Augmentation = Augmentation()) -> tuple[np.ndarray, np.ndarray]:
    """One random draw of the augmentation applied to ``image`` (x, y, z, C) and ``label`` (x, y, z)."""
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label, dtype=np.float32)
    if image.shape[:3] != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} differ in their first three axes")
    for axis in (HORIZONTAL_AXIS, VERTICAL_AXIS):
        if rng.random() < params.probability:
            image, label = np.flip(image, axis), np.flip(label, axis)
    if rng.random() < params.probability:
        angle = float(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg))
        image = _each_channel(image, lambda v: ndi.rotate(v, angle, axes=ROTATION_PLANE, reshape=False, order=1,
                                                          mode="nearest"))
        label = ndi.rotate(label, angle, axes=ROTATION_PLANE, reshape=False, order=1, mode="constant", cval=0.0)
    if rng.random() < params.probability:
        shift = rng.uniform(-params.max_translation, params.max_translation, 3) * np.array(label.shape)
        image = _each_channel(image, lambda v: ndi.shift(v, shift, order=1, mode="nearest"))
        label = ndi.shift(label, shift, order=1, mode="constant", cval=0.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.clip(label, 0.0, 1.0).astype(np.float32)
