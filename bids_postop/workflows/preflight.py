"""Checks of every input file before any processing, so that bad files are reported by name up front.

A bad optional input (T1w, FLAIR, pre-op scan or mask) is dropped with a note, and the participant
falls back to a configuration without it; a bad post-op contrast T1w leaves the participant without
its required input, so it is skipped with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bids_postop.bids.inputs import NONENHANCING_ROLE, ParticipantInputs
from bids_postop.core.images import load_3d
from bids_postop.core.masks import load_binary_mask, mask_matches_image, nonenhancing_volume_ml
from bids_postop.errors import InputDataError

MIN_AXIS_VOXELS = 8


def check_image(path, *, what: str) -> None:
    """Raise :class:`InputDataError` when an image cannot serve as input."""
    img = load_3d(path, what=what)
    if min(img.shape) < MIN_AXIS_VOXELS:
        raise InputDataError(f"the {what} has shape {img.shape}: fewer than {MIN_AXIS_VOXELS} voxels on an axis",
                             path)
    data = np.asanyarray(img.dataobj)
    if float(data.max()) == float(data.min()):
        raise InputDataError(f"the {what} is constant (every voxel = {float(data.min())})", path)


def check_participant_inputs(inputs: ParticipantInputs) -> ParticipantInputs:
    """Return ``inputs`` without the files that cannot be used, each dropped file explained in notes."""
    files = dict(inputs.files)
    notes = list(inputs.notes)
    for role in ("postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce"):
        if role in files:
            try:
                check_image(files[role], what=role.replace("_", " "))
            except InputDataError as exc:
                notes.append(f"{role} unusable, ignored: {exc}")
                del files[role]
    if NONENHANCING_ROLE in files:
        try:
            nonenhancing_volume_ml(files[NONENHANCING_ROLE])
        except InputDataError as exc:
            notes.append(f"{NONENHANCING_ROLE} unusable, ignored: {exc}")
            del files[NONENHANCING_ROLE]
    if "preop_mask" in files:
        try:
            mask = load_binary_mask(files["preop_mask"], what="pre-operative tumour mask")
            if "preop_t1ce" not in files:
                raise InputDataError("no usable pre-operative T1w-CE to go with it", files["preop_mask"])
            image = load_3d(files["preop_t1ce"], what="pre-operative T1w-CE")
            if not mask_matches_image(mask, image):
                raise InputDataError(
                    f"the pre-operative tumour mask's grid (shape {mask.shape}) differs from its image "
                    f"{files['preop_t1ce'].name} (shape {image.shape}); masks must lie on their image's grid",
                    files["preop_mask"])
        except InputDataError as exc:
            notes.append(f"preop_mask unusable, ignored: {exc}")
            del files["preop_mask"]
    return dataclasses.replace(inputs, files=files, notes=tuple(notes))
