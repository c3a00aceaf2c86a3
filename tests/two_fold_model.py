"""A demo model with a second fold, for tests and benchmarks of fold ensembles (tests/test_nnunet_backend.py,
benchmarks/mirror_score_cost.py): demo model B copied, and fold 0's weights perturbed (5 % of each tensor's spread,
seed 1) as fold 1, so that the ensemble differs from fold 0 alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_two_fold_model(demo_b: Path, root: Path) -> Path:
    """Copy the model folder ``demo_b`` to ``root`` and add the perturbed fold 1; return ``root``."""
    import torch

    shutil.copytree(demo_b, root)
    ckpt = torch.load(root / "nnunet" / "fold_0" / "checkpoint_final.pth", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    ckpt["network_weights"] = {
        k: v + 0.05 * (v.float().std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=generator)
        if v.is_floating_point() else v for k, v in ckpt["network_weights"].items()}
    (root / "nnunet" / "fold_1").mkdir()
    torch.save(ckpt, root / "nnunet" / "fold_1" / "checkpoint_final.pth")
    card = json.loads((root / "bids_postop_model.json").read_text())
    card["nnunet"]["folds"] = [0, 1]
    (root / "bids_postop_model.json").write_text(json.dumps(card))
    return root
