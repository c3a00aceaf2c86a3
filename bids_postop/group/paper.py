"""The study's result tables and statistics, in the paper's shape and scope.

Tables (one row per model: architecture × configuration, both from the model card):

- ``paper_segmentation.tsv``: validation and test columns of Dice (every patient, two empty masks scoring 1,
  as the authors' validation code), Dice-P (reference-positive patients), Dice-TP (true-positive patients),
  HD95 (patients where both masks are non-empty) and the median absolute volume error (AVE);
- ``paper_classification.tsv``: validation and test columns of patient-wise recall, precision, specificity
  and balanced accuracy.

Validation = the own-fold (cross-validation) predictions, pooled over the folds as the study's validation
code pools them: per-patient metrics as the fold-size-weighted mean and combined-sample sd (= mean and sd
over every validation patient), rates as the fold-size-weighted mean and the sd of the fold values, with
the normal 95 % interval over the k fold estimates (mean ± z·sd/√k); the median AVE over every validation
patient. Test = the fold ensemble on the held-out site: mean ± sd over its patients, BCa 95 % bootstrap
intervals for the rates.

Statistics (``tests.tsv``, each row saying what it compares, on which patients, and whether it is the
paper's analysis or an addition):

- paper: Tukey's HSD between the configurations of each architecture, on the test set (Dice-P and Dice);
  Mann-Whitney U between the two architectures' best configurations on the test set (best = highest
  validation Dice-P, test Dice-P without a validation set); BCa intervals of the classification scores on the
  test set compared by overlap (no overlap = significant), and the normal intervals over the validation
  folds likewise;
- additions for repeated measures (the same patients scored by every model): Wilcoxon signed-rank between
  the same pairs, Friedman across the configurations of an architecture (three or more);
- every model comparison uses only the patients evaluated by every compared model (with ``--config auto``
  the configurations hold different patients: only the common ones are compared).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bids_postop.evaluation.classification import bootstrap_scores
from bids_postop.evaluation.stats import (
    Comparison,
    intervals_overlap,
    labelled,
    mann_whitney,
    mean_sd,
    median,
    tukey_hsd,
    wilcoxon_signed_rank,
)
from bids_postop.evaluation.stats import friedman as friedman_test
from bids_postop.group.tables import RATES, dice_all, pooled_over_folds, summarize

SEGMENTATION_METRICS = ("dice", "dice_P", "dice_TP", "hd95_mm")
CLASSIFICATION_METRICS = ("recall", "precision", "specificity", "balanced_accuracy")
SETS = ("validation", "test")
# paper metric → (per-fold pooled metric of pooled_over_folds, summarize's mean column, its sd column)
_POOLED = {"dice": ("dice_all", "dice_all_mean", "dice_all_sd"), "dice_P": ("dice_P", "dice_P_mean", "dice_P_sd"),
           "dice_TP": ("dice_TP", "dice_TP_mean", "dice_TP_sd"), "hd95_mm": ("hd95_mm", "hd95_mm_mean", "hd95_mm_sd")}


@dataclass
class ModelUnit:
    """One model's evaluated patients, split into the validation and test sets."""

    architecture: str
    configuration: str
    model: str
    sources: list[str] = field(default_factory=list)
    rows: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SETS})

    @property
    def label(self) -> str:
        return f"{self.architecture} {self.configuration} ({self.model})" if self.model else \
            f"{self.architecture} {self.configuration}"


def _patient(row: Mapping) -> tuple:
    return row["participant_id"], row.get("session_id")


