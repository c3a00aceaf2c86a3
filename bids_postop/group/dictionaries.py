"""JSON data dictionaries (BIDS style: column → Description, Units, Levels) of the group-level tables.

The definitions and the empty-mask policy live here, so that every table carries them.
"""

from __future__ import annotations

from bids_postop.bids.derivatives import COLUMN_DEFINITIONS

# participant-level columns passed through to group_summary.tsv (RANO measures, uncertainty)
PARTICIPANT_EXTRA_COLUMNS = ("rano_resect_class", "measurable_lesions", "sum_bidimensional_mm2", "review_flag",
                             "rt_fraction_members", "residual_volume_ml_min", "residual_volume_ml_max",
                             "mirror_score")
UNITS = {"sum_bidimensional_mm2": "mm^2", "residual_volume_ml_min": "ml", "residual_volume_ml_max": "ml"}

EMPTY_CELL = "n/a means unknown or undefined (never averaged as 0); cells of older outputs may be empty."
DICE_POLICY = ("Dice 2|A∩B|/(|A|+|B|) on the voxels of the post-op T1w-CE grid. Undefined (n/a, with the "
               "reason) when both masks are empty, which happens only for patients whose reference is "
               "negative; in the positive group P it is always defined (an empty prediction scores 0). The "
               "paper's 'Dice' over every patient counts two empty masks as 1, as the study authors' validation "
               "code does (its Dice is smoothed by ε = 0.1).")
HD95_POLICY = ("95th percentile of the pooled surface distances in both directions, in mm with the voxel "
               "spacing, as in MedPy (surface = mask XOR erosion with the connectivity-1 structuring element). "
               "Undefined (n/a, with the reason) when either mask is empty; left out of means, "
               "and counted in hd95_*_n_undefined.")
VOLUME_RULE = "voxel count × |det(affine)| / 1000, rounded to 1e-6 ml before the cut-off comparison"
SET_LEVELS = {"validation": "own-fold (cross-validation) prediction", "test": "held-out test set",
              "training": "ensemble prediction of a participant the model was trained on (in no table column)",
              "unknown": "no fold known"}

SUMMARY_COLUMNS = ("participant_id", "session_id", "site", "config", "model", "residual_volume_ml",
                   "resection_status", "preop_volume_ml", "eor_percent", "threshold", "gtr_cutoff_ml",
                   "gtr_inclusive", "not_for_clinical_use")


def d(description: str, units: str | None = None, levels: dict[str, str] | None = None) -> dict:
    out: dict = {"Description": description}
    if units:
        out["Units"] = units
    if levels:
        out["Levels"] = levels
    return out


def _ids() -> dict[str, dict]:
    return {"participant_id": d("Participant label (sub-<label>)"),
            "session_id": d("Post-operative session (ses-<label>); n/a when the dataset has no sessions")}


def group_summary(cutoff_statement: str) -> dict[str, dict]:
    """``cutoff_statement`` says which GTR rule(s) the participant level used (and flags mixed settings)."""
    return {
        "source": d("Derivatives dataset ('main' = the output directory; others from --compare)"),
        **_ids(),
        "site": d("Hospital, from the participant's measures TSV, else participants.tsv"),
        "config": d("Input configuration used (A–E)"), "model": d("Model name (from its model card)"),
        "residual_volume_ml": d(f"Residual tumour volume on the post-op T1w-CE grid ({VOLUME_RULE})", "ml"),
        "resection_status": d(f"Participant-level classification. {cutoff_statement}",
                              levels={"GTR": "gross total resection", "RT": "residual tumour"}),
        "preop_volume_ml": d("Pre-operative tumour volume", "ml"),
        "eor_percent": d("Extent of resection 100·(preop − residual)/preop, not clipped", "%"),
        "threshold": d("Probability threshold the participant level binarised at (model card)"),
        "gtr_cutoff_ml": d("GTR cut-off the participant level used (n/a: not recorded by older versions)", "ml"),
        "gtr_inclusive": d("true: a residual of exactly the cut-off is GTR (the study's code); false: RT (the "
                           "paper's text)"),
        "not_for_clinical_use": d("true when the model card says the model is not for clinical use"),
        "gtr_rule_source": d("whose GTR rule classified the row: the participant level's own, or the group's "
                             "(--reclassify; then resection_status is recomputed from the residual volume)"),
        **{column: d(COLUMN_DEFINITIONS[column], UNITS.get(column)) for column in PARTICIPANT_EXTRA_COLUMNS},
        "fold": d("Cross-validation fold or hold-out set (own-fold predictions: from the measures JSON; else the "
                  "folds TSV or participants.tsv; else the model card's test participants); n/a if unknown"),
        "set": d("Which column of the paper's tables the row belongs to", levels=SET_LEVELS),
    }


