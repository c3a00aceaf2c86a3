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


def test_model_against_each_rater_each_group_and_all():
    rng = np.random.default_rng(0)
    groups = {"ref": "reference", "n1": "novice", "n2": "novice", "e1": "expert"}
    rows = []
    for patient in range(12):
        for name, kind in [("n1", "rater"), ("n2", "rater"), ("e1", "rater"), ("ref", "rater"), ("m", "model")]:
            rows.append({"participant_id": f"sub-{patient}", "annotator": name, "kind": kind, "target": "consensus",
                         "jaccard": float(rng.uniform(0.2, 0.9))})
    tests = compare_models_with_raters(rows, groups, reference="ref")
    labels = {t.group_b for t in tests}
    assert labels == {"rater:n1", "rater:n2", "rater:e1", "rater:ref", "group:novice", "group:expert", "all raters"}
    model = [r["jaccard"] for r in rows if r["annotator"] == "m"]
    novices = [r["jaccard"] for r in rows if r["annotator"] in ("n1", "n2")]
    every = [r["jaccard"] for r in rows if r["annotator"] in ("n1", "n2", "e1")]  # reference left out
    by = {t.group_b: t for t in tests}
    assert by["group:novice"].p_value == pytest.approx(stats.mannwhitneyu(model, novices).pvalue)
    assert by["all raters"].n_b == len(every) == 36
    assert by["all raters"].metric == "Jaccard vs consensus"
