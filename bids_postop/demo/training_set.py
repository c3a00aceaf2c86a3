"""Write a simulated BIDS *training* set for ``bids_postop-train`` (how the shipped demo models are made).

``write_training_dataset(root)`` writes, deterministically for a seed, the layout of the demo dataset
(:mod:`bids_postop.demo.dataset`) for ``n_participants`` participants spread over ``n_sites`` simulated
hospitals, every participant with all inputs (post-op T1w-CE, T1w, FLAIR; pre-op T1w-CE), so one training
set serves configurations A–E:

- ``participants.tsv`` with a ``site`` column (participant ``i`` at site ``i mod n_sites``): what
  ``bids_postop-train`` deals into hospital folds;
- ``derivatives/manual``: the manual residual masks ``bids_postop-train --manual`` reads
  (``sub-X_ses-postop_label-tumor_mask.nii.gz`` on the post-op T1w-CE grid; empty = GTR);
- ``derivatives/preop_masks``: pre-operative tumour masks (configurations D and E, ``-d preop=...``).

Sites reuse the demo's geometries (``north``: RAS 1.2 mm; ``south``: LPS 0.9×0.9×2.5 mm, oblique) and add
variants (``east``: LAS 1.0 mm, ``west``: LPS 0.9×0.9×2.0 mm, more oblique, ...). Per participant: a random
source case, residual tumour with probability ``rt_fraction`` (else GTR), and a random head pose
(left-right mirror with p = 0.5, rotation ≤ 8° about each axis) — the augmentation the first demo
models had.

Seeds: participant ``i`` draws from ``numpy.random.default_rng([seed, i])`` with ``seed ≥ 1000``; the demo
dataset (the demo models' evaluation data) uses seeds < 1000, so no demo participant is ever trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np

from bids_postop.demo import simulate as sim
from bids_postop.demo.dataset import (
    SITES,
    DemoDataset,
    DemoParticipant,
    SiteGeometry,
    _write_dataset_files,
    _write_participant,
    _write_participants_tsv,
)

MIN_SEED: Final[int] = 1000
TRAINING_SITES: Final[dict[str, SiteGeometry]] = {
    "north": SITES["north"],
    "south": SITES["south"],
    "east": SiteGeometry("east", "LAS", (1.0, 1.0, 1.0), 2.0, "gadolinium", (1.0, 1.0, 1.0)),
    "west": SiteGeometry("west", "LPS", (0.9, 0.9, 2.0), 6.0, "Gd", (1.0, 1.0, 2.0)),
    "central": SiteGeometry("central", "RAS", (1.2, 1.2, 1.2), 3.0, "gadolinium", (1.1, 1.1, 1.1)),
    "coast": SiteGeometry("coast", "LPS", (0.9, 0.9, 2.5), 4.0, "Gd", (1.0, 1.0, 2.0)),
}
MAX_HEAD_ROTATION_DEG: Final[float] = 8.0

TRAINING_SET_NAME: Final[str] = ("bids_postop demo training set: simulated post-operative cases made from real "
                                  "pre-operative scans — not clinical data")
README: Final[str] = """# bids_postop demo training set

Simulated early post-operative brain MRI made from real **pre-operative** scans — not clinical data.
Written by `bids_postop-demo --training-set` (`bids_postop.demo.training_set.write_training_dataset`) to
train the demo models with `bids_postop-train` (see docs/training.md, "Rebuilding the demo models").

Same simulation and layout as the demo dataset (`bids_postop-demo`), with seeds ≥ 1000 (the demo uses
< 1000: no demo participant is in here), every participant with all inputs, several simulated hospitals
(`site` in participants.tsv) of different geometry, and random head poses (left-right mirror, rotations).

Derivatives:
- `derivatives/preop_masks`: pre-operative tumour masks, on the pre-operative scan's grid.
- `derivatives/manual`: simulated residual tumour (`label-tumor`, empty for gross total resection) and the
  brain mask (`label-brain`), exactly on the post-operative T1w-CE grid.
"""


def _describe(site: SiteGeometry) -> str:
    spacing = "x".join(f"{v:g}" for v in site.spacing)
    return f"{site.axcodes}, {spacing} mm" + (f", oblique {site.oblique_deg:g} deg" if site.oblique_deg else "")


def _head_pose(rng: np.random.Generator):
    """A function ``center → 4×4`` world transform: optional left-right mirror, then a small rotation."""

    def pose(center: np.ndarray) -> np.ndarray:
        linear = np.diag([-1.0 if rng.random() < 0.5 else 1.0, 1.0, 1.0])
        linear = sim.rotation_matrix(rng.uniform(-MAX_HEAD_ROTATION_DEG, MAX_HEAD_ROTATION_DEG, size=3)) @ linear
        out = np.eye(4)
        out[:3, :3] = linear
        out[:3, 3] = center - linear @ center
        return out

    return pose


def write_training_dataset(root: Path, *, n_participants: int = 32, n_sites: int = 4, seed: int = MIN_SEED,
                           rt_fraction: float = 0.7) -> DemoDataset:
    """Write the simulated BIDS training set at ``root`` and describe it.

    ``n_participants`` ≥ ``n_sites``; ``n_sites`` in 2…6 (:data:`TRAINING_SITES`, in that order); ``seed`` ≥
    :data:`MIN_SEED`. Existing files of the same names are overwritten, other files left alone.
    """
    if seed < MIN_SEED:
        raise ValueError(f"seed {seed}: training seeds must be >= {MIN_SEED} (the demo dataset, the demo models' "
                         f"evaluation data, uses seeds < {MIN_SEED})")
    if not 2 <= n_sites <= len(TRAINING_SITES):
        raise ValueError(f"n_sites {n_sites}: choose 2 to {len(TRAINING_SITES)} ({', '.join(TRAINING_SITES)})")
    if n_participants < n_sites:
        raise ValueError(f"n_participants {n_participants}: at least one participant per site ({n_sites})")
    if not 0.0 <= rt_fraction <= 1.0:
        raise ValueError(f"rt_fraction {rt_fraction}: must be within 0..1")
    root = Path(root)
    sites = list(TRAINING_SITES.values())[:n_sites]
    _write_dataset_files(root, name=TRAINING_SET_NAME, readme=README,
                         site_levels={s.name: _describe(s) for s in sites})
    width = max(2, len(str(n_participants)))
    participants: list[DemoParticipant] = []
    for i in range(n_participants):
        rng = np.random.default_rng([seed, i])
        case_name = sim.CASE_NAMES[int(rng.integers(len(sim.CASE_NAMES)))]
        residual = bool(rng.random() < rt_fraction)
        participants.append(_write_participant(root, f"sub-{i + 1:0{width}d}", sites[i % n_sites], case_name, rng,
                                               residual=residual, has_flair=True, has_preop=True,
                                               head_pose=_head_pose(rng)))
    _write_participants_tsv(root, participants)
    return DemoDataset(root=root, seed=seed, participants=tuple(participants))