def _distribution(prefix: str, what: str, units: str) -> dict[str, dict]:
    return {f"{prefix}_{k}": d(f"{what}: {v}", units if k != "n" else None) for k, v in
            {"n": "number of known values", "mean": "mean", "sd": "sample sd (ddof 1)", "min": "minimum",
             "q1": "first quartile", "median": "median", "q3": "third quartile", "max": "maximum"}.items()}


def review() -> dict[str, dict]:
    """group/review.tsv: whether the participant level's review flag picks out the wrong calls (issue #20)."""
    bad = "a wrong GTR/RT call, or Dice < 0.5 on a reference-positive patient"
    return {"source": d("Compared model (dataset or dataset:model)"),
            "n_evaluated": d("Patients evaluated against the reference"),
            "n_flag_known": d("Patients with a review flag (n/a when the model had no members)"),
            "n_flagged": d("Patients flagged for review"), "n_unflagged": d("Patients not flagged"),
            "wrong_call_rate_flagged": d("Share of flagged patients whose GTR/RT call is wrong"),
            "wrong_call_rate_unflagged": d("Share of unflagged patients whose GTR/RT call is wrong"),
            "bad_rate_flagged": d(f"Share of flagged patients with {bad}"),
            "bad_rate_unflagged": d(f"Share of unflagged patients with {bad}"),
            "n_bad": d(f"Patients with {bad}"), "n_scored": d("Patients with an uncertainty score"),
            "auroc_score_bad": d(f"AUROC of the uncertainty score for {bad} (0.5: no separation)"),
            "n_positive_scored": d("Reference-positive patients (residual tumour in the reference) with a score"),
            "auroc_score_bad_positive": d("The same AUROC among reference-positive patients only (bad: a missed "
                                          "residual or Dice < 0.5); n/a without both bad and good ones"),
            "auroc_reason": d("Why the AUROC is n/a"),
            "n_mirror_scored": d("Patients with a mirror score (the score the review flag's threshold applies to)"),
            "auroc_mirror_score_bad": d(f"AUROC of the mirror score for {bad}"),
            "auroc_mirror_score_bad_positive": d("The same among reference-positive patients only")}


def cohort() -> dict[str, dict]:
    return {"site": d("Hospital; 'all' for the whole cohort, 'unknown' when not recorded"),
            "n_sessions": d("Number of sessions"), "n_GTR": d("Sessions classified GTR by the participant level"),
            "n_RT": d("Sessions classified RT by the participant level"),
            "n_status_unknown": d("Sessions without a classification"),
            "configs": d("Input configurations used, config:count"),
            **_distribution("residual_volume_ml", "residual tumour volume", "ml"),
            **_distribution("preop_volume_ml", "pre-operative tumour volume", "ml"),
            **_distribution("eor_percent", "extent of resection", "%"),
            "rano_classes": d("RANO resect classes of the participants, class:count (n/a: not decidable)"),
            "n_review_flagged": d("Sessions whose review_flag is true (the model's members disagree: check them)"),
            "n_review_known": d("Sessions with a review_flag (true or false; n/a when nothing varied)")}


