"""``bids_postop BIDS_DIR OUT_DIR group``: aggregate the cohort and, given manual annotations, reproduce the
study's validation (metrics, patient-wise classification, inter-rater study, statistics) with a report.

Files written under ``output_dir``:

- ``group_summary.tsv`` (+ ``.json`` dictionary): one row per participant/session;
- ``group/cohort.tsv``: GTR/RT counts and volume distributions per site;
- with ``manual``: ``group/patients.tsv``, ``group/sites.tsv``, ``group/folds.tsv`` and
  ``group/folds_pooled.tsv`` (when folds are known), ``group/overall.tsv``, ``group/tests.tsv`` and, with
  two raters or more, ``group/raters.tsv`` and ``group/raters_summary.tsv`` — each with a JSON dictionary;
- ``group_report.html`` with figures in ``group/figures/``.
"""

from __future__ import annotations

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
from bids_postop.evaluation.stats import Comparison, mann_whitney, tukey_hsd
from bids_postop.group import dictionaries as dd
from bids_postop.group.collect import (
    Key,
    Prediction,
    annotations_for,
    collect_annotations,
    collect_predictions,
    fold_of,
    read_folds,
)
from bids_postop.group.evaluate import evaluate_session
from bids_postop.group.report import GroupResults, write_report
from bids_postop.group.tables import cohort_rows, pooled_over_folds, summaries_by, write_table

MAIN = "main"
PROGRESS_EVERY = 100


def architecture(model: str) -> str:
    """Architecture of a model from its name: nnU-Net, AGU-Net (Raidionics full-volume models), else the name."""
    name = model.lower()
    if "nnunet" in name or "nnu-net" in name:
        return "nnU-Net"
    if "agunet" in name or "agu-net" in name or "raidionics" in name or "_fv_" in name:
        return "AGU-Net"
    return model or "unknown"


def _confidence_extra(n_bootstrap: int, seed: int) -> Callable[[str, list], dict]:
    def extra(_source: str, rows: list) -> dict:
        out: dict = {}
        outcomes = [r["outcome"] for r in rows if r.get("status") == "ok"]
        cis = bootstrap_scores(outcomes, n_resamples=n_bootstrap, seed=seed) if n_bootstrap > 0 else {}
        for metric in ("recall", "specificity", "balanced_accuracy"):
            ci = cis.get(metric)
            out[f"{metric}_ci_low"] = ci.low if ci else None
            out[f"{metric}_ci_high"] = ci.high if ci else None
            out[f"{metric}_ci_reason"] = ci.reason if ci else "bootstrap disabled (n_bootstrap = 0)"
        return out
    return extra


def _model_tests(patients: list[dict], sources: list[str]) -> list[Comparison]:
    pos = [r for r in patients if r.get("status") == "ok" and r["in_P"]]
    tests: list[Comparison] = []
    if len(sources) > 1:
        tests += tukey_hsd({s: [r["dice"] for r in pos if r["source"] == s] for s in sources},
                           metric="Dice on P, between datasets")
    configs = sorted({r["config"] for r in pos if r.get("config")})
    if len(configs) > 1:
        tests += tukey_hsd({c: [r["dice"] for r in pos if r["config"] == c] for c in configs},
                           metric="Dice on P, between configurations")
    archs = sorted({architecture(r.get("model") or "") for r in pos})
    for i, a in enumerate(archs):
        for b in archs[i + 1:]:
            tests.append(mann_whitney([r["dice"] for r in pos if architecture(r.get("model") or "") == a],
                                      [r["dice"] for r in pos if architecture(r.get("model") or "") == b],
                                      name_a=a, name_b=b, metric="Dice on P, between architectures"))
    return tests


