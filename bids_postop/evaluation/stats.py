"""Statistical tests and summaries of the group level (SPEC.md, "Validation": 5 % significance).

- Tukey's HSD between several groups (``scipy.stats.tukey_hsd``; matches statsmodels'
  ``pairwise_tukeyhsd``);
- Mann-Whitney U, two-sided (``scipy.stats.mannwhitneyu``, exact for small samples without ties,
  otherwise the normal approximation with tie and continuity correction);
- mean ± sd (sample sd, ddof = 1) of defined values only, with the count of what was left out;
- pooled estimates over folds as in the study's validation code: fold-size-weighted mean and the
  combined-sample sd for per-patient metrics (equal to mean and sd over all patients of those folds);
- normal intervals from per-fold estimates: mean ± z · sd / √k over the k fold estimates;
- whether two confidence intervals overlap (the paper's significance judgement for classification scores);
- additions for repeated measures on the same patients (not in the paper, labelled so): Wilcoxon signed-rank
  (``scipy.stats.wilcoxon``, two-sided) and Friedman (``scipy.stats.friedmanchisquare``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """One comparison between two groups; ``p_value`` is ``None`` with a ``reason`` when not computable."""

    test: str
    group_a: str
    group_b: str
    n_a: int
    n_b: int
    metric: str | None = None
    statistic: float | None = None
    p_value: float | None = None
    estimate: float | None = None
    estimate_name: str | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    significant: bool | None = None
    reason: str | None = None
    compares: str | None = None  # what is compared (e.g. "configurations of nnU-Net")
    scope: str | None = None  # on which patients (e.g. "test set, patients of every compared model (n=12)")
    origin: str | None = None  # "paper" (the study's analysis) or "addition" (not in the paper)

    def as_dict(self) -> dict:
        return asdict(self)


def defined(values: Iterable[float | None]) -> list[float]:
    """The values that are neither ``None`` nor NaN."""
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof = 1) of the defined values; ``None`` when there are too few (0, resp. < 2)."""
    x = defined(values)
    if not x:
        return None, None
    return float(np.mean(x)), (float(np.std(x, ddof=1)) if len(x) > 1 else None)


def median(values: Iterable[float | None]) -> float | None:
    x = defined(values)
    return float(np.median(x)) if x else None


def pooled_mean_sd(means: Sequence[float], sds: Sequence[float | None], ns: Sequence[int]
                   ) -> tuple[float, float | None]:
    """Combined mean and sd (ddof = 1) of several samples from their means, sds (ddof = 1) and sizes."""
    n = np.asarray(ns, dtype=float)
    m = np.asarray(means, dtype=float)
    s = np.asarray([0.0 if sd is None else sd for sd in sds], dtype=float)
    total = n.sum()
    if total <= 0:
        raise ValueError("pooled_mean_sd needs at least one sample")
    mean = float((n * m).sum() / total)
    if total < 2:
        return mean, None
    ss = ((n - 1) * s**2 + n * m**2).sum() - total * mean**2
    return mean, float(math.sqrt(max(ss, 0.0) / (total - 1)))


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    w = np.asarray(weights, dtype=float)
    return float((np.asarray(values, dtype=float) * w).sum() / w.sum())


def normal_interval(estimates: Sequence[float], *, confidence: float = 0.95
                    ) -> tuple[float | None, float | None, float | None, float | None]:
    """Mean, sd (ddof = 1) and the normal interval mean ± z · sd / √k of ``k`` per-fold estimates."""
    from scipy import stats

    x = defined(estimates)
    if not x:
        return None, None, None, None
    mean = float(np.mean(x))
    if len(x) < 2:
        return mean, None, None, None
    sd = float(np.std(x, ddof=1))
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) * sd / math.sqrt(len(x))
    return mean, sd, mean - half, mean + half


def mann_whitney(a: Sequence[float | None], b: Sequence[float | None], *, name_a: str, name_b: str,
                 metric: str | None = None, alpha: float = ALPHA) -> Comparison:
    """Two-sided Mann-Whitney U of the defined values of ``a`` and ``b``.

    ``statistic`` is U of ``a``; ``estimate`` is median(a) − median(b).
    """
    from scipy import stats

    x, y = defined(a), defined(b)
    base = {"test": "Mann-Whitney U (two-sided)", "group_a": name_a, "group_b": name_b, "n_a": len(x), "n_b": len(y),
            "metric": metric}
    if not x or not y:
        return Comparison(**base, reason="a group has no defined value")
    res = stats.mannwhitneyu(x, y, alternative="two-sided")
    p = float(res.pvalue)
    return Comparison(**base, statistic=float(res.statistic), p_value=p,
                      estimate=float(np.median(x) - np.median(y)), estimate_name="median difference (a - b)",
                      significant=bool(p < alpha))


