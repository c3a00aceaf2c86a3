"""The participant workflow: inputs → registration → brain → segmentation → post-processing → outputs.

Workflow factories follow the nipreps convention ``init_<name>_wf(*, ..., name=...)``: keyword-only
options, node names equal to variable names, and no global settings read inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_postop.bids.derivatives import bids_uri
from bids_postop.bids.inputs import ParticipantInputs
from bids_postop.interfaces.core import (
    ApplyBrainMask,
    ApplyTransforms,
    BrainExtraction,
    PostProcess,
    Register,
    Segment,
)
from bids_postop.interfaces.derivatives import DerivativesSink
from bids_postop.interfaces.reports import ParticipantReport, ReportFigures
from bids_postop.segmentation.models import ModelCard

# Same-session scans move only rigidly between series; the pre-op scan needs deformable registration.
REGISTRATION_KIND = {"postop_t1": "rigid", "postop_flair": "rigid", "preop_t1ce": "syn"}


def init_participant_wf(
    *,
    inputs: ParticipantInputs,
    card: ModelCard,
    output_dir: Path,
    bids_dir: Path,
    brain_method: str = "deepbet",
    device: str = "auto",
    omp_nthreads: int = 1,
    use_mirroring: bool = True,
    min_component_voxels: int = 20,
    gtr_cutoff_ml: float = 0.175,
    gtr_inclusive: bool = False,
    provenance: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """Build the workflow of one participant's post-operative session for one model.

    Only the inputs the model's configuration uses are registered and fed to the network; the pre-op
    tumour mask, when present, always gives the pre-op volume and the extent of resection.

    Inputs are the participant's files (``inputs.files``); outputs are written by ``ds_outputs`` into
    ``output_dir``.
    """
    workflow = pe.Workflow(name=name or f"sub_{inputs.subject}_wf")
    used = [r for r in card.channels if r in inputs.files]
    fields = sorted(set(used) | ({"preop_mask"} & set(inputs.files)))
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    for role in fields:
        setattr(inputnode.inputs, role, str(inputs.files[role]))

    figures = pe.Node(ReportFigures(), name="figures", mem_gb=1)
    brain_extraction = pe.Node(BrainExtraction(method=brain_method, device=device, threads=omp_nthreads),
                               name="brain_extraction", mem_gb=2.5)
    segment = pe.Node(Segment(model_folder=str(card.folder), device=device, threads=omp_nthreads,
                              use_mirroring=use_mirroring), name="segment", mem_gb=4)
    skullstrip_postop_t1ce = pe.Node(ApplyBrainMask(), name="skullstrip_postop_t1ce")
    workflow.connect([
        (inputnode, brain_extraction, [("postop_t1ce", "in_file")]),
        (inputnode, skullstrip_postop_t1ce, [("postop_t1ce", "in_file")]),
        (brain_extraction, skullstrip_postop_t1ce, [("out_file", "mask")]),
        (skullstrip_postop_t1ce, segment, [("out_file", "postop_t1ce")]),
        (brain_extraction, segment, [("out_file", "brain_mask")]),
    ])

    for role in used:
        if role in ("postop_t1ce", "preop_mask"):
            continue
        register = pe.Node(Register(kind=REGISTRATION_KIND[role], threads=omp_nthreads),
                           name=f"register_{role}", mem_gb=1.5)
        resample = pe.Node(ApplyTransforms(interpolation="linear"), name=f"resample_{role}")
        skullstrip = pe.Node(ApplyBrainMask(), name=f"skullstrip_{role}")
        workflow.connect([
            (inputnode, register, [("postop_t1ce", "fixed"), (role, "moving")]),
            (inputnode, resample, [("postop_t1ce", "reference"), (role, "moving")]),
            (register, resample, [("transforms", "transforms")]),
            (resample, skullstrip, [("out_file", "in_file")]),
            (brain_extraction, skullstrip, [("out_file", "mask")]),
            (skullstrip, segment, [("out_file", role)]),
            (resample, figures, [("out_file", role)]),
        ])
        if role == "preop_t1ce":
            # the brain mask keeps the deformable registration away from skull and cavity differences
            workflow.connect(brain_extraction, "out_file", register, "fixed_mask")
            if "preop_mask" in card.channels:
                resample_mask = pe.Node(ApplyTransforms(interpolation="nearest"), name="resample_preop_mask")
                workflow.connect([
                    (inputnode, resample_mask, [("postop_t1ce", "reference"), ("preop_mask", "moving")]),
                    (register, resample_mask, [("transforms", "transforms")]),
                    (resample_mask, segment, [("out_file", "preop_mask")]),
                    (resample_mask, figures, [("out_file", "preop_mask")]),
                ])

    postprocess = pe.Node(PostProcess(threshold=card.threshold, min_component_voxels=min_component_voxels,
                                      gtr_cutoff_ml=gtr_cutoff_ml, gtr_inclusive=gtr_inclusive),
                          name="postprocess")
    sources = {role: str(inputs.files[role]) for role in fields}
    ds_outputs = pe.Node(DerivativesSink(
        output_dir=str(output_dir), bids_dir=str(bids_dir), subject=inputs.subject,
        session=inputs.postop_session, site=inputs.site, sources=sources, configuration=card.configuration,
        model=card.provenance(), provenance=dict(provenance or {})), name="ds_outputs", run_without_submitting=True)
    workflow.connect([
        (segment, postprocess, [("out_file", "probseg")]),
        (segment, ds_outputs, [("out_file", "probseg")]),
        (postprocess, ds_outputs, [("residual_mask", "residual_mask"), ("measures", "measures")]),
        (brain_extraction, ds_outputs, [("out_file", "brain_mask")]),
    ])
    if "preop_mask" in fields:
        workflow.connect(inputnode, "preop_mask", postprocess, "preop_mask")

    ds_report = pe.Node(ParticipantReport(
        output_dir=str(output_dir), subject=inputs.subject, session=inputs.postop_session,
        inputs={role: bids_uri(Path(p), bids_dir) for role, p in sources.items()}, warnings=list(inputs.notes)),
        name="ds_report", run_without_submitting=True)
    workflow.connect([
        (inputnode, figures, [("postop_t1ce", "t1ce")]),
        (postprocess, figures, [("residual_mask", "residual_mask")]),
        (segment, figures, [("out_file", "probseg")]),
        (brain_extraction, figures, [("out_file", "brain_mask")]),
        (figures, ds_report, [("figures", "figures")]),
        (ds_outputs, ds_report, [("out_files", "out_files")]),
    ])
    return workflow