def patients(cutoff_statement: str) -> dict[str, dict]:
    return {
        "source": d("Model evaluated: the derivatives dataset ('main' = the output directory; others from "
                    "--compare), '<dataset>:<model>' when a dataset holds several models"),
        **_ids(), "site": d("Hospital"), "fold": d("Fold; n/a if unknown"),
        "set": d("Which column of the paper's tables the row belongs to", levels=SET_LEVELS),
        "fold_source": d("Where the fold came from (measures JSON, folds TSV, model card)"),
        "architecture": d("Architecture from the model card (nnunet → nnU-Net, raidionics/agunet → AGU-Net)"),
        "config": d("Input configuration (model card)"), "model": d("Model name (model card)"),
        "status": d("Evaluation status", levels={"ok": "evaluated", "error": "masks unusable (see reason)",
                                                 "no_reference": "no usable reference annotation"}),
        "reason": d("Why the session was not evaluated"),
        "reference_rater": d("Rater whose annotation is the reference (ground truth)"),
        "predicted_volume_ml": d(f"Predicted residual volume, from the mask ({VOLUME_RULE})", "ml"),
        "true_volume_ml": d(f"Reference residual volume, from the manual mask ({VOLUME_RULE})", "ml"),
        "volume_error_ml": d("Predicted − true volume", "ml"), "abs_volume_error_ml": d("|volume_error_ml|", "ml"),
        "dice": d(DICE_POLICY), "dice_undefined_reason": d("Why dice is n/a"),
        "hd95_mm": d(HD95_POLICY, "mm"), "hd95_undefined_reason": d("Why hd95_mm is n/a"),
        "gtr_cutoff_ml": d(f"GTR cut-off used for this row's classifications. {cutoff_statement}", "ml"),
        "gtr_inclusive": d("true: exactly the cut-off is GTR; false: RT"),
        "gtr_rule_source": d("participant: the participant level's own rule (measures TSV/JSON); group: the group "
                             "level's --gtr-cutoff-ml/--gtr-inclusive (--reclassify, or the participant's rule "
                             "unknown)"),
        "true_status": d("Reference classification (this row's rule)"),
        "predicted_status": d("Predicted classification (this row's rule)"),
        "outcome": d("Patient-wise outcome", levels={
            "TP": "both positive and Dice >= 0.01", "TN": "both negative",
            "FP": "reference negative, prediction positive",
            "FN": "reference positive and prediction negative, or both positive with Dice < 0.01"}),
        "in_P": d("Reference positive (group P)"),
        "review_flag": d("The participant level's review flag (the model's members disagree, or the mirror score "
                         "exceeds the card's threshold); n/a without members"),
        "uncertainty_score": d("The participant level's uncertainty score (docs/uncertainty.md)"),
        "mirror_score": d("The participant level's mirror score (docs/uncertainty.md)"),
        "members_kind": d("What the members were: folds, mirrored passes or none"),
    }


def summary(level: str | None, *, with_ci: bool = False) -> dict[str, dict]:
    out = {"source": d("Model evaluated (see patients.tsv)"), "config": d("Input configurations in the group"),
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
        "recall": d("Patient-wise sensitivity TP/(TP+FN); n/a when TP+FN = 0"),
        "precision": d("Patient-wise precision TP/(TP+FP); n/a when TP+FP = 0"),
        "specificity": d("Patient-wise specificity TN/(TN+FP); n/a when TN+FP = 0"),
        "balanced_accuracy": d("(recall + specificity)/2; n/a when either is"),
        "dice_all_mean": d(f"Mean Dice over every evaluated patient, two empty masks scoring 1. {DICE_POLICY}"),
        "dice_all_sd": d("Sample sd (ddof 1) of dice_all"),
        "hd95_mm_mean": d(f"Mean HD95 over every evaluated patient where it is defined. {HD95_POLICY}", "mm"),
        "hd95_mm_sd": d("Sample sd of HD95 where defined", "mm"),
        "hd95_n_defined": d("Evaluated patients with a defined HD95 (both masks non-empty)"),
    })
    for group in ("P", "TP"):
        out[f"dice_{group}_mean"] = d(f"Mean Dice over group {group}. {DICE_POLICY}")
        out[f"dice_{group}_sd"] = d(f"Sample sd (ddof 1) of Dice over group {group}; n/a when fewer than 2")
        out[f"hd95_{group}_mm_mean"] = d(f"Mean HD95 over group {group} where defined. {HD95_POLICY}", "mm")
        out[f"hd95_{group}_mm_sd"] = d(f"Sample sd of HD95 over group {group} where defined", "mm")
        out[f"hd95_{group}_n_undefined"] = d(f"Patients of group {group} whose HD95 is undefined (empty prediction)")
    out["median_abs_volume_error_ml"] = d("Median absolute volume error over evaluated patients", "ml")
    out["median_abs_volume_error_ml_P"] = d("Median absolute volume error over group P", "ml")
    if with_ci:
        for m in ("recall", "specificity", "balanced_accuracy", "precision"):
            out[f"{m}_ci_low"] = d(f"Lower bound of the BCa bootstrap 95 % interval of {m} (resampling patients "
                                   "within the reference-positive and/or -negative groups, or the TP/FP patients "
                                   "for precision)")
            out[f"{m}_ci_high"] = d(f"Upper bound of the BCa bootstrap 95 % interval of {m}")
            out[f"{m}_ci_reason"] = d(f"Why the interval of {m} is n/a (too few patients, degenerate)")
    return out


