"""Our nnU-Net adapter against the stock ``nnUNetv2_predict`` (issue 3): same tiny trained model, same input,
argmax of our probability = nnU-Net's segmentation (Dice ≥ 0.99)."""

from __future__ import annotations

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_predict_probability_matches_nnunetv2_predict(tiny_nnunet, tmp_path):
    from bids_postop.segmentation.models import resolve_models
    from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability

    exe = shutil.which("nnUNetv2_predict") or str(
        __import__("pathlib").Path(__import__("sys").executable).parent / "nnUNetv2_predict")
    root, out = tiny_nnunet["root"], tmp_path / "stock"
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}
    from conftest import TINY_NNUNET_DATASET_ID

    proc = subprocess.run([exe, "-i", str(tiny_nnunet["test_input"]), "-o", str(out), "-d",
                           str(TINY_NNUNET_DATASET_ID), "-c", "3d_fullres", "-f", "0", "-npp", "1", "-nps", "1",
                           "-device", "cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = np.asanyarray(nib.load(out / "test.nii.gz").dataobj) > 0

    [card] = resolve_models(tiny_nnunet["model"])  # the exported (stripped) model, a bare nnU-Net folder
    probability = predict_probability(card, [tiny_nnunet["test_input"] / "test_0000.nii.gz"],
                                      options=NnUNetOptions(device="cpu", use_mirroring=True))
    ours = probability > 0.5  # two classes: argmax = foreground probability above 0.5
    assert stock.shape == ours.shape
    assert stock.sum() > 50, "the tiny model should find the sphere of the test case"
    dice = 2 * np.logical_and(stock, ours).sum() / (stock.sum() + ours.sum())
    print(f"\nDice(ours, nnUNetv2_predict) = {dice:.4f} ({stock.sum()} / {ours.sum()} voxels)")
    assert dice >= 0.99
