"""Per-participant visual reports: figures made in the pipeline, HTML rebuilt from them.

``figures`` draws the reportlets (slice mosaics, registration flicker checks) from NIfTI files;
``html`` assembles ``<output_dir>/sub-X.html`` from those figures and the session's measures JSON, and
rebuilds every report from what is already in the output directory (``--reports-only``).
"""

from bids_postop.reports.figures import (
    brain_mask_figure,
    preop_mask_figure,
    registration_check,
    residual_mosaic,
)
from bids_postop.reports.html import (
    existing_figures,
    figure_filename,
    rebuild_reports,
    render_participant_report,
)

__all__ = ["brain_mask_figure", "existing_figures", "figure_filename", "preop_mask_figure", "rebuild_reports",
           "registration_check", "render_participant_report", "residual_mosaic"]
