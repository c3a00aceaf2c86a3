"""Thin nipype interface: the figure of the residual's bidimensional measures (reports.diameters)."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _DiametersInputSpec(BaseInterfaceInputSpec):
    t1ce = File(exists=True, mandatory=True, desc="post-op T1w-CE")
    measures = File(exists=True, mandatory=True, desc="PostProcess measures JSON (key 'bidimensional')")
    figures = traits.Dict(traits.Str, traits.Str, usedefault=True, desc="the report's other figures")
    more_figures = traits.Dict(traits.Str, traits.Str, usedefault=True, desc="more of them (another figures node)")


class _DiametersOutputSpec(TraitedSpec):
    figures = traits.Dict(traits.Str, traits.Str, desc="the other figures plus 'diameters' when drawn")


class DiametersFigure(SimpleInterface):
    """Add the figure of the residual's two perpendicular axial diameters to the report's figures."""

    input_spec = _DiametersInputSpec
    output_spec = _DiametersOutputSpec

    def _run_interface(self, runtime):
        from bids_postop.reports.diameters import diameters_figure

        figures = {**self.inputs.more_figures, **self.inputs.figures}
        shape = json.loads(Path(self.inputs.measures).read_text()).get("bidimensional") or {}
        out = diameters_figure(self.inputs.t1ce, shape, Path(runtime.cwd) / "diameters.png")
        if out is not None:
            figures["diameters"] = str(out)
        self._results["figures"] = figures
        return runtime