def run_group_level(output_dir: Path, *, bids_dir: Path, manual: Mapping[str, Path] | None = None,
                    rater_groups_tsv: Path | None = None, folds_tsv: Path | None = None,
                    compare: Mapping[str, Path] | None = None, gtr_cutoff_ml: float = GTR_CUTOFF_ML,
                    gtr_inclusive: bool = False, n_bootstrap: int = 2000, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> list[Path]:
    """Run the group level; returns the files written (see the module docstring).

    ``manual``: name → manual-annotation derivatives dataset (raters as ``desc-<rater>`` or one dataset
    per rater); ``rater_groups_tsv``: columns ``rater``, ``group`` (novice/expert/…; ``reference`` marks
    the reference annotation); ``folds_tsv``: ``participant_id`` or ``site``, and ``fold``; ``compare``:
    name → further derivatives datasets of other models or configurations, evaluated alike.
    """
    say = progress or (lambda _message: None)
    output_dir, group_dir = Path(output_dir), Path(output_dir) / "group"
    if compare and MAIN in compare:
        raise UsageError(f"'{MAIN}' names the output directory itself; choose another name for the compared dataset")
    cutoff_rule = f"GTR if residual {'<=' if gtr_inclusive else '<'} {gtr_cutoff_ml} ml, else RT"
    datasets = {MAIN: Path(output_dir), **{k: Path(v) for k, v in (compare or {}).items()}}
    predictions = {name: collect_predictions(path, name, Path(bids_dir)) for name, path in datasets.items()}
    folds = read_folds(folds_tsv, Path(bids_dir))
    results = GroupResults(cutoff_rule=cutoff_rule, cutoff_ml=gtr_cutoff_ml,
                           datasets={k: str(v) for k, v in datasets.items()})

    results.summary = [{**p.row, "fold": fold_of(p, folds)} for p in predictions[MAIN]]
    written = write_table(output_dir / "group_summary.tsv", results.summary, dd.group_summary(cutoff_rule))
    results.cohort = cohort_rows(results.summary)
    written += write_table(group_dir / "cohort.tsv", results.cohort, dd.cohort())
    say(f"group: {len(results.summary)} session(s) aggregated from {output_dir}")

    if manual:
        written += _validate(results, group_dir, predictions, manual, rater_groups_tsv=rater_groups_tsv,
                             folds=folds, cutoff_ml=gtr_cutoff_ml, gtr_inclusive=gtr_inclusive,
                             n_bootstrap=n_bootstrap, seed=seed, say=say)
    written += write_report(output_dir, results)
    say(f"group: report at {output_dir / 'group_report.html'}")
    return written


def _validate(results: GroupResults, group_dir: Path, predictions: Mapping[str, list[Prediction]],
              manual: Mapping[str, Path], *, rater_groups_tsv: Path | None, folds: tuple[dict, dict],
              cutoff_ml: float, gtr_inclusive: bool, n_bootstrap: int, seed: int, say: Callable[[str], None]
              ) -> list[Path]:
    annotations, default_reference = collect_annotations({k: Path(v) for k, v in manual.items()})
    groups = read_rater_groups(rater_groups_tsv) if rater_groups_tsv else {}
    raters = sorted({r for per in annotations.values() for r in per})
    reference = resolve_reference(raters, groups, default=default_reference)
    results.reference, results.rater_groups = reference, {r: groups.get(r, "unassigned") for r in raters}
    for name in sorted(set(groups) - set(raters)):
        results.notes.append(f"rater '{name}' of the rater-groups TSV has no annotation (raters found: {raters})")
    say(f"group: raters {raters}; reference annotation: {reference}")

    by_key: dict[Key, dict[str, Prediction]] = {}
    for source, preds in predictions.items():
        for p in preds:
            if source in by_key.setdefault(p.key, {}):
                results.notes.append(f"{source}: several results for {p.participant_id} {p.session_id or ''}; "
                                     f"the first ({by_key[p.key][source].mask}) is evaluated")
                continue
            by_key[p.key][source] = p
    unmatched = sorted((k for k in annotations if k not in by_key
                        and not (k[1] is None and any(b[0] == k[0] for b in by_key))), key=str)
    for key in unmatched:
        results.notes.append(f"sub-{key[0]} {('ses-' + key[1]) if key[1] else ''}: annotated but has no "
                             f"participant-level result")
    for i, (key, per_source) in enumerate(sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")), 1):
        first = next(iter(per_source.values()))
        session = evaluate_session(key, per_source, annotations_for(key, annotations), reference=reference,
                                   fold=fold_of(first, folds), cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
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

    tests = _model_tests(results.patients, list(predictions))
    scored = [r for r in results.raters if r.get("status") == "ok"]
    if results.raters:
        results.raters_summary = summarize(scored, groups)
        tests += compare_models_with_raters(scored, groups, reference=reference)
        written += write_table(group_dir / "raters.tsv", results.raters, dd.raters())
        written += write_table(group_dir / "raters_summary.tsv", results.raters_summary, dd.raters_summary())
    results.tests = [t.as_dict() for t in tests]
    written += write_table(group_dir / "tests.tsv", results.tests, dd.tests())
    n_err = sum(r["status"] != "ok" for r in results.patients)
    if n_err:
        say(f"group: {n_err} session(s) not evaluated; reasons in {group_dir / 'patients.tsv'}")
    return written
