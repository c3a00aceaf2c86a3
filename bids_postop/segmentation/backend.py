"""One entry point for every model format: channels in the model's order in, probability on the
post-op T1w-CE grid out. Each backend module is imported only when its kind of model is used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bids_postop.errors import ModelError
from bids_postop.segmentation.models import ModelCard

ARCHITECTURES = ("nnunet", "raidionics")


def predict_probability(card: ModelCard, channel_files: Sequence[str | Path], *, brain_mask: str | Path | None = None,
                        device: str = "cpu", threads: int = 1, use_mirroring: bool = True,
                        trust_checkpoint: bool = False, first_fold_only: bool = False, precision: str = "fp32",
                        nnunet_engine: str = "auto", report: dict | None = None) -> np.ndarray:
    """Residual-tumour probability (float32) on the grid of ``channel_files[0]``.

    ``brain_mask`` (on that grid) is needed by Raidionics models that crop to the brain; nnU-Net models
    take skull-stripped channels and ignore it. ``trust_checkpoint`` allows nnU-Net checkpoints that need pickle
    (see :func:`bids_postop.segmentation.nnunet.load_checkpoint`). ``first_fold_only`` runs only the model's
    first fold (``--fast``); ``precision`` ("fp32"/"bf16") and ``nnunet_engine`` say how nnU-Net networks run
    on the CPU; ``report`` (a dict) receives what was run (folds, mirroring, engine, precision, …).
    """
    if card.architecture == "nnunet":
        from bids_postop.segmentation import nnunet

        return nnunet.predict_probability(card, channel_files, options=nnunet.NnUNetOptions(
            device=device, use_mirroring=use_mirroring, trust_checkpoint=trust_checkpoint, threads=threads,
            bf16=precision == "bf16", engine=nnunet_engine,
            folds=nnunet.first_fold(card) if first_fold_only else None), report=report)
    if card.architecture == "raidionics":
        from bids_postop.segmentation import raidionics

        return raidionics.predict_probability(card, channel_files, brain_mask=Path(brain_mask) if brain_mask else None,
                                              device=device, threads=threads, max_folds=1 if first_fold_only else None,
                                              report=report)
    raise ModelError(f"{card.folder}: architecture {card.architecture!r} is not one of {ARCHITECTURES}")
