"""``bids_postop BIDS_DIR OUT_DIR group``: aggregate the cohort and, given manual annotations, reproduce the
study's validation (metrics, patient-wise classification, the paper's tables, inter-rater study, statistics)
with a report.

Files written under ``output_dir``:

- ``group_summary.tsv`` (+ ``.json`` dictionary): one row per participant/session and model;
- ``group/cohort.tsv``: GTR/RT counts and volume distributions per site;
- with ``manual``: ``group/patients.tsv``, ``group/sites.tsv``, ``group/folds.tsv`` and
  ``group/folds_pooled.tsv`` (when folds are known), ``group/overall.tsv``, ``group/paper_segmentation.tsv``
  and ``group/paper_classification.tsv`` (the paper's tables: validation and test columns per architecture ×
  configuration, :mod:`bids_postop.group.paper`), ``group/tests.tsv`` and, with two raters or more,
  ``group/raters.tsv`` and ``group/raters_summary.tsv`` — each with a JSON dictionary; every missing value is
  written ``n/a``;
- ``group_report.html`` with figures in ``group/figures/``.

The GTR cut-off: each participant's own rule (the measures TSV's ``gtr_cutoff_ml``/``gtr_inclusive``, else the
measures JSON) classifies its rows; ``reclassify=True`` applies ``gtr_cutoff_ml``/``gtr_inclusive`` to every
row instead. A cohort with mixed rules is flagged (notes, report, group_summary.json).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from bids_postop.core.postprocess import GTR_CUTOFF_ML
from bids_postop.errors import UsageError
from bids_postop.evaluation.classification import bootstrap_scores
from bids_postop.evaluation.interrater import (
    compare_models_with_raters,
    read_rater_groups,
    resolve_reference,
    summarize,
)
from bids_postop.evaluation.review import review_rows
from bids_postop.group import dictionaries as dd
from bids_postop.group import paper
from bids_postop.group.collect import (
    Key,
    Prediction,
    annotations_for,
    collect_annotations,
    collect_predictions,
    fold_and_set,
    read_folds,
)
from bids_postop.group.evaluate import evaluate_session
from bids_postop.group.report import GroupResults, write_report
from bids_postop.group.tables import cohort_rows, pooled_over_folds, summaries_by, write_table

MAIN = "main"
PROGRESS_EVERY = 100


def rule_text(cutoff_ml: float, inclusive: bool) -> str:
    return f"GTR if residual {'<=' if inclusive else '<'} {cutoff_ml:g} ml, else RT"


def _cutoffs(predictions: Mapping[str, list[Prediction]], *, reclassify: bool, cutoff_ml: float,
             gtr_inclusive: bool, notes: list[str]) -> tuple[Callable[[Prediction], tuple[float, bool, str]], str]:
    """The rule of each prediction, and the statement of which rules were used (mixed settings flagged)."""
    group_rule = rule_text(cutoff_ml, gtr_inclusive)

    def rule(p: Prediction) -> tuple[float, bool, str]:
        if reclassify:
            return cutoff_ml, gtr_inclusive, "group (--reclassify)"
        own_ml, own_inclusive = p.cutoff()
        if own_ml is None:
            return cutoff_ml, gtr_inclusive if own_inclusive is None else own_inclusive, \
                "group (the participant's cut-off is not recorded)"
        return own_ml, bool(own_inclusive), "participant"

    if reclassify:
        return rule, (f"Re-classified by the group level (--reclassify): {group_rule}, for every participant "
                      f"(their own rules are kept in group_summary.tsv).")
    used = Counter(rule_text(*rule(p)[:2]) + ("" if rule(p)[2] == "participant" else " (group default)")
                   for preds in predictions.values() for p in preds)
    statement = "Each participant's own rule, as the participant level applied it: " + "; ".join(
        f"{r} ({n} session(s))" for r, n in sorted(used.items())) + "."
    own = {r for r in used if not r.endswith("(group default)")}
    if len(own) > 1:
        statement += " MIXED SETTINGS: the participants were classified with different cut-offs; rerun with " \
                     "--reclassify to apply one rule to all."
        notes.append(f"mixed GTR cut-off settings across participants ({'; '.join(sorted(own))}): each row keeps "
                     f"its participant's rule; --reclassify applies {group_rule} to all")
    if any(r.endswith("(group default)") for r in used):
        notes.append(f"some measures record no cut-off (older outputs): {group_rule} (the group level's) is used for "
                     f"them")
    return rule, statement


def _confidence_extra(n_bootstrap: int, seed: int) -> Callable[[str, list], dict]:
    def extra(_source: str, rows: list) -> dict:
        out: dict = {}
        outcomes = [r["outcome"] for r in rows if r.get("status") == "ok"]
        cis = bootstrap_scores(outcomes, n_resamples=n_bootstrap, seed=seed) if n_bootstrap > 0 else {}
        for metric in ("recall", "specificity", "balanced_accuracy", "precision"):
            ci = cis.get(metric)
            out[f"{metric}_ci_low"] = ci.low if ci else None
            out[f"{metric}_ci_high"] = ci.high if ci else None
            out[f"{metric}_ci_reason"] = ci.reason if ci else "bootstrap disabled (n_bootstrap = 0)"
        return out
    return extra


def _methods(predictions: Mapping[str, list[Prediction]]) -> dict[str, str]:
    """Per model (source): the methods paragraph generated from what ran for its first participant."""
    from bids_postop.reports.boilerplate import RunDescription, methods_markdown

    out: dict[str, str] = {}
    every = [p for preds in predictions.values() for p in preds if p.model]
    # a participant-level run (it records what the backend ran) rather than a training's own-fold prediction
    for p in sorted(every, key=lambda p: p.cv_fold is not None):
        if p.source not in out:
            out[p.source] = methods_markdown(RunDescription.from_measures(
                {"model": p.model, "measures": p.measures, "provenance": p.provenance}))
    return out


def _summary_rule(prediction: Prediction, cutoff_rule: Callable) -> dict:
    """The row's GTR rule and call as the group level applies it: the participant's own, or with --reclassify the
    group's (the call recomputed from the residual volume)."""
    from bids_postop.core.postprocess import classify_resection

    cutoff_ml, inclusive, source = cutoff_rule(prediction)
    out = {"gtr_cutoff_ml": cutoff_ml, "gtr_inclusive": "true" if inclusive else "false", "gtr_rule_source": source}
    volume = str(prediction.row.get("residual_volume_ml", "")).strip()
    if source.startswith("group") and volume not in ("", "n/a"):
        out["resection_status"] = classify_resection(float(volume), cutoff_ml=cutoff_ml, gtr_inclusive=inclusive)
    return out


