"""Per-patient uncertainty from a model's ensemble members, and a flag that says when to review the GTR/RT call.

*Members* are what the model already computes on the way to its probability map (see
:mod:`bids_postop.segmentation.backend`):

- ``"folds"``: each fold network's foreground probability, when several folds run (nnU-Net: each fold's
  logits, mirrored passes included, as nnU-Net averages them; Raidionics: each fold's probability);
- ``"mirrored passes"``: a single fold run with test-time mirroring: each mirrored pass (the unmirrored one and
  one per combination of mirrored axes), flipped back;
- ``"none"``: one fold without test-time augmentation: nothing varies, every measure here is ``None`` (n/a).

Each member's foreground probability, on the post-op T1w-CE grid, goes through the ensemble's own
post-processing (:mod:`bids_postop.core.postprocess`: threshold, removal of components under
``min_component_voxels``, volume as voxel count × |det(affine)|, GTR/RT at the cut-off). From these:

``member_volumes_ml``, ``member_calls``
    each member's residual volume (ml) and GTR/RT call;
``residual_volume_ml_min``, ``residual_volume_ml_max``
    the smallest and largest member volume;
``rt_fraction_members``
    the share of members that call RT (0 = all GTR, 1 = all RT);
``volume_interval_ml``
    [min, max] over the members *and* the ensemble's own volume (the one reported as the patient's residual);
voxel uncertainty map
    the members' standard deviation (population, ``ddof=0``) of the foreground probability, voxel by voxel, in
    probability units, 0 … 0.5 (0 where the members agree; 0.5 where half say 0 and half say 1). Chosen over
    entropy because it is in the map's own units, is 0 exactly where the members agree, and does not react to the
    ensemble's own confidence in a voxel, only to disagreement;
``uncertainty_score``
    **one minus the members' soft agreement inside the union of their residual masks** (the voxels that at least
    one member reports as residual after post-processing): ``n/(n-1) * sum(var) / sum(var + mean^2)`` over those
    voxels, with the members' mean and variance (``ddof=0``) of the foreground probability. It equals
    ``1 - sum_{i!=j} <p_i, p_j> / ((n-1) * sum_i <p_i, p_i>)``: for two members, 1 minus the soft Dice of their
    probability maps; 0 when every member gives the same probabilities, 1 when their residuals are disjoint; 0.0
    when no member reports any residual. It is a ratio of sums, so it does not depend on the residual's size or
    the voxel size, and it weighs the voxels by how strongly the members report them: a residual that one member
    draws much larger than another scores high even where each is confident. It cannot see a residual that every
    member misses (a confident false GTR).

    The first definition (until 2026-12-02) was the mean standard deviation over the union. Measured on 16
    simulated held-out patients with a 3-fold demo-recipe model (benchmarks/review_flag.py, RESULTS.md), its
    AUROC for "wrong call or Dice < 0.5" was 0.07: the rim of every residual has a standard deviation near the
    maximum whichever member is right, so the mean carried the residuals' shapes, not the members' disagreement
    about them. This one was chosen on those 16 patients and checked on a fresh held-out set (RESULTS.md).

The **review flag** is ``True`` when any of these rules fires (``rules`` says which, ``reasons`` in words):

1. ``members_disagree``: the members do not all make the same GTR/RT call;
2. ``interval_crosses_cutoff``: ``volume_interval_ml`` lies on both sides of the cut-off (with the members
   alone this is rule 1; the interval adds the ensemble's own volume, so it also fires when the members agree
   with each other but the reported call differs from theirs);
3. ``score_above_threshold``: ``mirror_score`` exceeds ``score_threshold``, a value chosen on validation
   folds and stated in the model card (``"uncertainty": {"score_threshold": ...}``). Without it (or without a
   mirror score: no test-time mirroring) the rule is not applied (``None``) and ``reasons`` says so.

``mirror_score`` (:func:`mirror_disagreement`) is the score that a threshold can be chosen for: 1 − the soft
agreement of *one network's* mirrored test-time passes, at the network's resolution, over the voxels where at least
one pass reaches probability 0.5; averaged over the (voting) networks that ran. Unlike ``uncertainty_score`` (whose
members are folds at inference but could only be one network's passes on a validation participant, another
scale), it is the same quantity on a validation participant (its own fold's network) and on a new patient (each
fold's network), so a threshold chosen on validation folds applies at inference.

Members' post-processing: each member may have its own probability threshold (``member_thresholds``: a fold's
threshold chosen on its own validation participants) and a member may be kept out of rules 1 and 2
(``voting``: a fold that found no residual in any reference-positive validation participant has shown no ability
to contradict an RT call); such members still make the map, the score and the ensemble.

With members of kind ``"none"`` the flag itself is ``None`` (n/a): nothing can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from bids_postop.core.postprocess import (
    GTR_CUTOFF_ML,
    MIN_COMPONENT_VOXELS,
    Grid,
    ResectionStatus,
    binarize,
    classify_resection,
    remove_small_components,
    volume_ml,
)

MemberKind = Literal["folds", "mirrored passes", "none"]
MEMBER_KINDS: tuple[MemberKind, ...] = ("folds", "mirrored passes", "none")
SCORE_DEFINITION = ("1 - soft agreement of the members over the union of their residual masks: n/(n-1) * "
                    "sum(variance) / sum(variance + mean^2) of the members' foreground probabilities (ddof=0), = 1 - "
                    "soft Dice of the members' probability maps for two members; 0 when the members agree, 1 when "
                    "their residuals are disjoint, 0 when no member reports a residual")
MAP_DEFINITION = "members' standard deviation (ddof=0) of the foreground probability, voxel by voxel (0-0.5)"
CARD_SECTION = "uncertainty"  # model card: {"uncertainty": {"score_threshold": <float>, "members": {...}}}
MIRROR_REGION_PROBABILITY = 0.5
MIRROR_SCORE_DEFINITION = ("1 - soft agreement of one network's mirrored test-time passes at the network's "
                           "resolution, over the voxels where at least one pass has foreground probability >= 0.5 "
                           "(n/(n-1) * sum(variance) / sum(variance + mean^2), ddof=0; 0 when no voxel), averaged "
                           "over the networks (folds) that ran")


@dataclass(frozen=True)
class MemberUncertainty:
    """One patient's member-based uncertainty and review flag (see the module docstring for every definition).

    Values that need members (volumes, calls, min/max, interval, ``rt_fraction_members``, ``uncertainty_score``,
    ``review_flag``) are ``None`` when ``members_kind`` is ``"none"``. Volumes in ml.
    """

    members_kind: MemberKind
    members_count: int
    member_names: tuple[str, ...]
    ensemble_volume_ml: float
    ensemble_call: ResectionStatus
    member_volumes_ml: tuple[float, ...] | None
    member_calls: tuple[ResectionStatus, ...] | None
    residual_volume_ml_min: float | None
    residual_volume_ml_max: float | None
    volume_interval_ml: tuple[float, float] | None
    rt_fraction_members: float | None
    uncertainty_score: float | None
    score_threshold: float | None
    review_flag: bool | None
    rules: dict[str, bool | None]
    reasons: tuple[str, ...]
    threshold: float
    min_component_voxels: int
    gtr_cutoff_ml: float
    gtr_inclusive: bool
    score_definition: str = SCORE_DEFINITION
    map_definition: str = MAP_DEFINITION
    notes: tuple[str, ...] = field(default_factory=tuple)
    member_thresholds: tuple[float, ...] | None = None  # each member's probability threshold (None: ``threshold``)
    members_not_voting: tuple[str, ...] = ()  # members kept out of rules 1 and 2 (the card's ``votes: false``)
    mirror_scores: tuple[float, ...] | None = None  # per network that ran (None: no test-time mirroring)
    mirror_score: float | None = None  # their mean: what rule 3 compares with ``score_threshold``
    mirror_score_definition: str = MIRROR_SCORE_DEFINITION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists, ``None`` for n/a)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


def _residual(probability: np.ndarray, grid: Grid, *, threshold: float, min_component_voxels: int
              ) -> tuple[np.ndarray, float]:
    """The ensemble's post-processing (:func:`bids_postop.core.postprocess.postprocess_probability`'s steps):
    boolean residual mask and its volume in ml."""
    mask = remove_small_components(binarize(probability, threshold), min_voxels=min_component_voxels)
    return mask, volume_ml(mask, grid)


_CHUNK_VOXELS = 1 << 22  # Welford's temporaries per slab of the first axis: 16 MiB each, never a whole grid


def _welford_update(mean: np.ndarray, m2: np.ndarray, member: np.ndarray, count: int) -> None:
    """Welford's running mean and sum of squared deviations, in place (float32; exactly 0 where members agree),
    slab by slab along the member's outermost axis in memory (members may be transposed views)."""
    order = tuple(int(a) for a in np.argsort(member.strides)[::-1])
    mean, m2, member = mean.transpose(order), m2.transpose(order), member.transpose(order)
    step = max(1, _CHUNK_VOXELS // max(1, int(np.prod(member.shape[1:]))))
    for start in range(0, member.shape[0], step):
        part = slice(start, start + step)
        x, mu = member[part], mean[part]
        delta = x - mu
        mu += delta / np.float32(count)
        delta *= x - mu
        m2[part] += delta


def check_score_threshold(value: Any, *, where: str = "score_threshold") -> float | None:
    """``None`` or a finite number in [0, 1] (as float); anything else raises ``ValueError`` naming ``where``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or \
            not 0 <= value <= 1:
        raise ValueError(f"{where} must be a number from 0 to 1 (a mirror score); got {value!r}")
    return float(value)


def _soft_disagreement(mean: np.ndarray, variance: np.ndarray, region: np.ndarray, n: int) -> float:
    """``n/(n-1) * sum(variance) / sum(variance + mean^2)`` over ``region`` (float64 sums); 0.0 for an empty
    region or members that are all zero there."""
    if not region.any():
        return 0.0
    spread = float(variance[region].sum(dtype=np.float64))
    total = spread + float(np.square(mean[region], dtype=np.float64).sum())
    if total <= 0.0:
        return 0.0
    return min(1.0, n / (n - 1) * spread / total)


def mirror_disagreement(passes: Sequence[np.ndarray], *,
                        region_probability: float = MIRROR_REGION_PROBABILITY) -> float:
    """1 − the soft agreement of one network's mirrored passes (foreground probabilities, any grid, same shape)
    over the voxels where at least one pass reaches ``region_probability``; 0.0 when none does. The same formula as
    ``uncertainty_score`` (``n/(n-1) * sum(var) / sum(var + mean^2)``) without post-processing: it runs where the
    passes are, at the network's resolution, on validation participants and new patients alike."""
    if len(passes) < 2:
        raise ValueError(f"a mirror score needs at least 2 passes; got {len(passes)}")
    arrays = [np.asarray(p, dtype=np.float32) for p in passes]
    region = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        if array.shape != region.shape:
            raise ValueError(f"passes of shapes {region.shape} and {array.shape}")
        region |= array >= region_probability
    if not region.any():
        return 0.0
    values = np.stack([a[region] for a in arrays]).astype(np.float64)
    return _soft_disagreement(values.mean(axis=0), values.var(axis=0), np.ones(values.shape[1], dtype=bool),
                              len(arrays))


def assess_members(members: Iterable[np.ndarray], probability: np.ndarray, grid: Grid, *, kind: MemberKind,
                   threshold: float, min_component_voxels: int = MIN_COMPONENT_VOXELS,
                   cutoff_ml: float = GTR_CUTOFF_ML, gtr_inclusive: bool = False,
                   score_threshold: float | None = None, names: Sequence[str] | None = None,
                   member_thresholds: Sequence[float] | None = None, voting: Sequence[bool] | None = None,
                   mirror_scores: Sequence[float] | None = None,
                   ) -> tuple[np.ndarray | None, MemberUncertainty]:
    """Member volumes and calls, the voxel uncertainty map, the score and the review flag.

    Parameters
    ----------
    members
        Each member's foreground probability, float (x, y, z) arrays on the grid of ``probability``; read one at a
        time (a generator that computes each member on demand keeps one member in memory). Empty for kind
        ``"none"``, at least two otherwise.
    probability
        The ensemble's probability (what the patient's residual mask is made from), same shape.
    grid
        The grid's affine (or voxel volume in mm³; :func:`bids_postop.core.postprocess.volume_ml`).
    kind
        ``"folds"``, ``"mirrored passes"`` or ``"none"`` (:data:`MEMBER_KINDS`).
    threshold, min_component_voxels, cutoff_ml, gtr_inclusive
        The ensemble's post-processing and GTR rule, applied to every member unchanged.
    score_threshold
        Flag when the mirror score (the mean of ``mirror_scores``) exceeds it; ``None``: that rule is not applied.
    names
        The members' names (``fold_0``, …); default ``member_0``, ….
    member_thresholds
        Each member's probability threshold (the model card's per-fold thresholds); default ``threshold`` for all.
    voting
        Which members count in rules 1 and 2 (default: all; at least one must).
    mirror_scores
        Each network's :func:`mirror_disagreement` (``None``: no test-time mirroring ran); their mean over the
        voting networks is the score rule 3 compares.

    Returns
    -------
    The voxel uncertainty map (float32, shape of ``probability``; ``None`` for kind ``"none"``) and the
    :class:`MemberUncertainty`.
    """
    if kind not in MEMBER_KINDS:
        raise ValueError(f"members kind must be one of {MEMBER_KINDS}; got {kind!r}")
    score_threshold = check_score_threshold(score_threshold)
    mirror = None if mirror_scores is None else tuple(float(v) for v in mirror_scores)
    mirror_mean = float(np.mean(mirror)) if mirror else None
    if mirror and voting is not None and kind == "folds" and len(mirror) == len(voting) and any(voting):
        # the networks kept out of the vote are kept out of the mean too (a dead fold's passes agree on nothing)
        mirror_mean = float(np.mean([m for m, v in zip(mirror, voting, strict=True) if v]))
    probability = np.asarray(probability)
    ensemble_mask, ensemble_ml = _residual(probability, grid, threshold=threshold,
                                           min_component_voxels=min_component_voxels)
    del ensemble_mask
    ensemble_call = classify_resection(ensemble_ml, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
    common: dict[str, Any] = dict(ensemble_volume_ml=ensemble_ml, ensemble_call=ensemble_call,
                                  score_threshold=score_threshold, threshold=float(threshold),
                                  min_component_voxels=int(min_component_voxels), gtr_cutoff_ml=float(cutoff_ml),
                                  gtr_inclusive=bool(gtr_inclusive), mirror_scores=mirror or None,
                                  mirror_score=mirror_mean)

    volumes: list[float] = []
    union = mean = m2 = np.zeros(0, dtype=np.float32)  # allocated at the first member, in its memory layout
    for count, member in enumerate(members, start=1):
        if kind == "none":
            raise ValueError("members of kind 'none' must be empty (one fold without test-time augmentation)")
        member = np.asarray(member, dtype=np.float32)
        if member.shape != probability.shape:
            raise ValueError(f"member {count - 1} has shape {member.shape}; the probability map has "
                             f"{probability.shape}")
        if count == 1:
            union, mean, m2 = np.zeros_like(member, dtype=bool), np.zeros_like(member), np.zeros_like(member)
        own = threshold if member_thresholds is None or count > len(member_thresholds) \
            else member_thresholds[count - 1]
        mask, ml = _residual(member, grid, threshold=own, min_component_voxels=min_component_voxels)
        volumes.append(ml)
        union |= mask
        del mask
        _welford_update(mean, m2, member, count)
        del member
    n = len(volumes)
    member_names = tuple(names) if names is not None else tuple(f"member_{i}" for i in range(n))
    if len(member_names) != n:
        raise ValueError(f"{len(member_names)} member names for {n} members")
    if member_thresholds is not None and kind != "none" and len(member_thresholds) != n:
        raise ValueError(f"{len(member_thresholds)} member thresholds for {n} members")
    votes = [True] * n if voting is None or kind == "none" else [bool(v) for v in voting]
    if len(votes) != n:
        raise ValueError(f"{len(votes)} voting entries for {n} members")
    if n and not any(votes):
        raise ValueError("no member votes: at least one member must count in the review rules")
    if kind == "none":
        return None, MemberUncertainty(
            members_kind="none", members_count=0, member_names=(), member_volumes_ml=None, member_calls=None,
            residual_volume_ml_min=None, residual_volume_ml_max=None, volume_interval_ml=None,
            rt_fraction_members=None, uncertainty_score=None, review_flag=None,
            rules={"members_disagree": None, "interval_crosses_cutoff": None, "score_above_threshold": None},
            reasons=("no ensemble members (one fold without test-time augmentation): nothing varies, uncertainty "
                     "not assessed (n/a)",), **common)
    if n < 2:
        raise ValueError(f"members of kind {kind!r} need at least 2 members; got {n}")
    np.divide(m2, np.float32(n), out=m2)
    np.maximum(m2, 0, out=m2)
    score = _soft_disagreement(mean, m2, union, n)
    del mean
    std = np.sqrt(m2, out=m2)

    def call(ml: float) -> ResectionStatus:
        return classify_resection(ml, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)

    calls = tuple(call(ml) for ml in volumes)
    n_rt = sum(c == "RT" for c in calls)
    voters = [i for i in range(n) if votes[i]]
    voting_calls = [calls[i] for i in voters]
    low = min(*(volumes[i] for i in voters), ensemble_ml)
    high = max(*(volumes[i] for i in voters), ensemble_ml)
    rule = "<=" if gtr_inclusive else "<"
    disagree = len(set(voting_calls)) > 1
    crosses = call(low) != call(high)
    above = None if score_threshold is None or mirror_mean is None else mirror_mean > score_threshold
    reasons = []
    not_voting = tuple(member_names[i] for i in range(n) if not votes[i])
    among = f" (of the voting members; {', '.join(not_voting)} not voting)" if not_voting else ""
    if disagree:
        reasons.append(f"members disagree on GTR/RT: {sum(c == 'RT' for c in voting_calls)} of {len(voters)} call "
                       f"RT{among} (GTR if residual {rule} {cutoff_ml} ml)")
    if crosses:
        reasons.append(f"volume interval {low:.3f}-{high:.3f} ml (members{among} and ensemble) crosses the GTR "
                       f"cut-off {cutoff_ml} ml" + ("" if disagree else
                                                    f"; the members agree ({voting_calls[0]}) but the ensemble "
                                                    f"calls {ensemble_call}"))
    if above:
        reasons.append(f"mirror score {mirror_mean:.4f} exceeds the threshold {score_threshold}")
    notes = (("mirrored passes share one network's weights: their spread measures the prediction's sensitivity to "
              "mirroring, not the disagreement of independently trained folds, and is usually smaller",)
             if kind == "mirrored passes" else ())
    if not_voting:
        notes += (f"{', '.join(not_voting)}: kept out of the GTR/RT agreement and the volume interval (the model "
                  "card: this fold found no residual in any reference-positive validation participant); still in "
                  "the ensemble, the map and the score",)
    if score_threshold is None:
        reasons.append(f"no score threshold ({CARD_SECTION}.score_threshold in the model card): the score rule is "
                       "not applied, only member agreement and the volume interval decide")
    elif mirror_mean is None:
        reasons.append("no mirror score (no test-time mirroring ran): the score rule is not applied")
    return std, MemberUncertainty(
        members_kind=kind, members_count=n, member_names=member_names, member_volumes_ml=tuple(volumes),
        member_calls=calls, residual_volume_ml_min=min(volumes), residual_volume_ml_max=max(volumes),
        volume_interval_ml=(low, high), rt_fraction_members=n_rt / n, uncertainty_score=score,
        review_flag=bool(disagree or crosses or above),
        rules={"members_disagree": disagree, "interval_crosses_cutoff": crosses, "score_above_threshold": above},
        reasons=tuple(reasons), notes=notes,
        member_thresholds=None if member_thresholds is None else tuple(float(t) for t in member_thresholds),
        members_not_voting=not_voting, **common)
