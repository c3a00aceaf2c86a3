"""The nipype end of the one derivatives writer (:mod:`bids_postop.bids.derivatives`)."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits


class _SinkInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Either(None, traits.Str, mandatory=True)
    site = traits.Either(None, traits.Str, mandatory=True)
    sources = traits.Dict(traits.Str, traits.Str, mandatory=True, desc="role -> input file used")
    derivatives = traits.Dict(traits.Str, traits.Str, desc="-d datasets (name -> folder) for bids: URIs")
    configuration = traits.Str(mandatory=True)
    model = traits.Dict(mandatory=True, desc="model card provenance")
    provenance = traits.Dict(desc="extra provenance (versions, command line)")
    residual_mask = File(exists=True, mandatory=True)
    probseg = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    measures = File(exists=True, mandatory=True)
    uncertainty = File(exists=True, desc="members' spread map on the T1w-CE grid (absent without members)")
    uncertainty_json = File(exists=True, desc="the members' uncertainty and review flag (core.uncertainty)")
    segmentation_run = File(exists=True, desc="segment.json: what the backend ran (engine after any fallback, "
                                              "precision, folds, mirroring, tile step)")


class _SinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str)


class DerivativesSink(SimpleInterface):
    """Write one post-op session's derivatives atomically into the output dataset."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True  # cheap, and the output folder may have been cleaned since the cached run

    def _run_interface(self, runtime):
        from bids_postop.bids.derivatives import write_session_outputs

        outputs = write_session_outputs(
            Path(self.inputs.output_dir), Path(self.inputs.bids_dir),
            subject=self.inputs.subject, session=self.inputs.session, site=self.inputs.site,
            sources={k: Path(v) for k, v in self.inputs.sources.items()},
            residual_mask=Path(self.inputs.residual_mask), residual_probseg=Path(self.inputs.probseg),
            brain_mask=Path(self.inputs.brain_mask), measures=json.loads(Path(self.inputs.measures).read_text()),
            model=self.inputs.model, configuration=self.inputs.configuration,
            extra_provenance=self._provenance(),
            derivatives={k: Path(v) for k, v in (self.inputs.derivatives or {}).items()},
            uncertainty=json.loads(Path(self.inputs.uncertainty_json).read_text())
            if isdefined(self.inputs.uncertainty_json) else None,
            uncertainty_map=Path(self.inputs.uncertainty) if isdefined(self.inputs.uncertainty) else None)
        self._results["out_files"] = [str(p) for p in outputs.all_files()]
        return runtime

    def _provenance(self) -> dict | None:
        """The run's provenance, with what the segmentation backend actually ran (``provenance.preset`` says
        what was asked: an engine that failed fell back to torch)."""
        provenance = dict(self.inputs.provenance or {})
        if isdefined(self.inputs.segmentation_run):
            provenance["segmentation"] = json.loads(Path(self.inputs.segmentation_run).read_text())
        return provenance or None
