"""An independent recomputation of the group level's paper tables and tests from the written derivatives.

Written from the definitions (docs and SPEC.md), with nibabel, numpy, scipy, statsmodels and MedPy only: it
imports nothing from bids_postop. The tests compare the group level's TSVs with what this module computes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import stats

CUTOFF_ML = 0.175


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def num(text: str | None) -> float | None:
    """A TSV cell as a number; n/a (or empty) as None."""
    return None if text in (None, "", "n/a") else float(text)


def _mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj) > 0, img.affine


def score_pair(prediction: Path, truth: Path, *, cutoff_ml: float = CUTOFF_ML, inclusive: bool = False) -> dict:
    """Dice, HD95 (MedPy), volumes (|det| per voxel, rounded to 1e-6 ml) and the patient-wise outcome."""
    from medpy.metric import binary

    a, affine = _mask(prediction)
    b, _ = _mask(truth)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    pred_ml, true_ml = round(a.sum() * voxel_ml, 6), round(b.sum() * voxel_ml, 6)
    total = a.sum() + b.sum()
    dice = 2 * (a & b).sum() / total if total else None
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    hd = binary.hd95(a, b, voxelspacing=spacing) if a.any() and b.any() else None

    def positive(ml: float) -> bool:
        return ml > cutoff_ml if inclusive else ml >= cutoff_ml

    t, p = positive(true_ml), positive(pred_ml)
    outcome = ("TP" if dice is not None and dice >= 0.01 else "FN") if t and p else "FN" if t else \
        "FP" if p else "TN"
    return {"dice": dice, "dice_all": 1.0 if dice is None else dice, "hd95": hd, "in_P": t, "outcome": outcome,
            "ave": abs(pred_ml - true_ml)}


def collect(datasets: Mapping[str, Path], manual: Path, folds: Mapping[str, str]) -> dict[tuple, dict[str, list]]:
    """(architecture, configuration, model) → {"validation": [...], "test": [...]} scored rows.

    Validation rows: measures JSONs recording an own-fold prediction (provenance.cross_validation.fold); test
    rows: participants whose fold in ``folds`` (participant_id → fold) is ``test``.
    """
    names = {"nnunet": "nnU-Net", "raidionics": "AGU-Net", "agunet": "AGU-Net"}
    out: dict[tuple, dict[str, list]] = {}
    for root in datasets.values():
        for js_path in sorted(root.glob("sub-*/**/*_measures.json")):
            js = json.loads(js_path.read_text())
            model = js["model"]
            key = (names[model["architecture"]], model["configuration"], model["name"])
            cv = (js.get("provenance") or {}).get("cross_validation") or {}
            pid, ses = js["participant_id"], js["session_id"]
            if cv.get("fold") is not None:
                set_, fold = "validation", str(cv["fold"])
            elif folds.get(pid) == "test":
                set_, fold = "test", "test"
            else:
                continue
            truth = manual / pid / ses / "anat" / f"{pid}_{ses}_label-tumor_mask.nii.gz"  # the reference (no desc)
            row = score_pair(root / js["outputs"]["residual_mask"], truth,
                             cutoff_ml=js["measures"]["gtr_cutoff_ml"], inclusive="<=" in js["measures"]["gtr_rule"])
            out.setdefault(key, {"validation": [], "test": []})[set_].append({**row, "pid": pid, "fold": fold})
    return out


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    x = [v for v in values if v is not None]
    if not x:
        return None, None
    return float(np.mean(x)), (float(np.std(x, ddof=1)) if len(x) > 1 else None)


def rates(rows: Sequence[dict]) -> dict[str, float | None]:
    c = {k: sum(r["outcome"] == k for r in rows) for k in ("TP", "TN", "FP", "FN")}
    recall = c["TP"] / (c["TP"] + c["FN"]) if c["TP"] + c["FN"] else None
    precision = c["TP"] / (c["TP"] + c["FP"]) if c["TP"] + c["FP"] else None
    specificity = c["TN"] / (c["TN"] + c["FP"]) if c["TN"] + c["FP"] else None
    bacc = (recall + specificity) / 2 if recall is not None and specificity is not None else None
    return {"recall": recall, "precision": precision, "specificity": specificity, "balanced_accuracy": bacc, **c}


def segmentation_values(rows: Sequence[dict]) -> dict[str, list]:
    return {"dice": [r["dice_all"] for r in rows], "dice_P": [r["dice"] for r in rows if r["in_P"]],
            "dice_TP": [r["dice"] for r in rows if r["outcome"] == "TP"],
            "hd95_mm": [r["hd95"] for r in rows if r["hd95"] is not None]}


def bca(samples: Sequence[np.ndarray], n_resamples: int, seed: int) -> tuple[float | None, float | None]:
    """scipy's BCa interval of the mean (of the per-group means), or (None, None) when degenerate."""
    if any(len(s) < 2 for s in samples) or all(np.all(s == s[0]) for s in samples):
        return None, None

    def statistic(*xs, axis=-1):
        return np.mean([np.mean(x, axis=axis) for x in xs], axis=0)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(tuple(samples), statistic, n_resamples=n_resamples, method="BCa", vectorized=True,
                              random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else (None, None)


def bca_intervals(rows: Sequence[dict], n_resamples: int, seed: int) -> dict[str, tuple]:
    hits = np.array([r["outcome"] == "TP" for r in rows if r["outcome"] in ("TP", "FN")], float)
    rej = np.array([r["outcome"] == "TN" for r in rows if r["outcome"] in ("TN", "FP")], float)
    called = np.array([r["outcome"] == "TP" for r in rows if r["outcome"] in ("TP", "FP")], float)
    return {"recall": bca([hits], n_resamples, seed), "specificity": bca([rej], n_resamples, seed),
            "balanced_accuracy": bca([hits, rej], n_resamples, seed), "precision": bca([called], n_resamples, seed)}


def tables(scored: Mapping[tuple, Mapping[str, list]], *, n_resamples: int, seed: int) -> dict[tuple, dict]:
    """Per model: the paper-table values (column name → value), from the definitions."""
    out = {}
    for key, sets in scored.items():
        val, test = sets["validation"], sets["test"]
        row: dict = {"validation_n": len(val), "test_n": len(test)}
        for metric, values in segmentation_values(val).items():  # combined sample = every validation patient
            row[f"{metric}_validation_mean"], row[f"{metric}_validation_sd"] = mean_sd(values)
        for metric, values in segmentation_values(test).items():
            row[f"{metric}_test_mean"], row[f"{metric}_test_sd"] = mean_sd(values)
        row["ave_ml_validation_median"] = float(np.median([r["ave"] for r in val])) if val else None
        row["ave_ml_test_median"] = float(np.median([r["ave"] for r in test])) if test else None
        folds = sorted({r["fold"] for r in val})
        per_fold = [(rates([r for r in val if r["fold"] == f]), sum(r["fold"] == f for r in val)) for f in folds]
        for metric in ("recall", "precision", "specificity", "balanced_accuracy"):
            got = [(v[metric], n) for v, n in per_fold if v[metric] is not None]
            if got:
                values = np.array([v for v, _ in got])
                weights = np.array([n for _, n in got], float)
                row[f"{metric}_validation_mean"] = float((values * weights).sum() / weights.sum())
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
                row[f"{metric}_validation_sd"] = sd
                half = stats.norm.ppf(0.975) * sd / math.sqrt(len(values)) if sd is not None else None
                row[f"{metric}_validation_ci_low"] = float(values.mean() - half) if half is not None else None
                row[f"{metric}_validation_ci_high"] = float(values.mean() + half) if half is not None else None
            row[f"{metric}_test"] = rates(test)[metric] if test else None
        for metric, (low, high) in (bca_intervals(test, n_resamples, seed) if test else {}).items():
            row[f"{metric}_test_ci_low"], row[f"{metric}_test_ci_high"] = low, high
        out[key] = row
    return out


def tukey_per_architecture(scored: Mapping[tuple, Mapping[str, list]], architecture: str, set_: str = "test"
                           ) -> dict[frozenset, float]:
    """statsmodels' Tukey HSD between the configurations of one architecture, on Dice-P of the patients that
    every configuration evaluated: {pair of labels} → adjusted p-value."""
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    members = {k: {r["pid"]: r["dice"] for r in v[set_] if r["in_P"]} for k, v in scored.items()
               if k[0] == architecture}
    common = sorted(set.intersection(*[set(m) for m in members.values()]))
    labels = {k: f"{k[0]} {k[1]} ({k[2]})" for k in members}
    endog = np.concatenate([[members[k][p] for p in common] for k in members])
    groups = np.concatenate([[labels[k]] * len(common) for k in members])
    res = pairwise_tukeyhsd(endog, groups)
    names = res.groupsunique
    pairs = [(names[i], names[j]) for i, j in zip(*np.triu_indices(len(names), 1), strict=True)]
    return {frozenset(p): float(pv) for p, pv in zip(pairs, res.pvalues, strict=True)}
