"""Patient-wise residual-tumour classification against a manual reference, and its scores.

SPEC.md, "Validation": a patient is positive (residual tumour, RT) when its residual volume is at or
above the cut-off (0.175 ml by default; :func:`bids_postop.core.postprocess.classify_resection` decides,
including the ``gtr_inclusive`` rule of the study's code). Outcomes:

- TP: truth and prediction positive, and the masks overlap with Dice ≥ 0.01;
- TN: truth and prediction negative;
- FN: truth positive and prediction negative — and also truth and prediction positive without overlap
  (Dice < 0.01): the residual tumour was not found, as the study's patient-wise recall counts it;
- FP: truth negative and prediction positive.

Confidence intervals are BCa bootstrap intervals (``scipy.stats.bootstrap``), resampling patients within
the truth-positive group for sensitivity, within the truth-negative group for specificity, within both
groups independently (stratified) for balanced accuracy, and within the TP/FP patients for precision, so that
every resample has a defined score. Each score's resampling starts from its own generator
``numpy.random.default_rng(seed)``: every interval can be reproduced alone with ``scipy.stats.bootstrap``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bids_postop.core.postprocess import GTR_CUTOFF_ML, classify_resection

Outcome = Literal["TP", "TN", "FP", "FN"]
OUTCOMES: tuple[Outcome, ...] = ("TP", "TN", "FP", "FN")
MIN_OVERLAP_DICE = 0.01


def is_positive(volume_ml: float, *, cutoff_ml: float = GTR_CUTOFF_ML, gtr_inclusive: bool = False) -> bool:
    """True when the volume means residual tumour (RT) under the cut-off rule."""
    return classify_resection(volume_ml, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive) == "RT"


def patient_outcome(true_ml: float, predicted_ml: float, dice: float | None, *, cutoff_ml: float = GTR_CUTOFF_ML,
                    gtr_inclusive: bool = False, min_overlap_dice: float = MIN_OVERLAP_DICE) -> Outcome:
    """TP/TN/FP/FN of one patient from the true and predicted residual volumes (ml) and their Dice."""
    truth = is_positive(true_ml, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
    pred = is_positive(predicted_ml, cutoff_ml=cutoff_ml, gtr_inclusive=gtr_inclusive)
    if truth and pred:
        return "TP" if dice is not None and dice >= min_overlap_dice else "FN"
    if truth:
        return "FN"
    return "FP" if pred else "TN"


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class Counts:
    """Patient-wise confusion counts and the scores derived from them (``None`` when a denominator is 0)."""

    tp: int = 0
    tn: int = 0
    fp: int = 0
    fn: int = 0

    @classmethod
    def of(cls, outcomes: Iterable[Outcome]) -> Counts:
        counted = Counter(outcomes)
        unknown = set(counted) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown outcomes {sorted(unknown)}; allowed: {OUTCOMES}")
        return cls(tp=counted["TP"], tn=counted["TN"], fp=counted["FP"], fn=counted["FN"])

    @property
    def n(self) -> int:
        return self.tp + self.tn + self.fp + self.fn

    @property
    def recall(self) -> float | None:
        """Sensitivity, TP / (TP + FN)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP)."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def specificity(self) -> float | None:
        """TN / (TN + FP)."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def balanced_accuracy(self) -> float | None:
        """(recall + specificity) / 2; undefined when either is."""
        if self.recall is None or self.specificity is None:
            return None
        return (self.recall + self.specificity) / 2.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {"TP": self.tp, "TN": self.tn, "FP": self.fp, "FN": self.fn, "recall": self.recall,
                "precision": self.precision, "specificity": self.specificity,
                "balanced_accuracy": self.balanced_accuracy}


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval; ``low``/``high`` are ``None`` with a ``reason``."""

    estimate: float | None
    low: float | None
    high: float | None
    reason: str | None = None


def _mean_of_samples(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([np.mean(s, axis=axis) for s in samples], axis=0)


def _bca(samples: Sequence[np.ndarray], label: str, *, n_resamples: int, confidence: float,
         rng: np.random.Generator) -> Interval:
    from scipy import stats

    estimate = float(_mean_of_samples(*samples)) if all(len(s) for s in samples) else None
    if estimate is None:
        return Interval(None, None, None, f"{label} undefined: no patient in the group")
    if any(len(s) < 2 for s in samples):
        return Interval(estimate, None, None, f"BCa needs at least 2 patients per group for {label}")
    if all(np.all(s == s[0]) for s in samples):
        return Interval(estimate, None, None, f"BCa undefined for {label}: every patient has the same outcome "
                                              f"(degenerate bootstrap distribution)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning is reported as a reason below
        res = stats.bootstrap(tuple(samples), _mean_of_samples, n_resamples=n_resamples, paired=False,
                              vectorized=True, confidence_level=confidence, method="BCa", random_state=rng)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return Interval(estimate, None, None, f"BCa undefined for {label} (degenerate bootstrap distribution)")
    return Interval(estimate, low, high)


def bootstrap_scores(outcomes: Sequence[Outcome], *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, Interval]:
    """BCa intervals for ``recall`` (sensitivity), ``specificity``, ``balanced_accuracy`` and ``precision``.

    Sensitivity resamples the truth-positive patients (TP/FN), specificity the truth-negative ones
    (TN/FP), balanced accuracy both groups independently, precision the TP/FP patients, ``n_resamples``
    times, each with a fresh generator ``numpy.random.default_rng(seed)`` (results are reproducible).
    """
    Counts.of(outcomes)  # validates labels
    hits = np.array([o == "TP" for o in outcomes if o in ("TP", "FN")], dtype=float)
    rejections = np.array([o == "TN" for o in outcomes if o in ("TN", "FP")], dtype=float)
    called = np.array([o == "TP" for o in outcomes if o in ("TP", "FP")], dtype=float)

    def bca(samples: list[np.ndarray], label: str) -> Interval:
        return _bca(samples, label, n_resamples=n_resamples, confidence=confidence, rng=np.random.default_rng(seed))

    return {
        "recall": bca([hits], "sensitivity"),
        "specificity": bca([rejections], "specificity"),
        "balanced_accuracy": bca([hits, rejections], "balanced accuracy"),
        "precision": bca([called], "precision"),
    }
