"""Consensus, Jaccard of raters and models, rater groups and the Mann-Whitney comparisons."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bids_postop.errors import UsageError
from bids_postop.evaluation.interrater import (
    compare_models_with_raters,
    consensus,
    consensus_pool,
    read_rater_groups,
    resolve_reference,
    score_patient,
    summarize,
)

medpy_binary = pytest.importorskip("medpy.metric.binary")


def random_masks(n: int, seed: int = 0, shape=(12, 10, 8)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape) < 0.3 for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_consensus_is_a_strict_majority(n):
    masks = random_masks(n, seed=n)
    expected = np.mean(np.stack(masks), axis=0) > 0.5
    np.testing.assert_array_equal(consensus(masks), expected)


def test_consensus_by_hand():
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([1, 1, 0, 0, 1], bool)
    c = np.array([1, 0, 0, 0, 0], bool)
    np.testing.assert_array_equal(consensus([a, b, c]), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(consensus([a, b]), [1, 1, 0, 0, 0])  # two raters: both must agree
    np.testing.assert_array_equal(consensus([a, b, c, c]), [1, 0, 0, 0, 0])  # 2 of 4 is not a majority


@pytest.mark.parametrize(("available", "reference", "pool"), [
    (["ref", "r1", "r2"], "ref", ["r1", "r2"]),
    (["ref", "r1"], "ref", ["ref", "r1"]),
    (["r1", "r2"], None, ["r1", "r2"]),
    (["ref"], "ref", []),
])
def test_consensus_pool(available, reference, pool):
    assert consensus_pool(available, reference) == pool


def test_scores_match_medpy_jaccard_and_skip_the_reference_against_itself():
    ref, r1, r2, r3, model = random_masks(5, seed=3)
    rows, pool = score_patient({"ref": ref, "r1": r1, "r2": r2, "r3": r3}, {"nnunet": model}, reference="ref")
    assert pool == ["r1", "r2", "r3"]
    by = {(r["annotator"], r["target"]): r for r in rows}
    assert ("ref", "reference") not in by and ("ref", "consensus") in by
    assert by[("r1", "reference")]["jaccard"] == pytest.approx(medpy_binary.jc(r1, ref))
    assert by[("nnunet", "reference")]["jaccard"] == pytest.approx(medpy_binary.jc(model, ref))
    cons = consensus([r1, r2, r3])
    assert by[("nnunet", "consensus")]["jaccard"] == pytest.approx(medpy_binary.jc(model, cons))
    assert by[("nnunet", "consensus")]["kind"] == "model"


def test_both_empty_is_undefined_not_zero():
    empty = np.zeros((4, 4, 4), bool)
    rows, _ = score_patient({"ref": empty, "r1": empty}, {"m": empty}, reference="ref")
    assert all(r["jaccard"] is None and r["reason"] for r in rows)
    summary = summarize(rows, {})
    assert all(s["n"] == 0 and s["n_undefined"] == 1 and s["jaccard_mean"] is None for s in summary)


def test_read_rater_groups(tmp_path):
    tsv = tmp_path / "groups.tsv"
    tsv.write_text("rater\tgroup\nref\treference\nn1\tnovice\ne1\tExpert\n")
    assert read_rater_groups(tsv) == {"ref": "reference", "n1": "novice", "e1": "expert"}
    assert resolve_reference(["e1", "n1", "ref"], read_rater_groups(tsv), default=None) == "ref"
    assert resolve_reference(["e1", "n1"], {}, default="n1") == "n1"
    assert resolve_reference(["e1", "n1"], {}, default=None) == "e1"
    tsv.write_text("name\tlevel\nn1\tnovice\n")
    with pytest.raises(UsageError, match="'rater' and a 'group'"):
        read_rater_groups(tsv)
    tsv.write_text("rater\tgroup\na\treference\nb\treference\n")
    with pytest.raises(UsageError, match="several raters"):
        read_rater_groups(tsv)


def test_model_against_each_rater_and_each_groups_per_patient_average_over_positive_patients():
    rng = np.random.default_rng(0)
    groups = {"ref": "reference", "n1": "novice", "n2": "novice", "e1": "expert"}
    rows = []
    for patient in range(12):
        positive = patient < 9  # three reference-negative patients: left out by default
        for name, kind in [("n1", "rater"), ("n2", "rater"), ("e1", "rater"), ("ref", "rater"), ("m", "model")]:
            rows.append({"participant_id": f"sub-{patient}", "session_id": None, "annotator": name, "kind": kind,
                         "target": "consensus", "reference_positive": positive,
                         "jaccard": float(rng.uniform(0.2, 0.9)) if positive or name != "m" else 0.0})
    tests = compare_models_with_raters(rows, groups, reference="ref")
    by = {t.group_b: t for t in tests}
    assert set(by) == {"rater:n1", "rater:n2", "rater:e1", "rater:ref", "group:expert (per-patient average)",
                       "group:novice (per-patient average)", "all raters (per-patient average)"}
    pos = [r for r in rows if r["reference_positive"]]
    model = [r["jaccard"] for r in pos if r["annotator"] == "m"]
    assert len(model) == 9
    # a group is one value per patient: the mean of its raters' Jaccard for that patient
    novice = [np.mean([r["jaccard"] for r in pos if r["participant_id"] == f"sub-{k}"
                       and r["annotator"] in ("n1", "n2")]) for k in range(9)]
    every = [np.mean([r["jaccard"] for r in pos if r["participant_id"] == f"sub-{k}"
                      and r["annotator"] in ("n1", "n2", "e1")]) for k in range(9)]  # reference left out
    assert by["group:novice (per-patient average)"].p_value == pytest.approx(stats.mannwhitneyu(model, novice).pvalue)
    assert by["all raters (per-patient average)"].n_b == 9
    assert by["all raters (per-patient average)"].p_value == pytest.approx(stats.mannwhitneyu(model, every).pvalue)
    assert by["rater:n1"].p_value == pytest.approx(stats.mannwhitneyu(
        model, [r["jaccard"] for r in pos if r["annotator"] == "n1"]).pvalue)
    assert all(t.metric == "Jaccard vs consensus" and t.scope == "reference-positive patients" for t in tests)
    # every patient on request: the negatives' zeros come in
    everyone = {t.group_b: t for t in compare_models_with_raters(rows, groups, reference="ref", positive_only=False)}
    assert everyone["rater:n1"].n_a == 12
    summary = {(s["annotator"], s["kind"]): s for s in summarize(rows, groups, reference="ref")}
    assert summary[("m", "model")]["n"] == 9
    assert summary[("group:novice", "rater group average")]["jaccard_mean"] == pytest.approx(np.mean(novice))
