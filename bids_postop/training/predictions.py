"""Cross-validation predictions as BIDS derivatives: what the group level reads as the validation set.

``bids_postop-train`` predicts every validation participant with its own fold's network (the model trained
without that participant's hospital) to choose the threshold. This module writes those predictions —
probability, residual mask (the chosen threshold, components < 20 voxels removed, as at inference), brain
mask and measures — through the participant level's writer
(:func:`bids_postop.bids.derivatives.write_session_outputs`), into the model's predictions dataset
``WORK_DIR[/agunet]/predictions/<CONFIG>/``. The test site's participants are predicted there by the
participant level with the fold ensemble, so one dataset holds a model's validation and test sets.

Each measures JSON records ``provenance.cross_validation`` = ``{"set": "validation", "fold": k, ...}``: the
group level takes the fold from it (and the ``test`` fold of the held-out participants from the model card's
``training.test_participants`` or ``splits.tsv``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_postop.training.threshold import ValidationCase

LOG = logging.getLogger("bids_postop.training")
CV_KEY = "cross_validation"


def predictions_dir(work_dir: Path, architecture: str, config: str) -> Path:
    """The predictions dataset of one model: beside the architecture's models, so that an nnU-Net and an AGU-Net
    model of the same configuration trained in one WORK_DIR never overwrite each other."""
    return (work_dir / "agunet" if architecture == "agunet" else work_dir) / "predictions" / config


def write_validation_predictions(out_dir: Path, bids_dir: Path, cases: Sequence[ValidationCase], *,
                                 participants: Mapping[str, Any], prepared: Mapping[str, Any], model_dir: Path,
                                 config: str, threshold: float, splits_tsv: Path | None = None,
                                 provenance: Mapping[str, Any] | None = None, min_component_voxels: int = 20,
                                 gtr_cutoff_ml: float = 0.175, gtr_inclusive: bool = False) -> list[Path]:
    """Write each validation participant's own-fold prediction into ``out_dir``; return the measures JSONs.

    ``participants``: ``sub-X`` → :class:`~bids_postop.bids.inputs.ParticipantInputs` (original files, for the
    Sources fields); ``prepared``: ``sub-X`` → :class:`~bids_postop.training.datasets.PreparedCase` (the
    skull-stripped post-op T1w-CE gives the brain mask).
    """
    from bids_postop.bids.derivatives import write_dataset_description, write_session_outputs
    from bids_postop.configurations import CONFIGURATIONS
    from bids_postop.core.images import load_3d, write_like
    from bids_postop.core.postprocess import postprocess_probability, volume_ml
    from bids_postop.segmentation.models import read_card

    card = read_card(model_dir)
    model = {**card.provenance(), "threshold": float(threshold)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out_dir, bids_dir)
    roles = CONFIGURATIONS[config]  # type: ignore[index]
    written = []
    with tempfile.TemporaryDirectory(prefix="bids_postop_cv_") as tmp_name:
        tmp = Path(tmp_name)
        for case in cases:
            inputs = participants[case.participant_id]
            reference = load_3d(inputs.files["postop_t1ce"], what="post-operative T1w-CE")
            probability = np.asarray(case.probability, dtype=np.float32)
            preop_ml = None
            if "preop_mask" in inputs.files:
                preop = load_3d(inputs.files["preop_mask"], what="pre-operative tumour mask")
                preop_ml = volume_ml(np.asanyarray(preop.dataobj) > 0, preop.affine)
            mask, measures = postprocess_probability(
                probability, reference.affine, threshold=threshold, min_component_voxels=min_component_voxels,
                cutoff_ml=gtr_cutoff_ml, gtr_inclusive=gtr_inclusive, preop_volume_ml=preop_ml)
            stripped = load_3d(prepared[case.participant_id].channels["postop_t1ce"], what="prepared T1w-CE")
            brain = np.asanyarray(stripped.dataobj) != 0
            files = {name: write_like(data, reference, tmp / f"{case.participant_id}_{name}.nii.gz", dtype=dtype)
                     for name, data, dtype in (("prob", probability, np.float32), ("mask", mask, np.uint8),
                                               ("brain", brain, np.uint8))}
            sources = {r: Path(inputs.files[r]) for r in (*roles, "preop_mask") if r in inputs.files}
            cv = {"set": "validation", "fold": case.fold,
                  "prediction": f"fold {case.fold}'s network alone (trained without this participant's hospital), "
                                "not the fold ensemble",
                  "threshold_rule": (provenance or {}).get("threshold_rule"),
                  **({"splits": str(splits_tsv)} if splits_tsv else {})}
            outputs = write_session_outputs(
                out_dir, bids_dir, subject=inputs.subject, session=inputs.postop_session, site=inputs.site,
                sources=sources, residual_mask=files["mask"], residual_probseg=files["prob"],
                brain_mask=files["brain"], measures=measures.as_dict(), model=model, configuration=config,
                extra_provenance={**dict(provenance or {}), CV_KEY: cv, "segmentation": dict(case.segmentation),
                                  "brain_extraction": {**dict((provenance or {}).get("brain_extraction") or {}),
                                                       "mask": "non-zero voxels of the skull-stripped post-op "
                                                               "T1w-CE of the training data preparation"}})
            written.append(outputs.measures_json)
    LOG.info("[%s] %d cross-validation prediction(s) written to %s", config, len(written), out_dir)
    return written