def run_group_level(output_dir: Path, *, bids_dir: Path, manual: Mapping[str, Path] | None = None,
                    rater_groups_tsv: Path | None = None, folds_tsv: Path | None = None,
                    compare: Mapping[str, Path] | None = None, gtr_cutoff_ml: float = GTR_CUTOFF_ML,
                    gtr_inclusive: bool = False, reclassify: bool = False, interrater_all_patients: bool = False,
                    n_bootstrap: int = 2000, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> list[Path]:
    """Run the group level; returns the files written (see the module docstring).

    ``manual``: name → manual-annotation derivatives dataset (raters as ``desc-<rater>`` or one dataset
    per rater); ``rater_groups_tsv``: columns ``rater``, ``group`` (novice/expert/…; ``reference`` marks
    the reference annotation); ``folds_tsv``: ``participant_id`` or ``site``, and ``fold`` (e.g.
    ``bids_postop-train``'s splits.tsv); ``compare``: name → further derivatives datasets of other models or
    configurations, evaluated alike (``output_dir`` may then hold no participant results of its own);
    ``reclassify``: classify every row with ``gtr_cutoff_ml``/``gtr_inclusive`` instead of each
    participant's own rule; ``interrater_all_patients``: inter-rater scores over every patient instead of the
    reference-positive ones.
    """
    say = progress or (lambda _message: None)
    output_dir, group_dir = Path(output_dir), Path(output_dir) / "group"
    if compare and MAIN in compare:
        raise UsageError(f"'{MAIN}' names the output directory itself; choose another name for the compared dataset")
    notes: list[str] = []
    datasets = {MAIN: Path(output_dir), **{k: Path(v) for k, v in (compare or {}).items()}}
    predictions = {name: collect_predictions(path, name, Path(bids_dir), notes=notes,
                                             required=not (name == MAIN and compare))
                   for name, path in datasets.items()}
    if not predictions[MAIN]:
        del predictions[MAIN]
        datasets.pop(MAIN)
    folds = read_folds(folds_tsv, Path(bids_dir))
    cutoff_rule, statement = _cutoffs(predictions, reclassify=reclassify, cutoff_ml=gtr_cutoff_ml,
                                      gtr_inclusive=gtr_inclusive, notes=notes)
    results = GroupResults(cutoff_rule=statement, cutoff_ml=gtr_cutoff_ml,
                           datasets={k: str(v) for k, v in datasets.items()}, notes=notes)
    placement = {(p.source, p.key): fold_and_set(p, folds) for preds in predictions.values() for p in preds}
    results.methods = _methods(predictions)
    summary_sources = [MAIN] if MAIN in predictions else list(predictions)
    results.summary = [{**p.row, **_summary_rule(p, cutoff_rule), "source": p.source,
                        "model": p.model_name or p.row.get("model"), "config": p.configuration,
                        "fold": placement[(p.source, p.key)][0], "set": placement[(p.source, p.key)][1]}
                       for name in summary_sources for p in predictions[name]]
    written = write_table(output_dir / "group_summary.tsv", results.summary, dd.group_summary(statement))
    results.cohort = cohort_rows(results.summary)
    written += write_table(group_dir / "cohort.tsv", results.cohort, dd.cohort())
    say(f"group: {len(results.summary)} session(s) aggregated from {', '.join(summary_sources)}")

    if manual:
        written += _validate(results, group_dir, predictions, manual, rater_groups_tsv=rater_groups_tsv,
                             placement=placement, cutoff_rule=cutoff_rule, cutoff_ml=gtr_cutoff_ml,
                             gtr_inclusive=gtr_inclusive, interrater_all=interrater_all_patients,
                             n_bootstrap=n_bootstrap, seed=seed, say=say)
    written += write_report(output_dir, results)
    say(f"group: report at {output_dir / 'group_report.html'}")
    return written


def _validate(results: GroupResults, group_dir: Path, predictions: Mapping[str, list[Prediction]],
              manual: Mapping[str, Path], *, rater_groups_tsv: Path | None, placement: Mapping,
              cutoff_rule: Callable, cutoff_ml: float, gtr_inclusive: bool, interrater_all: bool, n_bootstrap: int,
              seed: int, say: Callable[[str], None]) -> list[Path]:
    annotations, default_reference = collect_annotations({k: Path(v) for k, v in manual.items()},
                                                         notes=results.notes)
    groups = read_rater_groups(rater_groups_tsv) if rater_groups_tsv else {}
    raters = sorted({r for per in annotations.values() for r in per})
    reference = resolve_reference(raters, groups, default=default_reference)
    results.reference, results.rater_groups = reference, {r: groups.get(r, "unassigned") for r in raters}
    for name in sorted(set(groups) - set(raters)):
        results.notes.append(f"rater '{name}' of the rater-groups TSV has no annotation (raters found: {raters})")
    say(f"group: raters {raters}; reference annotation: {reference}")

    by_key: dict[Key, dict[str, Prediction]] = {}
    for preds in predictions.values():
        for p in preds:
            if p.source in by_key.setdefault(p.key, {}):
                results.notes.append(f"{p.source}: several results for {p.participant_id} {p.session_id or ''}; "
                                     f"the first ({by_key[p.key][p.source].mask}) is evaluated")
                continue
            by_key[p.key][p.source] = p
    unmatched = sorted((k for k in annotations if k not in by_key
                        and not (k[1] is None and any(b[0] == k[0] for b in by_key))), key=str)
    for key in unmatched:
        results.notes.append(f"sub-{key[0]} {('ses-' + key[1]) if key[1] else ''}: annotated but has no "
                             f"participant-level result")
    for i, (key, per_source) in enumerate(sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")), 1):
        session = evaluate_session(key, per_source, annotations_for(key, annotations), reference=reference,
                                   placement={s: placement[(s, key)] for s in per_source}, cutoff_rule=cutoff_rule,
                                   cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
        results.patients += session.patients
        results.raters += session.raters
        if i % PROGRESS_EVERY == 0 or i == len(by_key):
            say(f"group: evaluated {i}/{len(by_key)} session(s)")

    written = write_table(group_dir / "patients.tsv", results.patients, dd.patients(results.cutoff_rule))
    results.sites = summaries_by(results.patients, "site")
    written += write_table(group_dir / "sites.tsv", results.sites, dd.summary("site"))
    if any(r.get("fold") for r in results.patients):
        results.folds = summaries_by(results.patients, "fold")
        results.pooled = pooled_over_folds(results.folds)
        written += write_table(group_dir / "folds.tsv", results.folds, dd.summary("fold"))
        written += write_table(group_dir / "folds_pooled.tsv", results.pooled, dd.pooled())
    results.overall = summaries_by(results.patients, None, extra=_confidence_extra(n_bootstrap, seed))
    written += write_table(group_dir / "overall.tsv", results.overall, dd.summary(None, with_ci=True))

    units = paper.model_units(results.patients, results.notes)
    results.paper_segmentation, results.paper_classification = paper.tables(units, n_bootstrap=n_bootstrap,
                                                                             seed=seed)
    results.units = units
    if units:
        written += write_table(group_dir / "paper_segmentation.tsv", results.paper_segmentation,
                               dd.paper_segmentation())
        written += write_table(group_dir / "paper_classification.tsv", results.paper_classification,
                               dd.paper_classification())
        for line in paper.describe(results.paper_segmentation):
            say(f"group: {line}")
    elif results.patients:
        results.notes.append("no row belongs to a validation or test set (own-fold predictions of bids_postop-train, "
                             "a folds TSV or a 'fold' column in participants.tsv): the paper's tables are not written")
    tests, test_notes = paper.protocol_tests(units, results.paper_segmentation, results.paper_classification)
    results.notes += test_notes
    scored = [r for r in results.raters if r.get("status") == "ok"]
    if results.raters:
        results.raters_summary = summarize(scored, groups, reference=reference, positive_only=not interrater_all)
        tests += compare_models_with_raters(scored, groups, reference=reference, positive_only=not interrater_all)
        written += write_table(group_dir / "raters.tsv", results.raters, dd.raters())
        written += write_table(group_dir / "raters_summary.tsv", results.raters_summary, dd.raters_summary())
    results.review = review_rows(results.patients)
    if any(r["n_flag_known"] or r["n_scored"] for r in results.review):
        written += write_table(group_dir / "review.tsv", results.review, dd.review())
    results.tests = [t.as_dict() for t in tests]
    written += write_table(group_dir / "tests.tsv", results.tests, dd.tests())
    n_err = sum(r["status"] != "ok" for r in results.patients)
    if n_err:
        say(f"group: {n_err} session(s) not evaluated; reasons in {group_dir / 'patients.tsv'}")
    return written