def pooled() -> dict[str, dict]:
    return {"source": d("Model evaluated"), "metric": d("Metric pooled over the cross-validation folds"),
            "n_folds": d("Folds with a defined estimate (hold-out folds 'test'/'holdout' left out)"),
            "n_patients": d("Patients behind the estimates"), "folds": d("Folds used"),
            "pooled_mean": d("Per-patient metrics: fold-size-weighted mean; rates: mean weighted by fold size"),
            "pooled_sd": d("Per-patient metrics: combined-sample sd (ddof 1); rates: sd of the fold values"),
            "pooling": d("How pooled_mean and pooled_sd were formed"),
            "fold_mean": d("Mean of the per-fold estimates"), "fold_sd": d("Sample sd of the per-fold estimates"),
            "normal_ci_low": d("fold_mean − z(0.975)·fold_sd/√n_folds"),
            "normal_ci_high": d("fold_mean + z(0.975)·fold_sd/√n_folds")}


_MODEL = {"architecture": d("Architecture, from the model card"),
          "configuration": d("Input configuration, from the model card"), "model": d("Model name"),
          "sources": d("Datasets the model's rows came from")}
_SEG = {"dice": "Dice over every patient (two empty masks = 1)", "dice_P": "Dice over reference-positive patients",
        "dice_TP": "Dice over true-positive patients", "hd95_mm": "HD95 over patients with both masks non-empty"}
_CLS = {"recall": "Patient-wise recall (sensitivity)", "precision": "Patient-wise precision",
        "specificity": "Patient-wise specificity", "balanced_accuracy": "Patient-wise balanced accuracy"}


def paper_segmentation() -> dict[str, dict]:
    out = dict(_MODEL)
    out["validation_n"] = d("Validation patients evaluated (own-fold predictions)")
    out["validation_n_folds"] = d("Folds behind the validation columns")
    out["validation_n_P"] = d("Validation patients with a positive reference")
    for metric, what in _SEG.items():
        units = "mm" if metric == "hd95_mm" else None
        out[f"{metric}_validation_mean"] = d(f"{what}, validation: fold-size-weighted mean over the folds (= mean "
                                             f"over every validation patient)", units)
        out[f"{metric}_validation_sd"] = d(f"{what}, validation: combined-sample sd over the folds (ddof 1)", units)
    out["ave_ml_validation_median"] = d("Median absolute volume error over every validation patient", "ml")
    out["test_n"] = d("Test patients evaluated (fold ensemble on the held-out site)")
    out["test_n_P"] = d("Test patients with a positive reference")
    for metric, what in _SEG.items():
        units = "mm" if metric == "hd95_mm" else None
        out[f"{metric}_test_mean"] = d(f"{what}, test set: mean", units)
        out[f"{metric}_test_sd"] = d(f"{what}, test set: sample sd (ddof 1)", units)
    out["ave_ml_test_median"] = d("Median absolute volume error over the test patients", "ml")
    return out


