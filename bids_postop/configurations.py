"""Input configurations of the study (SPEC.md) and the channel roles they are made of.

A *role* names one input image of a patient. A *configuration* (A–E) is the ordered list of roles a
model takes as its input channels, in that order.
"""

from __future__ import annotations

from typing import Final, Literal

Role = Literal["postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask"]
ConfigName = Literal["A", "B", "C", "D", "E"]

ROLES: Final[tuple[Role, ...]] = ("postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask")

ROLE_DESCRIPTIONS: Final[dict[Role, str]] = {
    "postop_t1ce": "post-operative contrast-enhanced T1w (ses-<postop>/anat/*_ce-<label>_T1w.nii[.gz])",
    "postop_t1": "post-operative T1w without contrast (ses-<postop>/anat/*_T1w.nii[.gz], no ce- entity)",
    "postop_flair": "post-operative FLAIR (ses-<postop>/anat/*_FLAIR.nii[.gz])",
    "preop_t1ce": "pre-operative contrast-enhanced T1w (ses-<preop>/anat/*_ce-<label>_T1w.nii[.gz])",
    "preop_mask": "pre-operative tumour mask (derivatives: ses-<preop>/anat/*_label-tumor[_desc-*]_mask.nii[.gz])",
}

CONFIGURATIONS: Final[dict[ConfigName, tuple[Role, ...]]] = {
    "A": ("postop_t1ce",),
    "B": ("postop_t1ce", "postop_t1"),
    "C": ("postop_t1ce", "postop_t1", "postop_flair"),
    "D": ("postop_t1ce", "postop_t1", "preop_t1ce", "preop_mask"),
    "E": ("postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask"),
}

# Richest first: the automatic choice takes the first configuration whose inputs and model exist.
RICHEST_FIRST: Final[tuple[ConfigName, ...]] = ("E", "D", "C", "B", "A")


def choose_configuration(
    available: set[str] | frozenset[str], model_configs: set[str] | frozenset[str], requested: str = "auto"
) -> ConfigName | None:
    """Return the configuration to use, or ``None`` when none is possible.

    ``available`` holds the roles found for a participant; ``model_configs`` the configurations that
    the chosen model(s) cover. ``requested`` is ``"auto"`` (richest possible) or one letter, which is
    used only when the participant has all its inputs.
    """
    candidates = RICHEST_FIRST if requested == "auto" else (requested,)
    for name in candidates:
        if name in model_configs and set(CONFIGURATIONS[name]) <= set(available):
            return name  # type: ignore[return-value]
    return None
