"""Group-level tables: cohort statistics, metric summaries per site, fold and overall, pooled fold
estimates, and TSV writing with a JSON data dictionary beside each table."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from bids_postop.bids.derivatives import atomic_write_json, atomic_write_text
from bids_postop.evaluation.classification import Counts
from bids_postop.evaluation.stats import defined, mean_sd, median, normal_interval, pooled_mean_sd, weighted_mean
from bids_postop.group.collect import is_holdout, is_missing

RATES = ("recall", "precision", "specificity", "balanced_accuracy")


NA = "n/a"


def cell(value: object) -> str:
    """TSV cell: ``n/a`` for unknown/undefined (BIDS), ``true``/``false``, floats to 10 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return NA
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return format(float(value), ".10g")
    return str(value)


def write_table(path: Path, rows: Iterable[Mapping], dictionary: Mapping[str, Mapping]) -> list[Path]:
    """Write ``rows`` (columns = the dictionary's keys, in order) as TSV and the dictionary as JSON."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    columns = list(dictionary)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    atomic_write_text(path, buffer.getvalue())
    return [path, atomic_write_json(path.with_suffix(".json"), dict(dictionary))]


def _quantiles(values: Sequence[float | None], prefix: str) -> dict[str, float | int | None]:
    x = defined(values)
    mean, sd = mean_sd(x)
    q = np.percentile(x, [0, 25, 50, 75, 100]).tolist() if x else [None] * 5
    return {f"{prefix}_n": len(x), f"{prefix}_mean": mean, f"{prefix}_sd": sd, f"{prefix}_min": q[0],
            f"{prefix}_q1": q[1], f"{prefix}_median": q[2], f"{prefix}_q3": q[3], f"{prefix}_max": q[4]}


def _float(text: str | None) -> float | None:
    try:
        return None if is_missing(text) else float(text)  # type: ignore[arg-type]
    except ValueError:
        return None


def cohort_rows(summary: Sequence[Mapping[str, str]]) -> list[dict]:
    """Per site and for all: counts of GTR/RT (as the participant level classified them), configurations
    used, and residual/pre-op volume and EOR distributions."""
    sites = sorted({r.get("site") or "" for r in summary})
    out = []
    for site in [*sites, None]:
        rows = [r for r in summary if site is None or (r.get("site") or "") == site]
        status = [r.get("resection_status", "") for r in rows]
        configs: dict[str, int] = {}
        for r in rows:
            configs[r.get("config") or "?"] = configs.get(r.get("config") or "?", 0) + 1
        out.append({"site": "all" if site is None else (site or "unknown"), "n_sessions": len(rows),
                    "n_GTR": status.count("GTR"), "n_RT": status.count("RT"),
                    "n_status_unknown": sum(s not in ("GTR", "RT") for s in status),
                    "configs": "; ".join(f"{k}:{v}" for k, v in sorted(configs.items())),
                    **_quantiles([_float(r.get("residual_volume_ml")) for r in rows], "residual_volume_ml"),
                    **_quantiles([_float(r.get("preop_volume_ml")) for r in rows], "preop_volume_ml"),
                    **_quantiles([_float(r.get("eor_percent")) for r in rows], "eor_percent"),
                    **_review_and_classes(rows)})
    return out


def _review_and_classes(rows: Sequence[Mapping[str, str]]) -> dict:
    """RANO resect class distribution and the review-flag counts of a group of summary rows."""
    classes: dict[str, int] = {}
    for r in rows:
        label = str(r.get("rano_resect_class") or "n/a")
        classes[label] = classes.get(label, 0) + 1
    flags = [str(r.get("review_flag", "")).lower() for r in rows]
    return {"rano_classes": "; ".join(f"{k}:{v}" for k, v in sorted(classes.items())),
            "n_review_flagged": flags.count("true"), "n_review_known": sum(f in ("true", "false") for f in flags)}


def dice_all(row: Mapping) -> float | None:
    """Dice over every patient, two empty masks scoring 1 (the convention of the study authors' validation code,
    whose Dice is smoothed by ε = 0.1); only evaluated rows."""
    if row.get("status") != "ok":
        return None
    return 1.0 if row.get("dice") is None else float(row["dice"])


def summarize(rows: Sequence[Mapping]) -> dict:
    """Metrics of one group of per-patient rows (one dataset): counts, Dice over all (two empty masks = 1), on
    P and TP, HD95, volume errors and patient-wise scores; undefined values are left out and counted, never
    averaged as 0."""
    ok = [r for r in rows if r.get("status") == "ok"]
    pos = [r for r in ok if r["in_P"]]
    tp = [r for r in ok if r["outcome"] == "TP"]
    counts = Counts.of(r["outcome"] for r in ok)
    out: dict = {"n_sessions": len(rows), "n_evaluated": len(ok),
                 "n_errors": sum(r.get("status") == "error" for r in rows),
                 "n_no_reference": sum(r.get("status") == "no_reference" for r in rows),
                 "n_P": len(pos), "n_TP_group": len(tp), **counts.as_dict()}
    out["dice_all_mean"], out["dice_all_sd"] = mean_sd(dice_all(r) for r in ok)
    hd_all = [r["hd95_mm"] for r in ok if r["hd95_mm"] is not None]
    out["hd95_mm_mean"], out["hd95_mm_sd"] = mean_sd(hd_all)
    out["hd95_n_defined"] = len(hd_all)
    for name, group in (("P", pos), ("TP", tp)):
        out[f"dice_{name}_mean"], out[f"dice_{name}_sd"] = mean_sd(r["dice"] for r in group)
        hd = [r["hd95_mm"] for r in group]
        out[f"hd95_{name}_mm_mean"], out[f"hd95_{name}_mm_sd"] = mean_sd(hd)
        out[f"hd95_{name}_n_undefined"] = sum(v is None for v in hd)
    out["median_abs_volume_error_ml"] = median(r["abs_volume_error_ml"] for r in ok)
    out["median_abs_volume_error_ml_P"] = median(r["abs_volume_error_ml"] for r in pos)
    return out


def summaries_by(rows: Sequence[Mapping], column: str | None, *, extra: Callable[[str, list], dict] | None = None
                 ) -> list[dict]:
    """``summarize`` per dataset (``source``) and per value of ``column`` (``None``: one row per dataset)."""
    out = []
    for source in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == source]
        values = sorted({r.get(column) or "" for r in mine}) if column else [None]
        for value in values:
            group = [r for r in mine if column is None or (r.get(column) or "") == value]
            row = {"source": source, "config": "; ".join(sorted({r.get("config") or "" for r in group} - {""})),
                   "model": "; ".join(sorted({r.get("model") or "" for r in group} - {""}))}
            if column:
                row[column] = value or "unknown"
            row.update(summarize(group))
            if extra:
                row.update(extra(source, group))
            out.append(row)
    return out


def _n_defined(row: Mapping, group: str, hd95: bool) -> int:
    n = row["n_P"] if group == "P" else row["n_TP_group"]
    return n - row[f"hd95_{group}_n_undefined"] if hd95 else n


# metric → (mean column, sd column, patients behind the value)
PER_PATIENT_COLUMNS: dict[str, tuple[str, str, Callable[[Mapping], int]]] = {
    "dice_all": ("dice_all_mean", "dice_all_sd", lambda r: r["n_evaluated"]),
    "dice_P": ("dice_P_mean", "dice_P_sd", lambda r: _n_defined(r, "P", False)),
    "dice_TP": ("dice_TP_mean", "dice_TP_sd", lambda r: _n_defined(r, "TP", False)),
    "hd95_P_mm": ("hd95_P_mm_mean", "hd95_P_mm_sd", lambda r: _n_defined(r, "P", True)),
    "hd95_TP_mm": ("hd95_TP_mm_mean", "hd95_TP_mm_sd", lambda r: _n_defined(r, "TP", True)),
    "hd95_mm": ("hd95_mm_mean", "hd95_mm_sd", lambda r: r["hd95_n_defined"]),
}


def pooled_over_folds(fold_rows: Sequence[Mapping], *, confidence: float = 0.95) -> list[dict]:
    """Pooled estimates over the cross-validation folds (hold-out folds left out), per dataset.

    Per-patient metrics (Dice over all/P/TP, HD95 over all defined/P/TP): fold-size-weighted mean and
    combined-sample sd (equal to the mean and sd over all patients of those folds), as the study's validation
    code pools them.
    Patient-wise rates: mean weighted by the number of evaluated patients per fold and sd of the fold
    values. For both, also the mean, sd and normal interval (mean ± z·sd/√k) of the k per-fold estimates.
    """
    out = []
    for source in dict.fromkeys(r["source"] for r in fold_rows):
        folds = [r for r in fold_rows if r["source"] == source and r["fold"] != "unknown"
                 and not is_holdout(r["fold"])]
        for metric in (*PER_PATIENT_COLUMNS, *RATES):
            if metric in PER_PATIENT_COLUMNS:
                mean_col, sd_col, n_of = PER_PATIENT_COLUMNS[metric]
                used = [r for r in folds if r[mean_col] is not None]
                estimates, weights = [r[mean_col] for r in used], [n_of(r) for r in used]
                pm, psd = (pooled_mean_sd(estimates, [r[sd_col] for r in used], weights) if used
                           else (None, None))
                pooling = "combined sample"
            else:
                used = [r for r in folds if r[metric] is not None]
                estimates, weights = [r[metric] for r in used], [r["n_evaluated"] for r in used]
                pm = weighted_mean(estimates, weights) if used else None
                psd = mean_sd(estimates)[1]
                pooling = "weighted by fold size; sd of fold values"
            fm, fsd, low, high = normal_interval(estimates, confidence=confidence)
            out.append({"source": source, "metric": metric, "n_folds": len(used), "n_patients": int(sum(weights)),
                        "folds": "; ".join(r["fold"] for r in used), "pooled_mean": pm, "pooled_sd": psd,
                        "pooling": pooling, "fold_mean": fm, "fold_sd": fsd, "normal_ci_low": low,
                        "normal_ci_high": high})
    return out