def paper_classification() -> dict[str, dict]:
    out = dict(_MODEL)
    out["validation_n"] = d("Validation patients evaluated (own-fold predictions)")
    out["validation_n_folds"] = d("Folds behind the validation columns")
    for metric, what in _CLS.items():
        out[f"{metric}_validation_mean"] = d(f"{what}, validation: mean of the fold values weighted by fold size")
        out[f"{metric}_validation_sd"] = d(f"{what}, validation: sd of the fold values")
        out[f"{metric}_validation_ci_low"] = d(f"{what}, validation: lower bound of the normal 95 % interval over "
                                               f"the folds, mean − z(0.975)·sd/√k of the k fold values")
        out[f"{metric}_validation_ci_high"] = d(f"{what}, validation: upper bound of that interval")
    out["test_n"] = d("Test patients evaluated (fold ensemble on the held-out site)")
    for k in ("TP", "TN", "FP", "FN"):
        out[f"test_{k}"] = d(f"{k} patients of the test set")
    for metric, what in _CLS.items():
        out[f"{metric}_test"] = d(f"{what}, test set")
        out[f"{metric}_test_ci_low"] = d(f"{what}, test set: lower bound of the BCa bootstrap 95 % interval")
        out[f"{metric}_test_ci_high"] = d(f"{what}, test set: upper bound of the BCa bootstrap 95 % interval")
        out[f"{metric}_test_ci_reason"] = d(f"Why the interval of {metric} is n/a")
    return out


def raters() -> dict[str, dict]:
    return {**_ids(), "site": d("Hospital"), "fold": d("Fold"),
            "annotator": d("Rater (desc entity or dataset name) or model (source name)"),
            "kind": d("rater or model"),
            "target": d("What the annotator is scored against", levels={
                "reference": "the reference annotation", "consensus": "voxel-wise majority of the raters"}),
            "status": d("ok, or error when the rater's mask is unusable (see reason)"),
            "reference_positive": d("The reference annotation holds residual tumour (>= the GTR cut-off): the "
                                    "patients the inter-rater results are reported over by default"),
            "dice": d("Dice against the target; n/a when both masks are empty"),
            "jaccard": d("Jaccard J = D/(2 − D); n/a when both masks are empty"),
            "reason": d("Why dice/jaccard are n/a, or why the mask is unusable"),
            "consensus_of": d("Raters forming the consensus (more than half must mark a voxel); for target "
                              "'reference', the reference rater")}


def raters_summary() -> dict[str, dict]:
    return {"target": d("reference or consensus"), "annotator": d("Rater, model, or rater group"),
            "kind": d("rater, model, or rater group average (per patient, then over patients)"),
            "group": d("Rater group from the rater-groups TSV ('unassigned' if absent); 'model' for models; the "
                       "members for group averages"),
            "patients": d("Which patients: reference-positive (default, as the paper) or all"),
            "n": d("Patients with a defined Jaccard"), "n_undefined": d("Patients where both masks were empty"),
            "jaccard_mean": d("Mean Jaccard"), "jaccard_sd": d("Sample sd of Jaccard"),
            "jaccard_median": d("Median Jaccard")}


def tests() -> dict[str, dict]:
    return {"test": d("Statistical test"), "compares": d("What is compared"),
            "scope": d("On which patients"),
            "origin": d("paper: the study's analysis; addition: not in the paper (paired tests for repeated "
                        "measures on the same patients)"),
            "metric": d("Per-patient values or score compared"),
            "group_a": d("First group"), "group_b": d("Second group"), "n_a": d("Values in group a"),
            "n_b": d("Values in group b"),
            "statistic": d("Test statistic (U of group a; Tukey: mean difference; Wilcoxon: W; Friedman: chi²; "
                           "interval overlap: overlap length)"),
            "p_value": d("p-value (Tukey: adjusted for all pairs)"), "estimate": d("Effect estimate"),
            "estimate_name": d("What estimate is"), "ci_low": d("Tukey: lower 95 % simultaneous confidence bound"),
            "ci_high": d("Tukey: upper 95 % simultaneous confidence bound"),
            "significant": d("p < 0.05; interval overlap: true when the two intervals do not overlap"),
            "reason": d("Why the test was not computed")}
