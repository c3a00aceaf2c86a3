"""Inter-rater study (SPEC.md, "Validation"): consensus by majority vote, Jaccard of raters and models
against the reference annotation and against the consensus, Mann-Whitney U of model against raters.

Definitions written into the outputs:

- consensus: a voxel is tumour when more than half of the pooled raters marked it. The pool is every rater
  except the reference annotation when at least two such raters annotated the patient (the study's
  design: the reference stands apart from the raters); otherwise every rater who annotated the patient,
  the reference included; with fewer than two annotations there is no consensus;
- Jaccard J = D / (2 − D) from Dice; undefined (left out of means and tests, and counted) when both masks
  are empty;
- the reference is not scored against itself;
- scores are reported over *positive* patients by default (residual tumour in the reference annotation: its
  volume at or above the GTR cut-off), as the paper reports them; ``positive_only=False`` keeps every patient;
- rater groups (``novice``, ``expert``, any other group of the rater-groups TSV, and ``all raters``) leave
  the reference annotation out; a group's score for a patient is the average over its raters who annotated
  that patient (the paper's "average scores of the two annotator groups"), so that a model is compared with
  one value per patient and group, not with every rater × patient value as if they were independent.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from bids_postop.errors import UsageError
from bids_postop.evaluation.metrics import dice, jaccard_from_dice
from bids_postop.evaluation.stats import Comparison, mann_whitney, mean_sd, median

REFERENCE_GROUP = "reference"
TARGETS = ("reference", "consensus")
_RATER_COLUMNS = ("rater", "rater_id", "annotator", "desc")
_GROUP_COLUMNS = ("group", "experience", "level")


def consensus(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Voxel-wise majority vote: True where more than half of ``masks`` are non-zero (same shapes)."""
    if not masks:
        raise ValueError("consensus needs at least one mask")
    votes = np.zeros(np.shape(masks[0]), dtype=np.uint16)
    for mask in masks:
        votes += np.asarray(mask) != 0
    return 2 * votes.astype(np.int32) > len(masks)


def consensus_pool(available: Sequence[str], reference: str | None) -> list[str]:
    """Raters whose masks form the consensus of one patient (rule in the module docstring)."""
    others = [r for r in available if r != reference]
    if len(others) >= 2:
        return others
    return list(available) if len(available) >= 2 else []


def read_rater_groups(path: Path) -> dict[str, str]:
    """rater → group from a TSV with columns ``rater`` and ``group`` (e.g. novice, expert, reference)."""
    try:
        with Path(path).open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the rater-groups TSV ({exc.strerror})") from exc
    header = list(rows[0]) if rows else []
    rater_col = next((c for c in _RATER_COLUMNS if c in header), None)
    group_col = next((c for c in _GROUP_COLUMNS if c in header), None)
    if rater_col is None or group_col is None:
        raise UsageError(f"{path}: the rater-groups TSV needs a 'rater' and a 'group' column (tab-separated); "
                         f"found columns {header}")
    groups = {r[rater_col].strip(): r[group_col].strip().lower() for r in rows if r.get(rater_col)}
    references = [r for r, g in groups.items() if g == REFERENCE_GROUP]
    if len(references) > 1:
        raise UsageError(f"{path}: several raters are marked '{REFERENCE_GROUP}' ({references}); mark one")
    return groups


def resolve_reference(raters: Sequence[str], groups: Mapping[str, str], *, default: str | None) -> str:
    """The reference annotation: the rater marked ``reference`` in the groups TSV, else ``default`` when it
    is a known rater, else the first rater in sorted order."""
    if not raters:
        raise ValueError("no rater")
    marked = [r for r in raters if groups.get(r) == REFERENCE_GROUP]
    if marked:
        return marked[0]
    if default is not None and default in raters:
        return default
    return sorted(raters)[0]


def score_patient(annotations: Mapping[str, np.ndarray], models: Mapping[str, np.ndarray], *,
                  reference: str | None) -> tuple[list[dict], list[str]]:
    """Dice and Jaccard of every rater and model of one patient against its reference and consensus.

    ``annotations``: rater → mask; ``models``: model name → mask (all on one grid). Returns the score rows
    (keys annotator, kind, target, dice, jaccard, reason) and the raters that formed the consensus.
    """
    pool = consensus_pool(sorted(annotations), reference)
    targets: dict[str, np.ndarray] = {}
    if reference is not None and reference in annotations:
        targets["reference"] = annotations[reference]
    if pool:
        targets["consensus"] = consensus([annotations[r] for r in pool])
    rows = []
    scored = [(name, "rater", m) for name, m in sorted(annotations.items())]
    scored += [(name, "model", m) for name, m in models.items()]
    for target, target_mask in targets.items():
        for name, kind, mask in scored:
            if target == "reference" and kind == "rater" and name == reference:
                continue
            d = dice(mask, target_mask)
            rows.append({"annotator": name, "kind": kind, "target": target, "dice": d,
                         "jaccard": jaccard_from_dice(d), "reason": None if d is not None else "both masks empty"})
    return rows, pool


