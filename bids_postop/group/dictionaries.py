"""JSON data dictionaries (BIDS style: column → Description, Units, Levels) of the group-level tables.

The definitions and the empty-mask policy live here, so that every table carries them.
"""

from __future__ import annotations

from bids_postop.bids.derivatives import SUMMARY_COLUMNS

EMPTY_CELL = "An empty cell means unknown or undefined; it is never averaged as 0."
DICE_POLICY = ("Dice 2|A∩B|/(|A|+|B|) on the voxels of the post-op T1w-CE grid. Undefined (empty cell, with "
               "the reason) when both masks are empty, which happens only for patients whose reference is "
               "negative; in the positive group P it is always defined (an empty prediction scores 0).")
HD95_POLICY = ("95th percentile of the pooled surface distances in both directions, in mm with the voxel "
               "spacing, as in MedPy (surface = mask XOR erosion with the connectivity-1 structuring element). "
               "Undefined (empty cell, with the reason) when either mask is empty; left out of means, "
               "and counted in hd95_*_n_undefined.")


def d(description: str, units: str | None = None, levels: dict[str, str] | None = None) -> dict:
    out: dict = {"Description": description}
    if units:
        out["Units"] = units
    if levels:
        out["Levels"] = levels
    return out


def _ids() -> dict[str, dict]:
    return {"participant_id": d("Participant label (sub-<label>)"),
            "session_id": d("Post-operative session (ses-<label>); empty when the dataset has no sessions")}


def group_summary(cutoff_rule: str) -> dict[str, dict]:
    descriptions = {
        "site": d("Hospital, from the participant's measures TSV, else participants.tsv"),
        "config": d("Input configuration used (A–E)"), "model": d("Model name"),
        "residual_volume_ml": d("Residual tumour volume on the post-op T1w-CE grid", "ml"),
        "resection_status": d(f"Participant-level classification ({cutoff_rule})",
                              levels={"GTR": "gross total resection", "RT": "residual tumour"}),
        "preop_volume_ml": d("Pre-operative tumour volume", "ml"),
        "eor_percent": d("Extent of resection 100·(preop − residual)/preop, not clipped", "%"),
    }
    out = {**_ids(), **{c: descriptions[c] for c in SUMMARY_COLUMNS if c in descriptions}}
    out["fold"] = d("Cross-validation fold or hold-out set, from the folds TSV or participants.tsv; empty if unknown")
    return out


def _distribution(prefix: str, what: str, units: str) -> dict[str, dict]:
    return {f"{prefix}_{k}": d(f"{what}: {v}", units if k != "n" else None) for k, v in
            {"n": "number of known values", "mean": "mean", "sd": "sample sd (ddof 1)", "min": "minimum",
             "q1": "first quartile", "median": "median", "q3": "third quartile", "max": "maximum"}.items()}


def cohort() -> dict[str, dict]:
    return {"site": d("Hospital; 'all' for the whole cohort, 'unknown' when not recorded"),
            "n_sessions": d("Number of sessions"), "n_GTR": d("Sessions classified GTR by the participant level"),
            "n_RT": d("Sessions classified RT by the participant level"),
            "n_status_unknown": d("Sessions without a classification"),
            "configs": d("Input configurations used, config:count"),
            **_distribution("residual_volume_ml", "residual tumour volume", "ml"),
            **_distribution("preop_volume_ml", "pre-operative tumour volume", "ml"),
            **_distribution("eor_percent", "extent of resection", "%")}


def patients(cutoff_rule: str) -> dict[str, dict]:
    return {
        "source": d("Derivatives dataset evaluated ('main' = the output directory; others from --compare)"),
        **_ids(), "site": d("Hospital"), "fold": d("Fold; empty if unknown"), "config": d("Input configuration"),
        "model": d("Model name"),
        "status": d("Evaluation status", levels={"ok": "evaluated", "error": "masks unusable (see reason)",
                                                 "no_reference": "no usable reference annotation"}),
        "reason": d("Why the session was not evaluated"),
        "reference_rater": d("Rater whose annotation is the reference (ground truth)"),
        "predicted_volume_ml": d("Predicted residual volume, from the mask", "ml"),
        "true_volume_ml": d("Reference residual volume, from the manual mask", "ml"),
        "volume_error_ml": d("Predicted − true volume", "ml"), "abs_volume_error_ml": d("|volume_error_ml|", "ml"),
        "dice": d(DICE_POLICY), "dice_undefined_reason": d("Why dice is empty"),
        "hd95_mm": d(HD95_POLICY, "mm"), "hd95_undefined_reason": d("Why hd95_mm is empty"),
        "true_status": d(f"Reference classification ({cutoff_rule})"),
        "predicted_status": d(f"Predicted classification ({cutoff_rule})"),
        "outcome": d("Patient-wise outcome", levels={
            "TP": "both positive and Dice >= 0.01", "TN": "both negative",
            "FP": "reference negative, prediction positive",
            "FN": "reference positive and prediction negative, or both positive with Dice < 0.01"}),
        "in_P": d("Reference positive (group P)"),
    }


