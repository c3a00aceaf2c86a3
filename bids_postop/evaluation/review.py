"""Does the review flag pick out the patients whose automatic call is wrong? (issue #20)

For each compared model, over its evaluated patients: the error rate of the GTR/RT call among flagged and among
unflagged patients, and the AUROC of the uncertainty score for a "bad" result — a wrong GTR/RT call, or Dice
below 0.5 on a reference-positive patient. A flag that does not separate errors is a finding, not a failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BAD_DICE = 0.5


def is_bad(row: Mapping[str, Any]) -> bool:
    """Wrong GTR/RT call, or Dice < 0.5 where the reference is positive (Dice of two empty masks is no error)."""
    wrong = row.get("predicted_status") != row.get("true_status")
    dice = row.get("dice")
    return bool(wrong or (row.get("in_P") and dice is not None and float(dice) < BAD_DICE))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (ties count one half): the probability that a bad
    patient scores higher than a good one. ``None`` without both classes."""
    from scipy.stats import mannwhitneyu

    bad = [s for s, b in zip(scores, labels, strict=True) if b]
    good = [s for s, b in zip(scores, labels, strict=True) if not b]
    if not bad or not good:
        return None
    u = mannwhitneyu(bad, good, alternative="two-sided").statistic
    return float(u) / (len(bad) * len(good))


def review_rows(patients: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per compared source: flagged/unflagged counts, their error rates, and the score's AUROC."""
    out = []
    for source in sorted({str(r["source"]) for r in patients}):
        rows = [r for r in patients if r["source"] == source and r.get("status") == "ok"]
        known = [r for r in rows if r.get("review_flag") is not None]
        flagged = [r for r in known if r["review_flag"]]
        unflagged = [r for r in known if not r["review_flag"]]
        scored = [r for r in rows if r.get("uncertainty_score") is not None]

        def rate(group: list) -> float | None:
            return sum(is_bad(r) for r in group) / len(group) if group else None

        def wrong(group: list) -> float | None:
            return sum(r.get("predicted_status") != r.get("true_status") for r in group) / len(group) if group \
                else None

        def score_auroc(group: list, key: str = "uncertainty_score") -> float | None:
            return auroc([float(r[key]) for r in group], [is_bad(r) for r in group])

        score_auc = score_auroc(scored)
        # the same among reference-positive patients only: there "bad" is a missed residual or Dice < 0.5, while
        # over everyone a correct GTR call with a doubtful speck counts as good however unsure its members are
        positive = [r for r in scored if r.get("in_P")]
        positive_auc = score_auroc(positive)
        mirrored = [r for r in rows if r.get("mirror_score") is not None]  # what the flag's threshold applies to
        out.append({"source": source, "n_evaluated": len(rows), "n_flag_known": len(known),
                    "n_flagged": len(flagged), "n_unflagged": len(unflagged),
                    "wrong_call_rate_flagged": wrong(flagged), "wrong_call_rate_unflagged": wrong(unflagged),
                    "bad_rate_flagged": rate(flagged), "bad_rate_unflagged": rate(unflagged),
                    "n_bad": sum(is_bad(r) for r in rows), "n_scored": len(scored), "auroc_score_bad": score_auc,
                    "n_positive_scored": len(positive), "auroc_score_bad_positive": positive_auc,
                    "auroc_reason": None if score_auc is not None else
                    ("no uncertainty score (models without members)" if not scored
                     else "needs both bad and good patients"),
                    "n_mirror_scored": len(mirrored),
                    "auroc_mirror_score_bad": score_auroc(mirrored, "mirror_score"),
                    "auroc_mirror_score_bad_positive": score_auroc([r for r in mirrored if r.get("in_P")],
                                                                   "mirror_score")})
    return out
