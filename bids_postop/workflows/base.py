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
from bids_postop.bids.inputs import NONENHANCING_ROLE, ParticipantInputs
from bids_postop.interfaces.core import PostProcess, Segment
from bids_postop.interfaces.derivatives import DerivativesSink
from bids_postop.interfaces.measures import DiametersFigure
from bids_postop.interfaces.reports import ParticipantReport, ReportFigures
from bids_postop.segmentation.models import ResolvedModel
from bids_postop.workflows.channels import REGISTRATION_KIND, init_channels_wf


def init_participant_wf(
    *,
    inputs: ParticipantInputs,
    model: ResolvedModel,
    output_dir: Path,
    bids_dir: Path,
    brain_method: str = "deepbet",
    brain_model: str | None = None,
    device: str = "auto",
    omp_nthreads: int = 1,
    use_mirroring: bool = True,
    trust_checkpoint: bool = False,
    fast: bool = False,
    precision: str = "fp32",
    nnunet_engine: str = "auto",
    min_component_voxels: int = 20,
    gtr_cutoff_ml: float = 0.175,
    gtr_inclusive: bool = False,
    provenance: Mapping[str, Any] | None = None,
    derivatives: Mapping[str, Path] | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """Build the workflow of one participant's post-operative session for one model.

    ``model`` is the run's resolved model (:func:`bids_postop.segmentation.models.resolve`): its content digest is
    an input of the segmentation node, so a work directory's cached probability map is reused only for the same
    model bytes; its label names the derivatives. Multi-threaded nodes declare ``n_procs=omp_nthreads`` so that
    the scheduler never runs more threads at once than its ``n_procs``.

    Only the inputs the model's configuration uses are registered and fed to the network; the pre-op
    tumour mask, when present, always gives the pre-op volume and the extent of resection.
    ``fast`` runs only the model's first fold (the caller also turns mirroring off: ``--fast``);
    ``precision`` and ``nnunet_engine`` say how nnU-Net networks run on the CPU (``--precision``,
    ``--nnunet-engine``).

    Inputs are the participant's files (``inputs.files``); outputs are written by ``ds_outputs`` into
    ``output_dir``.
    """
    workflow = pe.Workflow(name=name or f"sub_{inputs.subject}_wf")
    card = model.card
    used = [r for r in card.channels if r in inputs.files]
    fields = sorted(set(used) | ({"preop_mask"} & set(inputs.files)))
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    for role in fields:
        setattr(inputnode.inputs, role, str(inputs.files[role]))

    channels_wf = init_channels_wf(roles=used, brain_method=brain_method, brain_model=brain_model, device=device,
                                   omp_nthreads=omp_nthreads)
    # the report's figures in two nodes: the registration checks need no segmentation and run beside it
    figures = pe.Node(ReportFigures(part="residual"), name="figures", mem_gb=1)
    registration_figures = pe.Node(ReportFigures(part="registration"), name="registration_figures", mem_gb=1)
    segment = pe.Node(Segment(model_folder=str(card.folder), model_digest=model.digest, device=device,
                              threads=omp_nthreads,
                              use_mirroring=use_mirroring, trust_checkpoint=trust_checkpoint,
                              first_fold_only=fast, precision=precision, nnunet_engine=nnunet_engine,
                              threshold=card.threshold, min_component_voxels=min_component_voxels,
                              gtr_cutoff_ml=gtr_cutoff_ml, gtr_inclusive=gtr_inclusive),
                      name="segment", mem_gb=4, n_procs=omp_nthreads)
    # Published Raidionics models get what the official pipeline feeds them: the registered scans, not skull-stripped
    # (their pre_processing.ini crops with the brain mask where it says so); other models get the skull-stripped
    # channels they were trained on.
    unstripped = card.architecture == "raidionics" and card.details.get("input_images") == "registered"
    segment_sources = [(inputnode, role) if unstripped and role == "postop_t1ce"
                       else (channels_wf, f"outputnode.{role}_registered") if unstripped and role in REGISTRATION_KIND
                       else (channels_wf, f"outputnode.{role}") for role in used]
    workflow.connect([
        (inputnode, channels_wf, [(f"{role}", f"inputnode.{role}") for role in used]),
        *[(node, segment, [(field, role)]) for (node, field), role in zip(segment_sources, used, strict=True)],
        (channels_wf, segment, [("outputnode.brain_mask", "brain_mask")]),
        (channels_wf, registration_figures, [(f"outputnode.{role}_registered", role) for role in used
                                if role in REGISTRATION_KIND]),
    ])
    if "preop_mask" in used:
        workflow.connect(channels_wf, "outputnode.preop_mask", registration_figures, "preop_mask")

    postprocess = pe.Node(PostProcess(threshold=card.threshold, min_component_voxels=min_component_voxels,
                                      gtr_cutoff_ml=gtr_cutoff_ml, gtr_inclusive=gtr_inclusive),
                          name="postprocess")
    sources = {role: str(inputs.files[role]) for role in fields}
    ds_outputs = pe.Node(DerivativesSink(
        output_dir=str(output_dir), bids_dir=str(bids_dir), subject=inputs.subject,
        session=inputs.postop_session, site=inputs.site, sources=sources, configuration=card.configuration,
        derivatives={name: str(path) for name, path in (derivatives or {}).items()},
        model=model.provenance(), provenance=dict(provenance or {})), name="ds_outputs",
        run_without_submitting=True)
    workflow.connect([
        (segment, postprocess, [("out_file", "probseg")]),
        (segment, ds_outputs, [("out_file", "probseg"), ("run_info", "segmentation_run"),
                               ("uncertainty", "uncertainty"), ("uncertainty_json", "uncertainty_json")]),
        (postprocess, ds_outputs, [("residual_mask", "residual_mask"), ("measures", "measures")]),
        (channels_wf, ds_outputs, [("outputnode.brain_mask", "brain_mask")]),
    ])
    if "preop_mask" in fields:
        workflow.connect(inputnode, "preop_mask", postprocess, "preop_mask")
    if NONENHANCING_ROLE in inputs.files:  # a measured volume only (RANO resect class 1 vs 2A)
        postprocess.inputs.nonenhancing_mask = str(inputs.files[NONENHANCING_ROLE])

    diameters = pe.Node(DiametersFigure(), name="diameters", mem_gb=0.5)
    ds_report = pe.Node(ParticipantReport(
        output_dir=str(output_dir), subject=inputs.subject, session=inputs.postop_session,
        inputs={role: bids_uri(Path(p), bids_dir, derivatives=derivatives) for role, p in sources.items()},
        warnings=list(inputs.notes)),
        name="ds_report", run_without_submitting=True)
    workflow.connect([
        (inputnode, figures, [("postop_t1ce", "t1ce")]),
        (postprocess, figures, [("residual_mask", "residual_mask")]),
        (segment, figures, [("out_file", "probseg")]),
        (channels_wf, figures, [("outputnode.brain_mask", "brain_mask")]),
        (figures, diameters, [("figures", "figures")]),
        (registration_figures, diameters, [("figures", "more_figures")]),
        (inputnode, registration_figures, [("postop_t1ce", "t1ce")]),
        (channels_wf, registration_figures, [("outputnode.brain_mask", "brain_mask")]),
        (inputnode, diameters, [("postop_t1ce", "t1ce")]),
        (postprocess, diameters, [("measures", "measures")]),
        (diameters, ds_report, [("figures", "figures")]),
        (ds_outputs, ds_report, [("out_files", "out_files")]),
    ])
    return workflow