def summary(level: str | None, *, with_ci: bool = False) -> dict[str, dict]:
    out = {"source": d("Derivatives dataset"), "config": d("Input configurations in the group"),
           "model": d("Models in the group")}
    if level:
        out[level] = d(f"{level.capitalize()} ('unknown' when not recorded)")
    out.update({
        "n_sessions": d("Sessions in the group"), "n_evaluated": d("Sessions evaluated (status ok)"),
        "n_errors": d("Sessions with unusable masks (see patients.tsv)"),
        "n_no_reference": d("Sessions without a usable reference annotation"),
        "n_P": d("Evaluated patients with a positive reference (group P)"),
        "n_TP_group": d("Evaluated patients with outcome TP (group TP)"),
        "TP": d("True positives"), "TN": d("True negatives"), "FP": d("False positives"),
        "FN": d("False negatives"),
        "recall": d("Patient-wise sensitivity TP/(TP+FN); empty when TP+FN = 0"),
        "precision": d("Patient-wise precision TP/(TP+FP); empty when TP+FP = 0"),
        "specificity": d("Patient-wise specificity TN/(TN+FP); empty when TN+FP = 0"),
        "balanced_accuracy": d("(recall + specificity)/2; empty when either is"),
    })
    for group in ("P", "TP"):
        out[f"dice_{group}_mean"] = d(f"Mean Dice over group {group}. {DICE_POLICY}")
        out[f"dice_{group}_sd"] = d(f"Sample sd (ddof 1) of Dice over group {group}; empty when fewer than 2")
        out[f"hd95_{group}_mm_mean"] = d(f"Mean HD95 over group {group} where defined. {HD95_POLICY}", "mm")
        out[f"hd95_{group}_mm_sd"] = d(f"Sample sd of HD95 over group {group} where defined", "mm")
        out[f"hd95_{group}_n_undefined"] = d(f"Patients of group {group} whose HD95 is undefined (empty prediction)")
    out["median_abs_volume_error_ml"] = d("Median absolute volume error over evaluated patients", "ml")
    out["median_abs_volume_error_ml_P"] = d("Median absolute volume error over group P", "ml")
    if with_ci:
        for m in ("recall", "specificity", "balanced_accuracy"):
            out[f"{m}_ci_low"] = d(f"Lower bound of the BCa bootstrap 95 % interval of {m} (resampling patients "
                                   "within the reference-positive and/or -negative groups)")
            out[f"{m}_ci_high"] = d(f"Upper bound of the BCa bootstrap 95 % interval of {m}")
            out[f"{m}_ci_reason"] = d(f"Why the interval of {m} is empty (too few patients, degenerate)")
    return out


def pooled() -> dict[str, dict]:
    return {"source": d("Derivatives dataset"), "metric": d("Metric pooled over the cross-validation folds"),
            "n_folds": d("Folds with a defined estimate (hold-out folds 'test'/'holdout' left out)"),
            "n_patients": d("Patients behind the estimates"), "folds": d("Folds used"),
            "pooled_mean": d("Per-patient metrics: fold-size-weighted mean; rates: mean weighted by fold size"),
            "pooled_sd": d("Per-patient metrics: combined-sample sd (ddof 1); rates: sd of the fold values"),
            "pooling": d("How pooled_mean and pooled_sd were formed"),
            "fold_mean": d("Mean of the per-fold estimates"), "fold_sd": d("Sample sd of the per-fold estimates"),
            "normal_ci_low": d("fold_mean − z(0.975)·fold_sd/√n_folds"),
            "normal_ci_high": d("fold_mean + z(0.975)·fold_sd/√n_folds")}


def raters() -> dict[str, dict]:
    return {**_ids(), "site": d("Hospital"), "fold": d("Fold"),
            "annotator": d("Rater (desc entity or dataset name) or model (dataset name)"),
            "kind": d("rater or model"),
            "target": d("What the annotator is scored against", levels={
                "reference": "the reference annotation", "consensus": "voxel-wise majority of the raters"}),
            "status": d("ok, or error when the rater's mask is unusable (see reason)"),
            "dice": d("Dice against the target; empty when both masks are empty"),
            "jaccard": d("Jaccard J = D/(2 − D); empty when both masks are empty"),
            "reason": d("Why dice/jaccard are empty, or why the mask is unusable"),
            "consensus_of": d("Raters forming the consensus (more than half must mark a voxel); for target "
                              "'reference', the reference rater")}


def raters_summary() -> dict[str, dict]:
    return {"target": d("reference or consensus"), "annotator": d("Rater or model"), "kind": d("rater or model"),
            "group": d("Rater group from the rater-groups TSV ('unassigned' if absent); 'model' for models"),
            "n": d("Patients with a defined Jaccard"), "n_undefined": d("Patients where both masks were empty"),
            "jaccard_mean": d("Mean Jaccard"), "jaccard_sd": d("Sample sd of Jaccard"),
            "jaccard_median": d("Median Jaccard")}


def tests() -> dict[str, dict]:
    return {"test": d("Statistical test"), "metric": d("Per-patient values compared"),
            "group_a": d("First group"), "group_b": d("Second group"), "n_a": d("Values in group a"),
            "n_b": d("Values in group b"), "statistic": d("Test statistic (U of group a; Tukey: mean difference)"),
            "p_value": d("p-value (Tukey: adjusted for all pairs)"), "estimate": d("Effect estimate"),
            "estimate_name": d("What estimate is"), "ci_low": d("Tukey: lower 95 % simultaneous confidence bound"),
            "ci_high": d("Tukey: upper 95 % simultaneous confidence bound"),
            "significant": d("p < 0.05"), "reason": d("Why the test was not computed")}
