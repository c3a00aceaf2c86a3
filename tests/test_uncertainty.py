"""Member uncertainty and the review flag (bids_postop.core.uncertainty): table-driven on tiny arrays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bids_postop.core.postprocess import postprocess_probability
from bids_postop.core.uncertainty import MEMBER_KINDS, assess_members

SHAPE = (20, 20, 20)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])  # 1 mm³ voxels: 175 voxels = the cut-off 0.175 ml


def blob(n_voxels: int, value: float = 0.95, *, start: int = 2) -> np.ndarray:
    """A probability map holding one compact blob of exactly ``n_voxels`` voxels at ``value`` (0 elsewhere)."""
    p = np.zeros(SHAPE, np.float32)
    flat = np.zeros(10 * 10 * 10, np.float32)
    flat[:n_voxels] = value
    p[start:start + 10, start:start + 10, start:start + 10] = flat.reshape(10, 10, 10)
    return p


# name: (member voxel counts, ensemble voxel count, score threshold, mirror scores, expected flag, expected rules)
CASES = {
    "members agree on RT": ([400, 420, 410], 410, None, None, False, (False, False, None)),
    "members agree on GTR (nothing found)": ([0, 0], 0, None, None, False, (False, False, None)),
    "members disagree": ([100, 300], 200, None, None, True, (True, True, None)),
    "members agree, ensemble crosses": ([150, 160], 180, None, None, True, (False, True, None)),
    "agree, mirror score above threshold": ([400, 420, 410], 410, 0.15, (0.3, 0.1, 0.2), True, (False, False, True)),
    "agree, mirror score below threshold": ([400, 420, 410], 410, 0.25, (0.3, 0.1, 0.2), False,
                                            (False, False, False)),
    "agree, mirror score equal to the threshold": ([400, 420, 410], 410, 0.2, (0.2, 0.2), False,
                                                   (False, False, False)),
    "threshold but no mirror score (no mirroring)": ([400, 420, 410], 410, 0.001, None, False,
                                                     (False, False, None)),
    "at the cut-off exactly (RT by default)": ([175, 175], 175, None, None, False, (False, False, None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_review_flag_rules(name):
    counts, ensemble, limit, mirror, flag, rules = CASES[name]
    members = [blob(n) for n in counts]
    std, result = assess_members(members, blob(ensemble), AFFINE, kind="folds", threshold=0.5,
                                 min_component_voxels=1, score_threshold=limit, mirror_scores=mirror)
    assert result.review_flag is flag, result.reasons
    assert (result.rules["members_disagree"], result.rules["interval_crosses_cutoff"],
            result.rules["score_above_threshold"]) == rules
    assert result.member_volumes_ml == tuple(n / 1000 for n in counts)
    assert result.residual_volume_ml_min == min(counts) / 1000 and result.residual_volume_ml_max == max(counts) / 1000
    assert result.volume_interval_ml == (min(*counts, ensemble) / 1000, max(*counts, ensemble) / 1000)
    n_rt = sum(n >= 175 for n in counts)
    assert result.rt_fraction_members == n_rt / len(counts)
    assert result.member_calls == tuple("RT" if n >= 175 else "GTR" for n in counts)
    assert result.ensemble_call == ("RT" if ensemble >= 175 else "GTR")
    assert result.mirror_score == (None if mirror is None else pytest.approx(np.mean(mirror)))
    if limit is None:
        assert any("no score threshold" in r for r in result.reasons)
    else:
        assert not any("no score threshold" in r for r in result.reasons)
        assert any("no mirror score" in r for r in result.reasons) is (mirror is None)
    if flag:  # every rule that fired is explained
        fired = [k for k, v in result.rules.items() if v]
        assert len([r for r in result.reasons if "no score threshold" not in r]) == len(fired)
    assert std is not None and std.shape == SHAPE and std.dtype == np.float32


def test_gtr_inclusive_moves_exactly_the_cut_off():
    members = [blob(175), blob(176)]
    _, paper = assess_members(members, blob(175), AFFINE, kind="folds", threshold=0.5, min_component_voxels=1)
    _, code = assess_members(members, blob(175), AFFINE, kind="folds", threshold=0.5, min_component_voxels=1,
                             gtr_inclusive=True)
    assert paper.member_calls == ("RT", "RT") and paper.review_flag is False
    assert code.member_calls == ("GTR", "RT") and code.review_flag is True and code.rt_fraction_members == 0.5


def test_map_is_the_member_std_and_score_one_minus_their_soft_agreement_inside_the_union():
    rng = np.random.default_rng(0)
    members = []
    for shift in (0, 1, 3):
        p = np.zeros(SHAPE, np.float32)
        p[4 + shift:12 + shift, 5:12, 6:13] = 0.7 + 0.3 * rng.random((8, 7, 7), dtype=np.float32)
        p += 0.2 * rng.random(SHAPE, dtype=np.float32)  # sub-threshold noise everywhere: in the map, not the score
        members.append(p)
    ensemble = np.mean(members, axis=0)
    std, result = assess_members(iter(members), ensemble, AFFINE, kind="mirrored passes", threshold=0.5,
                                 min_component_voxels=1, names=["a", "b", "c"])
    stack = np.stack(members).astype(np.float64)
    np.testing.assert_allclose(std, stack.std(axis=0), atol=2e-6)  # float32 Welford vs float64 two-pass
    union = (stack >= 0.5).any(axis=0)
    # pairwise inner products of the members inside the union, written out (not the mean/variance shortcut)
    inner = [[float((stack[i][union] * stack[j][union]).sum()) for j in range(3)] for i in range(3)]
    pairs = sum(inner[i][j] for i in range(3) for j in range(3) if i != j)
    agreement = pairs / (2 * sum(inner[i][i] for i in range(3)))  # (n - 1) = 2
    assert result.uncertainty_score == pytest.approx(1 - agreement, abs=1e-5)
    assert 0 < result.uncertainty_score < 0.5
    assert result.member_names == ("a", "b", "c") and result.members_kind == "mirrored passes"
    assert result.notes  # mirrored passes are not independent models: said in the output


def test_identical_members_give_zero_uncertainty():
    member = blob(300, 0.8)
    std, result = assess_members([member, member.copy(), member.copy()], member, AFFINE, kind="folds", threshold=0.5,
                                 min_component_voxels=1, score_threshold=0.0, mirror_scores=[0.0, 0.0, 0.0])
    assert std.max() == 0.0 and result.uncertainty_score == 0.0
    assert result.review_flag is False and result.rules["score_above_threshold"] is False  # "exceeds": strictly


def test_member_volumes_use_the_ensemble_post_processing():
    """Each member's volume and call are postprocess_probability's, on an oblique anisotropic grid, with specks."""
    rng = np.random.default_rng(3)
    theta = np.deg2rad(11)
    affine = np.array([[0.9 * np.cos(theta), -0.9 * np.sin(theta), 0, 10], [0.9 * np.sin(theta), 0.9 * np.cos(theta),
                       0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    members = []
    for k in range(3):
        p = (rng.random(SHAPE) < 0.02).astype(np.float32) * 0.9  # isolated specks: removed below 20 voxels
        p[3:9 + k, 4:10, 5:9] = 0.8
        members.append(p)
    _, result = assess_members(members, members[0], affine, kind="folds", threshold=0.6)
    for member, ml, call in zip(members, result.member_volumes_ml, result.member_calls, strict=True):
        _, measures = postprocess_probability(member, affine, threshold=0.6)
        assert (ml, call) == (measures.residual_volume_ml, measures.resection_status)
        assert measures.components_removed > 0


def test_kind_none_is_not_applicable():
    std, result = assess_members([], blob(300), AFFINE, kind="none", threshold=0.5)
    assert std is None
    d = result.to_dict()
    for key in ("member_volumes_ml", "member_calls", "residual_volume_ml_min", "residual_volume_ml_max",
                "volume_interval_ml", "rt_fraction_members", "uncertainty_score", "review_flag"):
        assert d[key] is None, key
    assert d["members_kind"] == "none" and d["members_count"] == 0 and d["ensemble_call"] == "RT"
    assert "nothing varies" in d["reasons"][0]


def test_to_dict_is_json_ready():
    _, result = assess_members([blob(100), blob(300)], blob(200), AFFINE, kind="folds", threshold=0.5,
                               min_component_voxels=1, score_threshold=0.1)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["members_kind"] == "folds" and d["members_count"] == 2 and d["member_names"] == ["member_0", "member_1"]
    assert d["member_calls"] == ["GTR", "RT"] and d["rt_fraction_members"] == 0.5 and d["review_flag"] is True
    assert d["residual_volume_ml_min"] == 0.1 and d["residual_volume_ml_max"] == 0.3
    assert math.isfinite(d["uncertainty_score"]) and d["score_threshold"] == 0.1


@pytest.mark.parametrize("call, message", [
    (lambda: assess_members([blob(10)], blob(10), AFFINE, kind="none", threshold=0.5), "must be empty"),
    (lambda: assess_members([blob(10)], blob(10), AFFINE, kind="folds", threshold=0.5), "at least 2"),
    (lambda: assess_members([blob(10), np.zeros((3, 3, 3))], blob(10), AFFINE, kind="folds", threshold=0.5),
     "shape"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="folds", threshold=0.5, names=["a"]), "names"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="bootstrap", threshold=0.5), "one of"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="folds", threshold=0.5, score_threshold=-1),
     "from 0 to 1"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="folds", threshold=0.5,
                            score_threshold=float("nan")), "from 0 to 1"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="folds", threshold=0.5, score_threshold=1.5),
     "from 0 to 1"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="folds", threshold=0.5,
                            member_thresholds=[0.5]), "member thresholds"),
    (lambda: assess_members([blob(10)] * 2, blob(10), AFFINE, kind="folds", threshold=0.5,
                            voting=[False, False]), "no member votes"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
    assert MEMBER_KINDS == ("folds", "mirrored passes", "none")


@pytest.mark.parametrize("section, expected", [(None, None), ({}, None), ({"score_threshold": 0.08}, 0.08),
                                               ({"score_threshold": "high"}, "ModelError"),
                                               ({"score_threshold": -0.1}, "ModelError"), ("0.1", "ModelError"),
                                               ({"members": {"fold_0": {"threshold": 1.2}}}, "ModelError"),
                                               ({"members": ["fold_0"]}, "ModelError")])
def test_score_threshold_from_the_model_card(tmp_path, section, expected):
    import dataclasses

    from bids_postop.errors import ModelError
    from bids_postop.segmentation.models import resolve_models, score_threshold

    [card] = [c for c in resolve_models("demo") if c.configuration == "B"]
    raw = dict(card.raw)
    if section is not None:
        raw["uncertainty"] = section
    card = dataclasses.replace(card, raw=raw)
    if expected == "ModelError":
        with pytest.raises(ModelError, match="bids_postop_model.json.*uncertainty"):
            score_threshold(card)
    else:
        assert score_threshold(card) == expected


def test_score_of_two_members_is_one_minus_their_soft_dice_and_does_not_depend_on_size():
    def box(size: int, shift: int, value: float) -> np.ndarray:
        p = np.zeros((40, 40, 40), np.float32)
        p[2 + shift:2 + shift + size, 2:2 + size, 2:2 + size] = value
        return p

    for size in (4, 8, 16):  # the same relative disagreement at three sizes: the same score
        a, b = box(size, 0, 0.9), box(size, size // 4, 0.9)
        _, result = assess_members([a, b], (a + b) / 2, AFFINE, kind="folds", threshold=0.5, min_component_voxels=1)
        soft_dice = 2 * float((a * b).sum()) / float((a * a).sum() + (b * b).sum())
        assert result.uncertainty_score == pytest.approx(1 - soft_dice, abs=1e-6)
        assert result.uncertainty_score == pytest.approx(0.25, abs=1e-6)
    a, b = box(6, 0, 1.0), box(6, 10, 1.0)  # disjoint residuals: complete disagreement
    _, disjoint = assess_members([a, b], (a + b) / 2, AFFINE, kind="folds", threshold=0.5, min_component_voxels=1)
    assert disjoint.uncertainty_score == pytest.approx(1.0)
    # one member draws the residual twice as large as the other, each confident: high, unlike a small shift
    a, b = box(8, 0, 0.95), box(8, 0, 0.95)
    b[2:18, 2:10, 2:10] = 0.95
    _, larger = assess_members([a, b], (a + b) / 2, AFFINE, kind="folds", threshold=0.5, min_component_voxels=1)
    a, b = box(8, 0, 0.95), box(8, 1, 0.95)
    _, shifted = assess_members([a, b], (a + b) / 2, AFFINE, kind="folds", threshold=0.5, min_component_voxels=1)
    assert larger.uncertainty_score > 2 * shifted.uncertainty_score


def test_member_thresholds_and_votes_change_only_what_they_should():
    """A fold whose probabilities run low: at the ensemble's threshold it calls GTR and flags the patient; at its own
    threshold it agrees. A fold kept out of the vote changes rules 1 and 2, not the volumes, the map or the score."""
    confident, timid = blob(400, 0.95), blob(400, 0.6)
    _, shared = assess_members([confident, timid], (confident + timid) / 2, AFFINE, kind="folds", threshold=0.7,
                               min_component_voxels=1)
    assert shared.member_calls == ("RT", "GTR") and shared.review_flag is True
    _, own = assess_members([confident, timid], (confident + timid) / 2, AFFINE, kind="folds", threshold=0.7,
                            min_component_voxels=1, member_thresholds=[0.7, 0.5])
    assert own.member_calls == ("RT", "RT") and own.review_flag is False and own.member_thresholds == (0.7, 0.5)
    dead = np.zeros(SHAPE, np.float32)
    members = [confident, confident.copy(), dead]
    std_all, voting_all = assess_members(members, np.mean(members, axis=0), AFFINE, kind="folds", threshold=0.5,
                                         min_component_voxels=1, names=["fold_0", "fold_1", "fold_2"])
    std_two, voting_two = assess_members(members, np.mean(members, axis=0), AFFINE, kind="folds", threshold=0.5,
                                         min_component_voxels=1, names=["fold_0", "fold_1", "fold_2"],
                                         voting=[True, True, False])
    assert voting_all.review_flag is True and voting_all.rules["members_disagree"] is True
    assert voting_two.review_flag is False and voting_two.members_not_voting == ("fold_2",)
    assert voting_two.member_volumes_ml == voting_all.member_volumes_ml
    assert voting_two.rt_fraction_members == voting_all.rt_fraction_members == 2 / 3
    assert voting_two.uncertainty_score == voting_all.uncertainty_score
    np.testing.assert_array_equal(std_two, std_all)
    assert any("fold_2" in note for note in voting_two.notes)
    _, scored = assess_members(members, np.mean(members, axis=0), AFFINE, kind="folds", threshold=0.5,
                               min_component_voxels=1, voting=[True, True, False], mirror_scores=[0.1, 0.2, 0.0])
    assert scored.mirror_score == pytest.approx(0.15) and scored.mirror_scores == (0.1, 0.2, 0.0)  # voting networks


def test_mirror_disagreement_is_one_minus_soft_agreement_over_the_passes_region():
    from bids_postop.core.uncertainty import mirror_disagreement

    rng = np.random.default_rng(5)
    passes = []
    for shift in (0, 2):
        p = 0.3 * rng.random(SHAPE, dtype=np.float32)  # below 0.5 everywhere: outside the region
        p[4 + shift:12 + shift, 5:12, 6:13] = 0.6 + 0.4 * rng.random((8, 7, 7), dtype=np.float32)
        passes.append(p)
    region = (np.stack(passes) >= 0.5).any(axis=0)
    a, b = (p[region].astype(np.float64) for p in passes)
    soft_dice = 2 * float((a * b).sum()) / float((a * a).sum() + (b * b).sum())
    assert mirror_disagreement(passes) == pytest.approx(1 - soft_dice, abs=1e-9)
    assert mirror_disagreement([passes[0], passes[0].copy()]) == 0.0
    assert mirror_disagreement([np.full(SHAPE, 0.2, np.float32)] * 2) == 0.0  # nothing reaches 0.5: no region
    with pytest.raises(ValueError, match="at least 2"):
        mirror_disagreement(passes[:1])


def test_a_malformed_review_section_fails_when_the_model_is_resolved(tmp_path):
    """Before any participant runs (exit 64 at the CLI), not in each participant's segmentation step."""
    import shutil

    from bids_postop.errors import ModelError
    from bids_postop.segmentation.models import resolve, resolve_models

    [card] = [c for c in resolve_models("demo") if c.configuration == "B"]
    folder = tmp_path / "B"
    shutil.copytree(card.folder, folder)
    raw = json.loads((folder / "bids_postop_model.json").read_text())
    assert [m.card.name for m in resolve(folder)] == [raw["name"]]
    raw["uncertainty"] = {"score_threshold": 0.1, "members": {"fold_0": {"threshold": "high"}}}
    (folder / "bids_postop_model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"bids_postop_model.json.*uncertainty.members.fold_0.threshold"):
        resolve(folder)