def _patient(row: Mapping) -> tuple:
    return row.get("participant_id"), row.get("session_id")


def in_scope(rows: Iterable[Mapping], *, positive_only: bool = True) -> list[Mapping]:
    """The rows to report: those of reference-positive patients (``reference_positive``), or all."""
    return [r for r in rows if not positive_only or r.get("reference_positive") is True]


def rater_groups(raters: Iterable[str], groups: Mapping[str, str], reference: str | None) -> dict[str, list[str]]:
    """Group label → raters (``group:<name>`` for each assigned group, ``all raters``); the reference left out."""
    pooled = sorted(r for r in set(raters) if r != reference)
    by_group: dict[str, list[str]] = {}
    for rater in pooled:
        if groups.get(rater, "unassigned") != "unassigned":
            by_group.setdefault(f"group:{groups[rater]}", []).append(rater)
    if pooled:
        by_group["all raters"] = pooled
    return dict(sorted(by_group.items()))


def group_averages(rows: Sequence[Mapping], members: Sequence[str]) -> dict[tuple, float]:
    """Per patient: the mean Jaccard of the group's raters who have a defined score for that patient."""
    per: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kind"] == "rater" and r["annotator"] in members and r["jaccard"] is not None:
            per.setdefault(_patient(r), []).append(float(r["jaccard"]))
    return {k: float(np.mean(v)) for k, v in per.items()}


def summarize(rows: Iterable[Mapping], groups: Mapping[str, str], *, reference: str | None = None,
              positive_only: bool = True) -> list[dict]:
    """Per annotator and target, and per rater group (per-patient group averages): n, undefined count, Jaccard
    mean ± sd and median, over reference-positive patients (``positive_only``) or all."""
    rows = in_scope(rows, positive_only=positive_only)
    keyed: dict[tuple[str, str, str], list[float | None]] = {}
    for row in rows:
        keyed.setdefault((row["target"], row["kind"], row["annotator"]), []).append(row["jaccard"])
    scope = "reference-positive patients" if positive_only else "all patients"
    out = []
    for (target, kind, name), values in sorted(keyed.items()):
        mean, sd = mean_sd(values)
        n_defined = sum(v is not None for v in values)
        out.append({"target": target, "annotator": name, "kind": kind,
                    "group": "model" if kind == "model" else groups.get(name, "unassigned"), "patients": scope,
                    "n": n_defined, "n_undefined": len(values) - n_defined, "jaccard_mean": mean, "jaccard_sd": sd,
                    "jaccard_median": median(values)})
    for target in TARGETS:
        at = [r for r in rows if r["target"] == target]
        raters = {r["annotator"] for r in at if r["kind"] == "rater"}
        for label, members in rater_groups(raters, groups, reference).items():
            values = list(group_averages(at, members).values())
            mean, sd = mean_sd(values)
            out.append({"target": target, "annotator": label, "kind": "rater group average",
                        "group": "+".join(members), "patients": scope, "n": len(values), "n_undefined": None,
                        "jaccard_mean": mean, "jaccard_sd": sd, "jaccard_median": median(values)})
    return out


def compare_models_with_raters(rows: Sequence[Mapping], groups: Mapping[str, str], *,
                               reference: str | None, positive_only: bool = True) -> list[Comparison]:
    """Mann-Whitney U, per target, of each model's per-patient Jaccard against each rater's, and against each
    rater group's per-patient averages (``all raters`` too), over reference-positive patients by default."""
    rows = in_scope(rows, positive_only=positive_only)
    scope = "reference-positive patients" if positive_only else "all patients"
    out: list[Comparison] = []
    for target in TARGETS:
        at = [r for r in rows if r["target"] == target]
        models = sorted({r["annotator"] for r in at if r["kind"] == "model"})
        raters = sorted({r["annotator"] for r in at if r["kind"] == "rater"})
        comparisons = [(f"rater:{rater}", [r["jaccard"] for r in at if r["kind"] == "rater"
                                           and r["annotator"] == rater]) for rater in raters]
        comparisons += [(f"{label} (per-patient average)", list(group_averages(at, members).values()))
                        for label, members in rater_groups(raters, groups, reference).items()]
        for model in models:
            model_values = [r["jaccard"] for r in at if r["annotator"] == model and r["kind"] == "model"]
            for label, values in comparisons:
                test = mann_whitney(model_values, values, name_a=f"model:{model}", name_b=label,
                                    metric=f"Jaccard vs {target}")
                against = "a rater" if label.startswith("rater:") else "a rater group's per-patient average"
                out.append(replace(test, compares=f"model against {against}", scope=scope, origin="paper"))
    return out