def model_units(patients: Sequence[Mapping], notes: list[str]) -> list[ModelUnit]:
    """Evaluated rows of the validation and test sets grouped by model (architecture, configuration, name);
    a model's rows may come from several datasets (e.g. its cross-validation and test predictions)."""
    units: dict[tuple, ModelUnit] = {}
    seen: dict[tuple, str] = {}
    for row in patients:
        if row.get("status") != "ok" or row.get("set") not in SETS:
            continue
        key = (row.get("architecture") or "unknown", row.get("config") or "?", row.get("model") or row["source"])
        unit = units.setdefault(key, ModelUnit(*key))
        where = (key, row["set"], _patient(row))
        if where in seen:
            if seen[where] != row["source"]:
                notes.append(f"model {key[2]}: {row['participant_id']} is in the {row['set']} set of both "
                             f"{seen[where]} and {row['source']}; the first is used in the paper's tables")
            continue
        seen[where] = row["source"]
        if row["source"] not in unit.sources:
            unit.sources.append(row["source"])
        unit.rows[row["set"]].append(dict(row))
    return sorted(units.values(), key=lambda u: (u.architecture, u.configuration, u.model))


def _fold_rows(unit: ModelUnit) -> list[dict]:
    rows = unit.rows["validation"]
    out = []
    for fold in sorted({r.get("fold") or "" for r in rows}):
        out.append({"source": unit.label, "fold": fold or "unknown",
                    **summarize([r for r in rows if (r.get("fold") or "") == fold])})
    return out


