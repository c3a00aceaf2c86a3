"""RANO resect classes (bids_postop.core.rano): every class boundary, with and without a non-enhancing residual
volume, unknown pre-operative volume, biopsy, and the GTR ↔ "0 cm³ CE" mapping."""

import math

import pytest

from bids_postop.core.postprocess import classify_resection
from bids_postop.core.rano import counts_as_zero_ce, rano_resect_class

# residual CE ml, pre-op CE ml, residual non-CE ml (None: unknown), keyword arguments, class, rule
CASES = [
    # complete CE resection: class 1 vs 2A needs the non-enhancing residual
    (0.0, 30.0, 3.0, {}, "1", "supramaximal"),
    (0.0, 30.0, 5.0, {}, "1", "supramaximal"),
    (0.0, 30.0, 5.0001, {}, "2A", "complete_ce"),
    (0.0, 30.0, None, {}, "1/2A", "complete_ce_nonce_unknown"),
    (0.0, None, 2.0, {}, "1", "supramaximal"),  # a complete CE resection needs no pre-operative volume
    (0.0, None, None, {}, "1/2A", "complete_ce_nonce_unknown"),
    # the zero-CE cut-off: the study's GTR cut-off, 0.175 ml, strict by default
    (0.1749, 30.0, 2.0, {}, "1", "supramaximal"),
    (0.175, 30.0, 2.0, {}, "2B", "near_total"),
    (0.175, 30.0, 2.0, {"zero_ce_inclusive": True}, "1", "supramaximal"),
    (0.1751, 30.0, 2.0, {"zero_ce_inclusive": True}, "2B", "near_total"),
    # near total / subtotal / partial: the non-enhancing residual plays no role
    (1.0, 30.0, None, {}, "2B", "near_total"),
    (1.0, 30.0, 50.0, {}, "2B", "near_total"),
    (1.0001, 30.0, None, {}, "3A", "subtotal"),
    (5.0, 30.0, 1.0, {}, "3A", "subtotal"),
    (5.0001, 30.0, None, {}, "3B", "partial"),
    (40.0, 50.0, None, {}, "3B", "partial"),
    # biopsy: no reduction of tumour volume (a known pre-operative volume always decides)
    (30.0, 30.0, None, {}, "4", "biopsy"),
    (35.0, 30.0, 2.0, {}, "4", "biopsy"),
    (0.5, 0.5, None, {}, "4", "biopsy"),  # a small tumour that was only biopsied is not "near total"
    (30.0, 30.0, None, {"assume_resection": True}, "4", "biopsy"),
    (29.9, 30.0, None, {}, "3B", "partial"),
    (29.9, 30.0, None, {"biopsy_tolerance_ml": 0.5}, "4", "biopsy"),
    # unknown pre-operative volume: a residual > 0 cm³ could be a biopsy
    (2.0, None, None, {}, None, "preop_unknown"),
    (0.5, None, 1.0, {}, None, "preop_unknown"),
    (2.0, None, None, {"assume_resection": True}, "3A", "subtotal"),
    (0.5, None, None, {"assume_resection": True}, "2B", "near_total"),
    # no pre-operative enhancing tumour: the CE-based classes do not apply
    (0.0, 0.0, 1.0, {}, None, "no_preop_ce"),
    # the GTR mapping parameter: a 0.1 ml residual is "0 cm³" only under the study's cut-off
    (0.1, 30.0, 2.0, {}, "1", "supramaximal"),
    (0.1, 30.0, 2.0, {"zero_ce_cutoff_ml": 0.0}, "2B", "near_total"),
    (0.1, 30.0, None, {}, "1/2A", "complete_ce_nonce_unknown"),
    (0.1, 30.0, None, {"zero_ce_cutoff_ml": 0.0}, "2B", "near_total"),
    (0.0, 30.0, 6.0, {"zero_ce_cutoff_ml": 0.0}, "2A", "complete_ce"),
]


@pytest.mark.parametrize("residual, preop, nonce, kwargs, expected, rule", CASES)
def test_rano_class_boundaries(residual, preop, nonce, kwargs, expected, rule):
    result = rano_resect_class(residual, preop, residual_nonce_ml=nonce, **kwargs)
    assert (result.rano_class, result.rule) == (expected, rule)
    assert result.label == ("n/a" if expected is None else expected)
    assert result.reason  # every decision says why
    assert result.to_dict()["rano_class"] == expected


def test_reason_states_the_volumes_and_threshold():
    result = rano_resect_class(3.2, 40.0)
    assert "3.2 ml" in result.reason and "5 cm³" in result.reason
    assert "0.175" in rano_resect_class(0.1, 40.0, residual_nonce_ml=1.0).reason


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("residual", [0.0, 0.05, 0.1749, 0.175, 0.1751, 0.3, 1.0])
def test_zero_ce_matches_the_study_gtr_rule(residual, inclusive):
    # the default mapping is exactly the study's GTR call: GTR <-> "0 cm³ residual CE tumour"
    gtr = classify_resection(residual, gtr_inclusive=inclusive) == "GTR"
    assert counts_as_zero_ce(residual, zero_ce_inclusive=inclusive) is gtr


def test_literal_zero_counts_only_an_empty_residual():
    assert counts_as_zero_ce(0.0, zero_ce_cutoff_ml=0.0)
    assert not counts_as_zero_ce(1e-6, zero_ce_cutoff_ml=0.0)


@pytest.mark.parametrize("args, kwargs", [
    ((-0.1, 30.0), {}),
    ((math.nan, 30.0), {}),
    ((1.0, -5.0), {}),
    ((1.0, math.inf), {}),
    ((0.0, 30.0), {"residual_nonce_ml": -1.0}),
    ((0.0, 30.0), {"zero_ce_cutoff_ml": 1.5}),
    ((0.0, 30.0), {"zero_ce_cutoff_ml": -0.1}),
    ((1.0, 30.0), {"biopsy_tolerance_ml": -1.0}),
])
def test_invalid_inputs_are_refused(args, kwargs):
    with pytest.raises(ValueError):
        rano_resect_class(*args, **kwargs)
