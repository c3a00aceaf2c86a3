"""Report figures ("reportlets") made inside the workflow, and the participant's HTML page."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from bids_postop.interfaces.core import ROLE_TRAITS

REGISTERED = tuple(r for r in ROLE_TRAITS if r not in ("postop_t1ce", "preop_mask"))


class _FiguresInputSpec(BaseInterfaceInputSpec):
    part = traits.Enum("all", "residual", "registration", usedefault=True,
                       desc="residual: mosaic and brain mask; registration: registration checks and the pre-op mask "
                            "(they need no segmentation, so they run beside it); all: both")
    t1ce = File(exists=True, mandatory=True)
    residual_mask = File(exists=True)
    probseg = File(exists=True)
    brain_mask = File(exists=True, mandatory=True)
    postop_t1 = File(exists=True, desc="post-op T1w registered to the T1w-CE")
    postop_flair = File(exists=True, desc="post-op FLAIR registered to the T1w-CE")
    preop_t1ce = File(exists=True, desc="pre-op T1w-CE registered to the post-op T1w-CE")
    preop_mask = File(exists=True, desc="pre-op tumour mask registered to the post-op T1w-CE")


class _FiguresOutputSpec(TraitedSpec):
    figures = traits.Dict(traits.Str, traits.Str)


class ReportFigures(SimpleInterface):
    """The figures of the participant report, drawn from files on the post-op T1w-CE grid."""

    input_spec = _FiguresInputSpec
    output_spec = _FiguresOutputSpec

    def _run_interface(self, runtime):
        from bids_postop.reports import figures as fig

        cwd = Path(runtime.cwd)
        i = self.inputs
        made = {}
        with fig.shared_loading():  # the T1w-CE and the brain mask are read once for all the figures
            if i.part in ("all", "residual"):
                if not (isdefined(i.residual_mask) and isdefined(i.probseg)):
                    raise ValueError("the residual figures need residual_mask and probseg")
                made["mosaic"] = fig.residual_mosaic(i.t1ce, i.residual_mask, i.probseg, i.brain_mask,
                                                     cwd / "mosaic.png")
                made["brainmask"] = fig.brain_mask_figure(i.t1ce, i.brain_mask, cwd / "brainmask.png")
            if i.part in ("all", "registration"):
                for role in REGISTERED:
                    moving = getattr(i, role)
                    if isdefined(moving):
                        made[f"registration_{role}"] = fig.registration_check(
                            i.t1ce, moving, cwd / f"registration_{role}.svg", brain_mask=i.brain_mask)
                if isdefined(i.preop_t1ce) and isdefined(i.preop_mask):
                    made["preopmask"] = fig.preop_mask_figure(i.preop_t1ce, i.preop_mask, cwd / "preopmask.png")
        self._results["figures"] = {k: str(v) for k, v in made.items()}
        return runtime


class _ReportInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Either(None, traits.Str, mandatory=True)
    figures = traits.Dict(traits.Str, traits.Str, mandatory=True)
    inputs = traits.Dict(traits.Str, traits.Str, mandatory=True)
    warnings = traits.List(traits.Str)
    out_files = traits.List(traits.Str, mandatory=True, desc="derivatives written (measures JSON among them)")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True)


class ParticipantReport(SimpleInterface):
    """Copy the figures into ``sub-X/figures`` and write ``sub-X.html`` (rewritten after the run with its
    run time and errors)."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        from bids_postop.reports.html import render_participant_report

        measures = next((Path(f) for f in self.inputs.out_files if f.endswith("_measures.json")), None)
        out = render_participant_report(
            Path(self.inputs.output_dir), self.inputs.subject, self.inputs.session, measures_json=measures,
            figures={k: Path(v) for k, v in self.inputs.figures.items()}, inputs=dict(self.inputs.inputs),
            warnings=list(self.inputs.warnings) if isdefined(self.inputs.warnings) else [])
        self._results["out_report"] = str(out)
        return runtime
