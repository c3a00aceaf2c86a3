"""One entry point for every model format: channels in the model's order in, probability on the
post-op T1w-CE grid out, with the ensemble's members when asked. Each backend module is imported only when its
kind of model is used."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_postop.core.uncertainty import MemberKind
from bids_postop.errors import ModelError
from bids_postop.segmentation.models import ModelCard

ARCHITECTURES = ("nnunet", "raidionics")


@dataclass(frozen=True)
class Members:
    """The ensemble's members (:mod:`bids_postop.core.uncertainty`): their kind, names, and each member's foreground
    probability on the first channel's grid, computed on demand from what the backend kept at the network's
    resolution (one member in memory at a time when iterated).

    ``kind``: ``"folds"`` (several folds ran), ``"mirrored passes"`` (one fold with test-time mirroring) or ``"none"``
    (nothing varies: no members). ``box``: the part of the grid (slices of the stored voxel order) that the member
    arrays cover; every member and the ensemble probability are 0 outside it (the backend's crop). ``None``: the
    whole grid.
    """

    kind: MemberKind
    names: tuple[str, ...] = ()
    probability: Callable[[int], np.ndarray] | None = None  # member index -> float32 probability on grid[box]
    box: tuple[slice, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Each member's probability on ``grid[box]``, one at a time."""
        for index in range(len(self.names)):
            assert self.probability is not None
            yield self.probability(index)

    def crop(self, array: np.ndarray) -> np.ndarray:
        """``array`` (the whole grid) restricted to ``box`` (a view)."""
        return array if self.box is None else array[self.box]

    def paste(self, array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """An array of ``grid[box]`` (a member, a map) on the whole grid of ``shape``, 0 outside ``box``."""
        if self.box is None:
            return array
        full = np.zeros(tuple(shape), dtype=array.dtype)
        full[self.box] = array
        return full


NO_MEMBERS = Members("none")


@dataclass(frozen=True)
class Prediction:
    """The ensemble's probability (float32, the first channel's grid) and its members."""

    probability: np.ndarray
    members: Members = NO_MEMBERS
    mirror_scores: tuple[float, ...] | None = None  # per network (core.uncertainty.mirror_disagreement); None: n/a


def predict(card: ModelCard, channel_files: Sequence[str | Path], *, brain_mask: str | Path | None = None,
            device: str = "cpu", threads: int = 1, use_mirroring: bool = True, trust_checkpoint: bool = False,
            first_fold_only: bool = False, precision: str = "fp32", nnunet_engine: str = "auto",
            keep_members: bool = True, mirror_scores: bool | None = None, report: dict | None = None) -> Prediction:
    """Residual-tumour probability (float32) on the grid of ``channel_files[0]``, and the ensemble's members.

    ``brain_mask`` (on that grid) is needed by Raidionics models that crop to the brain; nnU-Net models
    take skull-stripped channels and ignore it. ``trust_checkpoint`` allows nnU-Net checkpoints that need pickle
    (see :func:`bids_postop.segmentation.nnunet.load_checkpoint`). ``first_fold_only`` runs only the model's
    first fold (``--fast``); ``precision`` ("fp32"/"bf16") and ``nnunet_engine`` say how nnU-Net networks run
    on the CPU; ``report`` (a dict) receives what was run (folds, mirroring, engine, precision, …).
    ``keep_members`` keeps each member (fold, or mirrored pass of a single fold) at the network's resolution;
    the ensemble probability is the same with or without. ``mirror_scores`` (default: ``keep_members``) computes
    each network's mirror score where test-time mirroring runs (nnU-Net; Raidionics runs no mirroring: ``None``).
    """
    if card.architecture == "nnunet":
        from bids_postop.segmentation import nnunet

        return nnunet.predict(card, channel_files, options=nnunet.NnUNetOptions(
            device=device, use_mirroring=use_mirroring, trust_checkpoint=trust_checkpoint, threads=threads,
            bf16=precision == "bf16", engine=nnunet_engine,
            folds=nnunet.first_fold(card) if first_fold_only else None,
            mirror_scores=keep_members if mirror_scores is None else mirror_scores), keep_members=keep_members,
            report=report)
    if card.architecture == "raidionics":
        from bids_postop.segmentation import raidionics

        return raidionics.predict(card, channel_files, brain_mask=Path(brain_mask) if brain_mask else None,
                                  device=device, threads=threads, max_folds=1 if first_fold_only else None,
                                  keep_members=keep_members, report=report)
    raise ModelError(f"{card.folder}: architecture {card.architecture!r} is not one of {ARCHITECTURES}")


def predict_probability(card: ModelCard, channel_files: Sequence[str | Path], *, brain_mask: str | Path | None = None,
                        device: str = "cpu", threads: int = 1, use_mirroring: bool = True,
                        trust_checkpoint: bool = False, first_fold_only: bool = False, precision: str = "fp32",
                        nnunet_engine: str = "auto", report: dict | None = None) -> np.ndarray:
    """:func:`predict`'s probability alone (no members kept)."""
    return predict(card, channel_files, brain_mask=brain_mask, device=device, threads=threads,
                   use_mirroring=use_mirroring, trust_checkpoint=trust_checkpoint, first_fold_only=first_fold_only,
                   precision=precision, nnunet_engine=nnunet_engine, keep_members=False, report=report).probability