def tables(units: Sequence[ModelUnit], *, n_bootstrap: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The segmentation and classification tables (rows as dicts, columns as in the data dictionaries)."""
    seg, cls = [], []
    for u in units:
        base = {"architecture": u.architecture, "configuration": u.configuration, "model": u.model,
                "sources": "; ".join(u.sources)}
        s_row, c_row = dict(base), dict(base)
        val = u.rows["validation"]
        pooled = {p["metric"]: p for p in pooled_over_folds(_fold_rows(u))} if val else {}
        folds = sorted({r.get("fold") or "" for r in val})
        s_row.update({"validation_n": len(val), "validation_n_folds": len(folds),
                      "validation_n_P": sum(bool(r["in_P"]) for r in val)})
        c_row.update({"validation_n": len(val), "validation_n_folds": len(folds)})
        for metric in SEGMENTATION_METRICS:
            p = pooled.get(_POOLED[metric][0], {})
            s_row[f"{metric}_validation_mean"] = p.get("pooled_mean")
            s_row[f"{metric}_validation_sd"] = p.get("pooled_sd")
        s_row["ave_ml_validation_median"] = median(r["abs_volume_error_ml"] for r in val)
        for metric in CLASSIFICATION_METRICS:
            p = pooled.get(metric, {})
            c_row[f"{metric}_validation_mean"] = p.get("pooled_mean")
            c_row[f"{metric}_validation_sd"] = p.get("pooled_sd")
            c_row[f"{metric}_validation_ci_low"] = p.get("normal_ci_low")
            c_row[f"{metric}_validation_ci_high"] = p.get("normal_ci_high")
        test = u.rows["test"]
        summary = summarize(test)
        s_row.update({"test_n": len(test), "test_n_P": summary["n_P"]})
        for metric in SEGMENTATION_METRICS:
            _, mean_col, sd_col = _POOLED[metric]
            s_row[f"{metric}_test_mean"] = summary[mean_col] if test else None
            s_row[f"{metric}_test_sd"] = summary[sd_col] if test else None
        s_row["ave_ml_test_median"] = summary["median_abs_volume_error_ml"]
        cis = bootstrap_scores([r["outcome"] for r in test], n_resamples=n_bootstrap, seed=seed) \
            if test and n_bootstrap > 0 else {}
        c_row.update({"test_n": len(test), **{f"test_{k}": summary[k] for k in ("TP", "TN", "FP", "FN")}})
        for metric in CLASSIFICATION_METRICS:
            ci = cis.get(metric)
            c_row[f"{metric}_test"] = summary[metric]
            c_row[f"{metric}_test_ci_low"] = ci.low if ci else None
            c_row[f"{metric}_test_ci_high"] = ci.high if ci else None
            c_row[f"{metric}_test_ci_reason"] = (ci.reason if ci else
                                                 "no test patient" if not test else "bootstrap disabled")
        seg.append(s_row)
        cls.append(c_row)
    return seg, cls


# --- statistics, scoped as in the paper ---------------------------------------------------------------------

def _values(rows: Iterable[Mapping], metric: str) -> dict[tuple, float | None]:
    if metric == "dice_P":
        return {_patient(r): r["dice"] for r in rows if r["in_P"]}
    if metric == "dice":
        return {_patient(r): dice_all(r) for r in rows}
    raise ValueError(metric)


def _common(units: Sequence[ModelUnit], set_: str, metric: str) -> tuple[list[tuple], dict[str, dict]]:
    per = {u.label: _values(u.rows[set_], metric) for u in units}
    common = sorted(set.intersection(*[{k for k, v in d.items() if v is not None} for d in per.values()]),
                    key=str) if per else []
    return common, per


METRIC_NAMES = {"dice_P": "Dice-P (reference-positive patients)", "dice": "Dice (every patient; two empty masks = 1)"}


def best_configuration(units: Sequence[ModelUnit], seg_rows: Sequence[Mapping]) -> ModelUnit | None:
    """Highest validation Dice-P (pooled), else highest test Dice-P."""
    by_label = {(r["architecture"], r["configuration"], r["model"]): r for r in seg_rows}

    def score(u: ModelUnit) -> tuple:
        r = by_label[(u.architecture, u.configuration, u.model)]
        v, t = r.get("dice_P_validation_mean"), r.get("dice_P_test_mean")
        return (v is not None, v if v is not None else -1.0, t if t is not None else -1.0)

    candidates = [u for u in units if score(u)[1] >= 0 or score(u)[2] >= 0]
    return max(candidates, key=score) if candidates else None


def protocol_tests(units: Sequence[ModelUnit], seg_rows: Sequence[Mapping], cls_rows: Sequence[Mapping]
                   ) -> tuple[list[Comparison], list[str]]:
    """The paper's tests and the paired additions (module docstring); returns them and notes."""
    notes: list[str] = []
    tests: list[Comparison] = []
    set_ = "test" if any(u.rows["test"] for u in units) else "validation"
    if set_ != "test" and units:
        notes.append("no test set identified (held-out participants: a 'test' fold in --folds or participants.tsv, "
                     "or the model card's test participants): the model comparisons ran on the validation set")
    by_arch: dict[str, list[ModelUnit]] = {}
    for u in units:
        by_arch.setdefault(u.architecture, []).append(u)
    pairs: list[tuple[str, ModelUnit, ModelUnit]] = []
    for arch, members in sorted(by_arch.items()):
        if len(members) < 2:
            continue
        for metric in ("dice_P", "dice"):
            common, per = _common(members, set_, metric)
            scope = f"{set_} set; patients evaluated by every compared model (n={len(common)})"
            if not common:
                notes.append(f"{arch}: no {set_} patient evaluated by every configuration; Tukey not computed")
                continue
            groups = {label: [per[label][k] for k in common] for label in per}
            tests += labelled(tukey_hsd(groups, metric=METRIC_NAMES[metric]), compares=f"configurations of {arch}",
                              scope=scope, origin="paper")
            if metric == "dice_P" and len(members) >= 3 and len(common) >= 2:
                tests += labelled([friedman_test(groups, metric=METRIC_NAMES[metric])],
                                  compares=f"configurations of {arch}", scope=scope,
                                  origin="addition (paired: the same patients in every group)")
        pairs += [(f"configurations of {arch}", a, b) for a, b in itertools.combinations(members, 2)]
    best = {arch: best_configuration(members, seg_rows) for arch, members in by_arch.items()}
    best_units = [b for b in best.values() if b is not None]
    if len(best_units) >= 2:
        for a, b in itertools.combinations(sorted(best_units, key=lambda u: u.architecture), 2):
            pairs.append(("best configurations of the architectures", a, b))
            common, per = _common([a, b], set_, "dice_P")
            scope = (f"{set_} set; reference-positive patients evaluated by both (n={len(common)}); best = highest "
                     f"validation Dice-P (test Dice-P without validation)")
            x, y = [per[a.label][k] for k in common], [per[b.label][k] for k in common]
            tests += labelled([mann_whitney(x, y, name_a=a.label, name_b=b.label, metric=METRIC_NAMES["dice_P"])],
                              compares="best configurations of the architectures", scope=scope, origin="paper")
            tests += labelled([wilcoxon_signed_rank(x, y, name_a=a.label, name_b=b.label,
                                                    metric=METRIC_NAMES["dice_P"])],
                              compares="best configurations of the architectures", scope=scope,
                              origin="addition (paired: the same patients)")
    for compares, a, b in pairs:
        if compares.startswith("configurations"):
            common, per = _common([a, b], set_, "dice_P")
            x, y = [per[a.label][k] for k in common], [per[b.label][k] for k in common]
            tests += labelled([wilcoxon_signed_rank(x, y, name_a=a.label, name_b=b.label,
                                                    metric=METRIC_NAMES["dice_P"])],
                              compares=compares, scope=f"{set_} set; reference-positive patients evaluated by both "
                                                        f"(n={len(common)})",
                              origin="addition (paired: the same patients)")
        tests += _overlaps(compares, a, b, cls_rows)
    return tests, notes


def _overlaps(compares: str, a: ModelUnit, b: ModelUnit, cls_rows: Sequence[Mapping]) -> list[Comparison]:
    by = {(r["architecture"], r["configuration"], r["model"]): r for r in cls_rows}
    ra, rb = by[(a.architecture, a.configuration, a.model)], by[(b.architecture, b.configuration, b.model)]
    out = []
    for metric in CLASSIFICATION_METRICS:
        specs: list[tuple[str, str, Callable[[Mapping], tuple], str]] = [
            ("test", "BCa 95 %", lambda r, m=metric: (r[f"{m}_test_ci_low"], r[f"{m}_test_ci_high"]),
             "test set (BCa bootstrap intervals)"),
            ("validation", "normal 95 % (over folds)",
             lambda r, m=metric: (r[f"{m}_validation_ci_low"], r[f"{m}_validation_ci_high"]),
             "validation folds (normal intervals over the fold estimates)")]
        for set_, method, interval, scope in specs:
            if not a.rows[set_] or not b.rows[set_]:
                continue
            out += labelled([intervals_overlap(a.label, interval(ra), b.label, interval(rb), metric=metric,
                                               method=method, n_a=len(a.rows[set_]), n_b=len(b.rows[set_]))],
                            compares=compares, scope=scope, origin="paper")
    return out


def pooled_rows(units: Sequence[ModelUnit]) -> list[dict]:
    """The per-metric pooled estimates over the validation folds of every model (as folds_pooled.tsv)."""
    out = []
    for u in units:
        if u.rows["validation"]:
            for p in pooled_over_folds(_fold_rows(u)):
                out.append({**p, "source": u.label})
    return out


def describe(seg_rows: Sequence[Mapping]) -> list[str]:
    """One line per model: test Dice-P mean ± sd and validation Dice-P (for logs)."""
    out = []
    for r in seg_rows:
        v = mean_sd([r.get("dice_P_validation_mean")])[0]
        out.append(f"{r['architecture']} {r['configuration']} ({r['model']}): Dice-P validation "
                   f"{'n/a' if v is None else f'{v:.3f}'}, test "
                   f"{'n/a' if r.get('dice_P_test_mean') is None else format(r['dice_P_test_mean'], '.3f')}")
    return out


__all__ = ["RATES", "ModelUnit", "model_units", "tables", "protocol_tests", "pooled_rows", "describe",
           "best_configuration"]
