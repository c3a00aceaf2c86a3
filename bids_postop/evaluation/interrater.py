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
- pooled rater groups (``novice``, ``expert``, any other group of the rater-groups TSV, and ``all``) leave
  the reference annotation out.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
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


def summarize(rows: Iterable[Mapping], groups: Mapping[str, str]) -> list[dict]:
    """Per annotator and target: n, undefined count, Jaccard mean ± sd and median."""
    keyed: dict[tuple[str, str, str], list[float | None]] = {}
    for row in rows:
        keyed.setdefault((row["target"], row["kind"], row["annotator"]), []).append(row["jaccard"])
    out = []
    for (target, kind, name), values in sorted(keyed.items()):
        mean, sd = mean_sd(values)
        n_defined = sum(v is not None for v in values)
        out.append({"target": target, "annotator": name, "kind": kind,
                    "group": "model" if kind == "model" else groups.get(name, "unassigned"),
                    "n": n_defined, "n_undefined": len(values) - n_defined, "jaccard_mean": mean, "jaccard_sd": sd,
                    "jaccard_median": median(values)})
    return out


def compare_models_with_raters(rows: Sequence[Mapping], groups: Mapping[str, str], *,
                               reference: str | None) -> list[Comparison]:
    """Mann-Whitney U of each model's Jaccard against each rater, each rater group and all raters, per target."""
    out: list[Comparison] = []
    for target in TARGETS:
        at = [r for r in rows if r["target"] == target]
        models = sorted({r["annotator"] for r in at if r["kind"] == "model"})
        raters = sorted({r["annotator"] for r in at if r["kind"] == "rater"})
        pooled_raters = [r for r in raters if r != reference]
        by_group: dict[str, list[str]] = {}
        for rater in pooled_raters:
            by_group.setdefault(groups.get(rater, "unassigned"), []).append(rater)
        comparisons = [(f"rater:{r}", [r]) for r in raters]
        comparisons += [(f"group:{g}", members) for g, members in sorted(by_group.items()) if g != "unassigned"]
        comparisons += [("all raters", pooled_raters)] if pooled_raters else []
        for model in models:
            model_values = [r["jaccard"] for r in at if r["annotator"] == model and r["kind"] == "model"]
            for label, members in comparisons:
                values = [r["jaccard"] for r in at if r["kind"] == "rater" and r["annotator"] in members]
                out.append(mann_whitney(model_values, values, name_a=f"model:{model}", name_b=label,
                                        metric=f"Jaccard vs {target}"))
    return out
