"""End to end: ``bids_postop-train`` with the tiny network on a simulated 3-site dataset (slow: minutes)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import read_tsv, write_three_site_demo

from bids_postop.cli.train import main as train_main
from bids_postop.segmentation.models import read_card, resolve_models


@pytest.mark.slow
def test_train_tiny_nnunet_config_a(tmp_path):
    import torch

    bids = tmp_path / "bids"
    write_three_site_demo(bids)
    work = tmp_path / "train"
    argv = [str(bids), str(work), "--manual", f"manual={bids / 'derivatives' / 'manual'}", "--config", "A",
            "--tiny", "--epochs", "1", "--iterations", "3", "--folds", "2", "--test-site", "east",
            "--skip-bids-validation", "--device", "cpu", "--nprocs", "1"]
    assert train_main(argv) == 0

    # hospital folds: balanced, no site in two folds, the test site in none
    splits = read_tsv(work / "splits.tsv")
    folds_of_site: dict[str, set[str]] = {}
    for r in splits:
        folds_of_site.setdefault(r["site"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_site.values())
    assert folds_of_site["east"] == {"test"}
    assert sorted(folds_of_site["north"] | folds_of_site["south"]) == ["0", "1"]
    nn_splits = json.loads(next((work / "nnunet" / "preprocessed").glob("Dataset951_*/splits_final.json")).read_text())
    assert [len(s["val"]) for s in nn_splits] == [2, 2]
    assert not {"sub-05", "sub-06"} & {p for s in nn_splits for p in s["train"] + s["val"]}

    # model folder + card, stripped checkpoints
    model = work / "models" / "A"
    card = read_card(model)
    assert card.configuration == "A" and card.channels == ("postop_t1ce",) and 0 < card.threshold < 1
    raw = json.loads((model / "bids_postop_model.json").read_text())
    assert raw["nnunet"]["folds"] == [0, 1] and len(raw["training"]["data_hash"]) == 64
    name = json.loads((bids / "dataset_description.json").read_text())["Name"]
    assert raw["training"]["dataset_name"] == name and f"on {name!r}" in raw["description"]
    for fold in (0, 1):
        ck = torch.load(model / "nnunet" / f"fold_{fold}" / "checkpoint_final.pth", weights_only=True)
        assert "optimizer_state" not in ck and ck["trainer_name"] == "nnUNetTrainer"
    assert [c.configuration for c in resolve_models(work / "models")] == ["A"]

    # the participant level ran the new model on the test site: masks exactly on the post-op T1w-CE grid
    for sub in ("sub-05", "sub-06"):
        t1ce = next((bids / sub / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
        anat = work / "test_derivatives" / "A" / sub / "ses-postop" / "anat"
        masks = list(anat.glob("*_desc-residual_mask.nii.gz"))
        assert len(masks) == 1
        ref, out = nib.load(t1ce), nib.load(masks[0])
        assert out.shape == ref.shape
        assert np.array_equal(out.affine, ref.affine)

    # resumable: a rerun skips finished folds and preprocessing. It also asks for the demo models' recipe
    # (docs/training.md): one fold, another inference patch, the card name, a copy of the model folder; only
    # the export, the validation predictions and the card are redone
    log_before = set((work / "logs").glob("*.log"))
    export = tmp_path / "export"
    assert train_main([*argv, "--no-test-scoring", "--train-folds", "1", "--inference-patch-size", "96", "96",
                       "96", "--model-name", "demo", "--export-to", str(export)]) == 0
    new_log = next(iter(set((work / "logs").glob("*.log")) - log_before)).read_text()
    assert "already trained" in new_log and "reused" in new_log
    raw = json.loads((model / "bids_postop_model.json").read_text())
    assert raw["name"] == "demo-A" and raw["nnunet"]["folds"] == [1]
    assert not (model / "nnunet" / "fold_0").exists()
    assert raw["threshold_selection"]["validation_participants"] == [r["participant_id"] for r in splits
                                                                     if r["fold"] == "1"]
    assert raw["inference_patch_size"] == [96, 96, 96] and raw["training"]["training_patch_size"] == [64, 64, 64]
    plans = json.loads((model / "nnunet" / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [96, 96, 96]
    ck = torch.load(model / "nnunet" / "fold_1" / "checkpoint_final.pth", weights_only=True)
    assert tuple(ck["inference_allowed_mirroring_axes"]) == (2,)  # --tiny: left-right only
    assert "--train-folds 1" in raw["training"]["command"]
    assert json.loads((export / "A" / "bids_postop_model.json").read_text()) == raw
    assert [c.name for c in resolve_models(export)] == ["demo-A"]


def test_train_option_errors(tmp_path, capsys):
    bids = tmp_path / "bids"
    bids.mkdir()
    base = [str(bids), str(tmp_path / "work"), "--manual", str(bids)]
    assert train_main([*base, "--folds", "2", "--train-folds", "2"]) == 64
    assert "--train-folds 2: folds are numbered 0 to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_main([*base, "--inference-patch-size", "96", "96"])
    assert exc.value.code == 64


def test_inference_patch_must_fit_the_network(tmp_path):
    from bids_postop.training.nnunet import set_inference_patch_size

    (tmp_path / "nnunet").mkdir()
    plans = {"configurations": {"3d_fullres": {"patch_size": [64, 64, 64], "architecture": {"arch_kwargs": {
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]}}}}}
    (tmp_path / "nnunet" / "plans.json").write_text(json.dumps(plans))
    assert set_inference_patch_size(tmp_path, [96, 96, 20]) == [64, 64, 64]
    assert json.loads((tmp_path / "nnunet" / "plans.json").read_text())["configurations"]["3d_fullres"][
        "patch_size"] == [96, 96, 20]
    with pytest.raises(ValueError, match=r"multiple of the network's total stride \[8, 8, 4\]"):
        set_inference_patch_size(tmp_path, [96, 90, 20])
