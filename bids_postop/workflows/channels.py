"""The inputs of a model, prepared: registered to the post-op T1w-CE and skull-stripped.

Shared by the participant level and the training data preparation, so that a model sees at inference
exactly the preprocessing it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_postop.configurations import Role
from bids_postop.interfaces.core import ApplyBrainMask, ApplyTransforms, BrainExtraction, Register

# Same-session scans move only rigidly between series; the pre-op scan needs deformable registration.
REGISTRATION_KIND = {"postop_t1": "rigid", "postop_flair": "rigid", "preop_t1ce": "syn"}


def init_channels_wf(
    *,
    roles: Sequence[Role],
    brain_method: str = "deepbet",
    brain_model: str | None = None,
    device: str = "auto",
    omp_nthreads: int = 1,
    name: str = "channels_wf",
) -> pe.Workflow:
    """Register every requested input to the post-op T1w-CE, extract the brain, skull-strip.

    Inputs (``inputnode``): one field per role in ``roles`` (``postop_t1ce`` always; ``preop_mask``
    needs ``preop_t1ce``, whose transforms it follows with nearest-neighbour interpolation).

    Outputs (``outputnode``): one field per role, on the post-op T1w-CE grid (images skull-stripped,
    float32; the pre-op mask uint8 0/1); ``brain_mask``; ``<role>_registered`` for each registered image
    before skull stripping (for the report).

    ``brain_method`` is ``deepbet``, ``hdbet`` or ``raidionics``; ``brain_model`` is the Raidionics brain
    model folder (resolved, :func:`bids_postop.segmentation.raidionics_brain.resolve_brain_model`) that
    ``raidionics`` needs.
    """
    if brain_method == "raidionics" and not brain_model:
        raise ValueError("brain_method 'raidionics' needs brain_model (a Raidionics brain model folder)")
    roles = list(dict.fromkeys(["postop_t1ce", *roles]))
    if "preop_mask" in roles and "preop_t1ce" not in roles:
        raise ValueError("the pre-op tumour mask needs the pre-op T1w-CE (it follows that scan's registration)")
    registered = [r for r in roles if r in REGISTRATION_KIND]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=roles), name="inputnode")
    outputnode = pe.Node(IdentityInterface(
        fields=[*roles, "brain_mask", *(f"{r}_registered" for r in registered)]), name="outputnode")

    brain_extraction = pe.Node(BrainExtraction(method=brain_method, device=device, threads=omp_nthreads),
                               name="brain_extraction", mem_gb=2.5, n_procs=omp_nthreads)
    if brain_method == "raidionics":
        brain_extraction.inputs.model_folder = str(brain_model)
    skullstrip_postop_t1ce = pe.Node(ApplyBrainMask(), name="skullstrip_postop_t1ce")
    workflow.connect([
        (inputnode, brain_extraction, [("postop_t1ce", "in_file")]),
        (inputnode, skullstrip_postop_t1ce, [("postop_t1ce", "in_file")]),
        (brain_extraction, skullstrip_postop_t1ce, [("out_file", "mask")]),
        (skullstrip_postop_t1ce, outputnode, [("out_file", "postop_t1ce")]),
        (brain_extraction, outputnode, [("out_file", "brain_mask")]),
    ])
    for role in registered:
        # estimated on ~2 mm copies cut to the brain box (core.registration.DEFAULT_SETTINGS: 0.3-0.8 GiB peak on a
        # 430×461×180 grid), applied once to the full-resolution image by the resample node
        register = pe.Node(Register(kind=REGISTRATION_KIND[role], threads=omp_nthreads),
                           name=f"register_{role}", mem_gb=1.0, n_procs=omp_nthreads)
        resample = pe.Node(ApplyTransforms(interpolation="linear"), name=f"resample_{role}")
        skullstrip = pe.Node(ApplyBrainMask(), name=f"skullstrip_{role}")
        workflow.connect([
            (inputnode, register, [("postop_t1ce", "fixed"), (role, "moving")]),
            (inputnode, resample, [("postop_t1ce", "reference"), (role, "moving")]),
            (register, resample, [("transforms", "transforms")]),
            (resample, skullstrip, [("out_file", "in_file")]),
            (brain_extraction, skullstrip, [("out_file", "mask")]),
            (skullstrip, outputnode, [("out_file", role)]),
            (resample, outputnode, [("out_file", f"{role}_registered")]),
            # The metric is computed inside the post-op brain mask, for every registration: it keeps the deformable
            # (pre-op) registration away from skull and cavity differences, and the mask's box (+20 mm) is the
            # region the registration works on (benchmarks/registration_accuracy.py, RESULTS.md).
            (brain_extraction, register, [("out_file", "fixed_mask")]),
        ])
        if role == "preop_t1ce":
            if "preop_mask" in roles:
                resample_preop_mask = pe.Node(ApplyTransforms(interpolation="nearest"), name="resample_preop_mask")
                workflow.connect([
                    (inputnode, resample_preop_mask, [("postop_t1ce", "reference"), ("preop_mask", "moving")]),
                    (register, resample_preop_mask, [("transforms", "transforms")]),
                    (resample_preop_mask, outputnode, [("out_file", "preop_mask")]),
                ])
    return workflow