def tukey_hsd(groups: Mapping[str, Sequence[float | None]], *, metric: str | None = None,
              alpha: float = ALPHA) -> list[Comparison]:
    """Tukey's HSD over every pair of groups (defined values; groups with fewer than 2 are left out).

    ``estimate`` is mean(a) − mean(b) with its simultaneous ``1 − alpha`` confidence interval.
    """
    from scipy import stats

    clean = {name: defined(v) for name, v in groups.items()}
    kept = {name: v for name, v in clean.items() if len(v) >= 2}
    skipped = [Comparison(test="Tukey HSD", group_a=name, group_b="*", n_a=len(v), n_b=0, metric=metric,
                          reason="fewer than 2 defined values") for name, v in clean.items() if name not in kept]
    names = list(kept)
    if len(names) < 2:
        return skipped
    res = stats.tukey_hsd(*[kept[n] for n in names])
    ci = res.confidence_interval(confidence_level=1.0 - alpha)
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            p = float(res.pvalue[i, j])
            out.append(Comparison(test="Tukey HSD", group_a=names[i], group_b=names[j], n_a=len(kept[names[i]]),
                                  n_b=len(kept[names[j]]), metric=metric, statistic=float(res.statistic[i, j]),
                                  p_value=p,
                                  estimate=float(res.statistic[i, j]), estimate_name="mean difference (a - b)",
                                  ci_low=float(ci.low[i, j]), ci_high=float(ci.high[i, j]),
                                  significant=bool(p < alpha)))
    return out + skipped


def labelled(comparisons: list[Comparison], **labels: str | None) -> list[Comparison]:
    """The comparisons with ``compares``/``scope``/``origin`` set."""
    from dataclasses import replace

    return [replace(c, **labels) for c in comparisons]


def intervals_overlap(name_a: str, a: tuple[float | None, float | None], name_b: str,
                      b: tuple[float | None, float | None], *, metric: str, method: str, n_a: int = 0,
                      n_b: int = 0) -> Comparison:
    """Do two confidence intervals overlap? ``significant`` is True when they do not (the paper's rule)."""
    base = {"test": f"{method} interval overlap", "group_a": name_a, "group_b": name_b, "n_a": n_a, "n_b": n_b,
            "metric": metric}
    if None in a or None in b:
        return Comparison(**base, reason="an interval is undefined")
    (lo_a, hi_a), (lo_b, hi_b) = a, b
    overlap = min(hi_a, hi_b) - max(lo_a, lo_b)  # type: ignore[type-var,operator]
    return Comparison(**base, statistic=float(overlap), estimate=float(overlap),
                      estimate_name="overlap length (negative: gap between the intervals)",
                      significant=bool(overlap < 0))


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float], *, name_a: str, name_b: str,
                         metric: str | None = None, alpha: float = ALPHA) -> Comparison:
    """Two-sided Wilcoxon signed-rank test of paired values (``a[i]`` and ``b[i]`` from the same patient).

    ``estimate`` is the median of the differences a − b. Pairs with an undefined value are left out.
    """
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if defined([x]) and defined([y])]
    base = {"test": "Wilcoxon signed-rank (two-sided, paired)", "group_a": name_a, "group_b": name_b,
            "n_a": len(pairs), "n_b": len(pairs), "metric": metric}
    diffs = np.array([x - y for x, y in pairs], dtype=float)
    if len(pairs) < 2 or not np.any(diffs != 0):
        return Comparison(**base, reason="fewer than 2 pairs, or every difference is 0")
    res = stats.wilcoxon([x for x, _ in pairs], [y for _, y in pairs], alternative="two-sided")
    p = float(res.pvalue)
    return Comparison(**base, statistic=float(res.statistic), p_value=p, estimate=float(np.median(diffs)),
                      estimate_name="median of paired differences (a - b)", significant=bool(p < alpha))


def friedman(groups: Mapping[str, Sequence[float]], *, metric: str | None = None,
             alpha: float = ALPHA) -> Comparison:
    """Friedman test of k ≥ 3 related groups (``groups[g][i]`` from patient i in every group)."""
    from scipy import stats

    names = list(groups)
    n = len(next(iter(groups.values()))) if groups else 0
    base = {"test": "Friedman (related groups)", "group_a": " vs ".join(names), "group_b": "", "n_a": n, "n_b": n,
            "metric": metric}
    if len(names) < 3 or n < 2:
        return Comparison(**base, reason="needs at least 3 groups and 2 patients")
    res = stats.friedmanchisquare(*[groups[g] for g in names])
    p = float(res.pvalue)
    return Comparison(**base, statistic=float(res.statistic), p_value=p, significant=bool(p < alpha))
