"""Hospital-stratified cross-validation folds (SPEC.md, "Validation").

Rule (documented in ``bids_postop-train --help``):

- every participant needs a site (participants.tsv ``site``, ``institution`` or ``hospital``);
- the test site(s) go into no fold: their participants form the held-out test set;
- the other sites are dealt into ``n_folds`` folds, largest site first (ties by site name), each into the
  fold that holds the fewest participants so far (ties: lowest fold index) — deterministic, no hospital in
  two folds, fold sizes as balanced as whole hospitals allow;
- fewer training sites than folds is refused (no patient-level fallback: a hospital split across folds
  would leak its scanner and protocol into validation); lower ``--folds`` or add sites.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bids_postop.errors import UsageError

TEST = "test"


class SplitError(UsageError):
    """The sites cannot be split as asked."""


@dataclass(frozen=True)
class Assignment:
    """One participant's place in the protocol: a fold index, or ``None`` for the test set."""

    participant_id: str  # with "sub-"
    site: str
    fold: int | None


@dataclass(frozen=True)
class SplitPlan:
    """Folds of participants (validation sets), and the held-out test participants."""

    n_folds: int
    assignments: tuple[Assignment, ...]
    site_folds: Mapping[str, int]  # training site → fold
    test_sites: tuple[str, ...]

    def validation(self, fold: int) -> list[str]:
        return [a.participant_id for a in self.assignments if a.fold == fold]

    def training(self, fold: int) -> list[str]:
        return [a.participant_id for a in self.assignments if a.fold is not None and a.fold != fold]

    @property
    def test(self) -> list[str]:
        return [a.participant_id for a in self.assignments if a.fold is None]

    @property
    def fold_sizes(self) -> list[int]:
        counts = Counter(a.fold for a in self.assignments if a.fold is not None)
        return [counts.get(k, 0) for k in range(self.n_folds)]

    def nnunet_splits(self) -> list[dict[str, list[str]]]:
        """nnU-Net's ``splits_final.json`` content (case identifiers = participant ids)."""
        return [{"train": self.training(k), "val": self.validation(k)} for k in range(self.n_folds)]

    def describe(self) -> str:
        lines = [f"fold {k}: {self.fold_sizes[k]} participants from "
                 f"{', '.join(sorted(s for s, f in self.site_folds.items() if f == k))}" for k in range(self.n_folds)]
        if self.test_sites:
            lines.append(f"test: {len(self.test)} participants from {', '.join(self.test_sites)}")
        return "\n".join(lines)


def assign_sites(site_counts: Mapping[str, int], n_folds: int) -> dict[str, int]:
    """Deal sites into ``n_folds`` folds, largest first, each into the currently smallest fold.

    Raises :class:`SplitError` when there are fewer sites than folds (a fold would be empty).
    """
    if n_folds < 2:
        raise SplitError(f"--folds {n_folds}: at least 2 folds are needed (each fold model validates on its fold)")
    if len(site_counts) < n_folds:
        raise SplitError(
            f"{len(site_counts)} training site(s) ({', '.join(sorted(site_counts)) or 'none'}) for {n_folds} "
            f"folds: every fold needs at least one whole hospital; use --folds {max(len(site_counts), 2)} or "
            f"fewer, or add sites (a hospital is never split between folds)")
    sizes = [0] * n_folds
    out: dict[str, int] = {}
    for site in sorted(site_counts, key=lambda s: (-site_counts[s], s)):
        fold = min(range(n_folds), key=lambda k: (sizes[k], k))
        out[site] = fold
        sizes[fold] += site_counts[site]
    return out


def make_splits(participant_sites: Mapping[str, str | None], *, n_folds: int,
                test_sites: Iterable[str] = ()) -> SplitPlan:
    """Split participants (``sub-X`` → site) into hospital folds plus a held-out test set."""
    test_sites = tuple(dict.fromkeys(test_sites))
    missing = sorted(p for p, s in participant_sites.items() if not s)
    if missing:
        raise SplitError(f"no site for {', '.join(missing)}: hospital-stratified folds need a 'site' column "
                         f"in participants.tsv for every participant")
    known = set(participant_sites.values())
    unknown = [s for s in test_sites if s not in known]
    if unknown:
        raise SplitError(f"--test-site {' '.join(unknown)}: not a site of the selected participants; "
                         f"sites: {', '.join(sorted(str(s) for s in known))}")
    counts = Counter(str(s) for p, s in participant_sites.items() if s not in test_sites)
    site_folds = assign_sites(counts, n_folds)
    assignments = tuple(
        Assignment(p, str(s), None if s in test_sites else site_folds[str(s)])
        for p, s in sorted(participant_sites.items()))
    return SplitPlan(n_folds=n_folds, assignments=assignments, site_folds=site_folds, test_sites=test_sites)


def write_splits(plan: SplitPlan, *, tsv: Path, nnunet_json: Path | None = None) -> None:
    """Write the readable TSV (participant_id, site, fold: 0… or ``test``) and nnU-Net's splits_final.json."""
    tsv.parent.mkdir(parents=True, exist_ok=True)
    with tsv.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["participant_id", "site", "fold"])
        for a in plan.assignments:
            writer.writerow([a.participant_id, a.site, TEST if a.fold is None else a.fold])
    if nnunet_json is not None:
        nnunet_json.parent.mkdir(parents=True, exist_ok=True)
        nnunet_json.write_text(json.dumps(plan.nnunet_splits(), indent=1) + "\n")
