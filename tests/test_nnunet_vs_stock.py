"""Our nnU-Net adapter against the stock ``nnUNetv2_predict`` (issues 3 and 15), on the file's grid: Dice ≥ 0.99
(p > 0.5) and max |Δp| ≤ 5e-3 against the probabilities ``nnUNetv2_predict --save_probabilities`` writes.

1. A model from bids_postop-train (RAS+ training files, NibabelIO; the session's ``tiny_nnunet``): as a bare folder
   (its plans name NibabelIO) and with its bids_postop card (input convention RAS) on the RAS+ test file; and,
   with the card, on an LPS oblique copy of it (the RAS+ array the model was trained on is still what it sees).
2. An ordinary nnU-Net model, trained here with stock nnU-Net alone (its API, trainer ``nnUNetTrainerNoMirroring``,
   no reader named: SimpleITKIO) on files stored LPS and oblique: 4 mm block means of the real scans in
   ../shared/data/real with synthetic bright spheres whose label is only the half at larger stored x. The task
   depends on orientation, and without mirroring (test-time mirroring over every axis would make the result
   equivariant to the LPS↔RAS flips) the old behaviour (always RAS+) gives another result: shown. The same
   weights with plans.json's reader switched to NibabelIOWithReorient agree with nnUNetv2_predict again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL

pytestmark = pytest.mark.slow

STOCK_DATASET_ID = 978  # the LPS/oblique model
REORIENT_DATASET_ID = 979  # the same weights, plans.json's reader switched to NibabelIOWithReorient
TRAINER = "nnUNetTrainerNoMirroring"


def _nnunet_env(root: Path) -> dict[str, str]:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
            "nnUNet_compile": "false"}


def _stock_predict(root: Path, dataset_id: int, inputs: Path, out: Path, *, trainer: str = "nnUNetTrainer",
                   save_probabilities: bool = False) -> None:
    """The real ``nnUNetv2_predict`` CLI in a subprocess, on CPU."""
    exe = shutil.which("nnUNetv2_predict") or str(Path(sys.executable).parent / "nnUNetv2_predict")
    cmd = [exe, "-i", str(inputs), "-o", str(out), "-d", str(dataset_id), "-c", "3d_fullres", "-f", "0",
           "-tr", trainer, "-npp", "1", "-nps", "1", "-device", "cpu"]
    proc = subprocess.run(cmd + (["--save_probabilities"] if save_probabilities else []), capture_output=True,
                          text=True, env=_nnunet_env(root), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def _write_card(folder: Path, model: Path, nnunet_section: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bids_postop_model.json").write_text(json.dumps({
        "name": folder.name, "architecture": "nnunet", "configuration": "A", "channels": ["postop_t1ce"],
        "threshold": 0.5, "nnunet": {"trained_model_folder": str(model), **nnunet_section}}))
    return folder


# --- 1. a model from bids_postop-train --------------------------------------------------------------------------

def test_predict_probability_matches_nnunetv2_predict(tiny_nnunet, tmp_path):
    from conftest import TINY_NNUNET_DATASET_ID
    from nibabel import orientations as nio

    from bids_postop.core.images import to_ras
    from bids_postop.segmentation.models import resolve_models
    from bids_postop.segmentation.nnunet import NnUNetOptions, input_convention, predict_probability
    from bids_postop.training.nnunet import card_section

    out, test_file = tmp_path / "stock", tiny_nnunet["test_input"] / "test_0000.nii.gz"
    _stock_predict(tiny_nnunet["root"], TINY_NNUNET_DATASET_ID, tiny_nnunet["test_input"], out,
                   save_probabilities=True)
    reference = nib.load(test_file)
    assert nib.aff2axcodes(reference.affine) == ("R", "A", "S")  # the test file is stored as the model was trained
    stock = _stock_probability(out, reference, lambda p: p.transpose(2, 1, 0))  # NibabelIO order
    assert (stock > 0.5).sum() > 50, "the tiny model should find the sphere of the test case"

    [bare] = resolve_models(tiny_nnunet["model"])  # the exported (stripped) model, a bare nnU-Net folder
    # its card as bids_postop-train writes it (the "nnunet" section of training.nnunet.card_section)
    section = {k: v for k, v in card_section([0]).items() if k != "trained_model_folder"}
    [carded] = resolve_models(_write_card(tmp_path / "carded", tiny_nnunet["model"], section))
    assert input_convention(bare) == ("NibabelIO", "plans.json")
    assert input_convention(carded) == ("RAS", "bids_postop_model.json")
    options = NnUNetOptions(device="cpu", use_mirroring=True)
    for card in (bare, carded):
        dice, delta = _compare(predict_probability(card, [test_file], options=options), stock)
        print(f"\n{input_convention(card)[0]}: Dice(ours, nnUNetv2_predict) = {dice:.4f}, max |Δp| = {delta:.2e} "
              f"({(stock > 0.5).sum()} voxels)")
        assert dice >= 0.99 and delta <= 5e-3

    # the same case stored LPS and oblique: the card's RAS convention feeds the RAS+ array the model was trained
    # on, so the result is nnUNetv2_predict's on the RAS+ file, on the LPS grid
    ornt = nio.ornt_transform(nio.io_orientation(reference.affine), nio.axcodes2ornt(("L", "P", "S")))
    lps = reference.as_reoriented(ornt)
    t = np.deg2rad(12.0)
    tilt = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asanyarray(lps.dataobj), tilt @ lps.affine), tmp_path / "lps.nii.gz")
    on_lps = predict_probability(carded, [tmp_path / "lps.nii.gz"], options=options)
    dice, delta = _compare(to_ras(on_lps, tilt @ lps.affine), stock)
    print(f"RAS card, LPS oblique copy: Dice(ours, nnUNetv2_predict on the RAS file) = {dice:.4f}, "
          f"max |Δp| = {delta:.2e}")
    assert dice >= 0.99 and delta <= 5e-3


# --- 2. an ordinary nnU-Net model trained with stock nnU-Net on LPS, oblique files -------------------------------

SCANS = ("brats-gli-00001-000/BraTS-GLI-00001-000-t1c.nii.gz", "tcga-du-7294/TCGA-DU-7294_t1c_bet.nii.gz",
         "tcga-fg-6692/sri24/TCGA-FG-6692_t1c_bet.nii.gz", "brats-met-00110-000/t1c.nii.gz")
SPACING = (3.5, 4.0, 4.5)  # anisotropic: a reversed spacing would make nnU-Net resample
OBLIQUE_DEG = 20.0

_STOCK_TRAINING = r'''
import json, sys
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

if __name__ == "__main__":
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring)

    dataset_id, name, cases = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    pp = Path(sys.argv[4]) / name
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset_id])
    plans = load_json(str(pp / "nnUNetPlans.json"))
    cfg = plans["configurations"]["3d_fullres"]  # a tiny network, planned spacing kept
    cfg["patch_size"], cfg["batch_size"] = [32, 32, 32], 2
    arch = cfg["architecture"]["arch_kwargs"]
    arch.update(n_stages=4, features_per_stage=[8, 16, 32, 64], kernel_sizes=[[3, 3, 3]] * 4,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)
    plans["configurations"] = {"3d_fullres": cfg}
    save_json(plans, str(pp / "nnUNetPlans.json"), sort_keys=False)
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    save_json([{"train": cases[:-1], "val": cases[-1:]}], str(pp / "splits_final.json"))
    torch.manual_seed(0)
    plans["continue_training"] = False
    trainer = nnUNetTrainerNoMirroring(plans, "3d_fullres", 0, load_json(str(pp / "dataset.json")),
                                       device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 4, 10, 2
    trainer.run_training()
'''


def _downsampled(path: Path) -> np.ndarray:
    """A real skull-stripped scan, 4×4×4 block means (60×60×38), scaled to a brain median of 100."""
    data = np.maximum(np.asanyarray(nib.load(path).dataobj, dtype=np.float32), 0)[:240, :240, :152]
    small = data.reshape(60, 4, 60, 4, 38, 4).mean(axis=(1, 3, 5))
    return small * (100.0 / np.median(small[small > 0]))


def _with_spheres(image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three bright spheres inside the brain; the label is the half of each at larger stored x."""
    rng = np.random.default_rng(seed)
    image, label = image.copy(), np.zeros(image.shape, np.uint8)
    x, y, z = np.ogrid[:image.shape[0], :image.shape[1], :image.shape[2]]
    inside = np.argwhere(image[8:-8, 8:-8, 6:-6] > 50) + (8, 8, 6)
    for centre in inside[rng.choice(len(inside), 3, replace=False)]:
        r = rng.uniform(3.0, 4.5)
        sphere = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < r * r
        image[sphere] = rng.normal(260, 15, int(sphere.sum()))
        label[sphere & (x > centre[0])] = 1
    return image, label


@pytest.fixture(scope="module")
def stock_lps_model(tmp_path_factory):
    """The LPS/oblique stock model: ``root`` (nnU-Net's three folders), ``model`` (the trainer folder, full
    checkpoint), ``inputs`` (the unseen test case, test_0000.nii.gz) and its manual ``label``."""
    from conftest import affine_for

    assert REAL.is_dir(), f"real data not found at {REAL} (set BIDS_POSTOP_REAL_DATA)"
    root = tmp_path_factory.mktemp("stock_lps")
    name = f"Dataset{STOCK_DATASET_ID:03d}_StockLPS"
    raw = root / "raw" / name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    affine = affine_for("LPS", SPACING, oblique_deg=OBLIQUE_DEG)
    scans = [_downsampled(REAL / s) for s in SCANS]
    cases = []
    for i, scan in enumerate(scans * 2):
        image, label = _with_spheres(scan, seed=i)
        cases.append(f"case{i}")
        nib.save(nib.Nifti1Image(image, affine), raw / "imagesTr" / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / "labelsTr" / f"case{i}.nii.gz")
    # no overwrite_image_reader_writer: nnU-Net's default reader for NIfTI (SimpleITKIO)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1wCE"}, "labels": {"background": 0, "tumor": 1}, "numTraining": len(cases),
        "file_ending": ".nii.gz"}))
    image, label = _with_spheres(scans[2], seed=99)
    inputs = root / "test_input"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image, affine), inputs / "test_0000.nii.gz")
    for sub in ("preprocessed", "results"):
        (root / sub).mkdir()
    proc = subprocess.run([sys.executable, "-c", _STOCK_TRAINING, str(STOCK_DATASET_ID), name, json.dumps(cases),
                           str(root / "preprocessed")], capture_output=True, text=True, env=_nnunet_env(root),
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = root / "results" / name / f"{TRAINER}__nnUNetPlans__3d_fullres"
    assert json.loads((model / "plans.json").read_text())["image_reader_writer"] == "SimpleITKIO"
    return {"root": root, "model": model, "inputs": inputs, "label": label}


def _stock_probability(out: Path, reference: nib.Nifti1Image, to_stored) -> np.ndarray:
    """nnUNetv2_predict's foreground probability (its .npz holds the reader's (z, y, x) arrays) on the grid of
    ``reference``, checked against the segmentation it wrote there."""
    probability = to_stored(np.load(out / "test.npz")["probabilities"][1].astype(np.float32))
    segmentation = nib.load(out / "test.nii.gz")
    np.testing.assert_allclose(segmentation.affine, reference.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(segmentation.dataobj) > 0, probability > 0.5)
    return probability


def _compare(ours: np.ndarray, stock: np.ndarray) -> tuple[float, float]:
    assert ours.shape == stock.shape and ours.dtype == np.float32
    return _dice(ours > 0.5, stock > 0.5), float(np.abs(ours - stock).max())


def test_stock_model_on_lps_oblique_files_matches_nnunetv2_predict(stock_lps_model, tmp_path):
    from dataclasses import replace

    from bids_postop.segmentation.models import resolve_models
    from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability

    model, test_file = stock_lps_model["model"], stock_lps_model["inputs"] / "test_0000.nii.gz"
    reference = nib.load(test_file)
    assert nib.aff2axcodes(reference.affine) == ("L", "P", "S")
    _stock_predict(stock_lps_model["root"], STOCK_DATASET_ID, stock_lps_model["inputs"], tmp_path / "stock",
                   trainer=TRAINER, save_probabilities=True)
    stock = _stock_probability(tmp_path / "stock", reference, lambda p: p.transpose(2, 1, 0))  # SimpleITKIO order
    truth = stock_lps_model["label"] > 0
    assert (stock > 0.5).sum() > 30, "the tiny model should find the labelled half-spheres"
    print(f"\nDice(nnUNetv2_predict, synthetic label) = {_dice(stock > 0.5, truth):.3f}")

    options = NnUNetOptions(device="cpu", trust_checkpoint=True)  # the stock checkpoint holds optimizer state
    [card] = resolve_models(model)  # a bare nnU-Net trained-model folder
    report: dict = {}
    ours = predict_probability(card, [test_file], options=options, report=report)
    assert (report["input_convention"], report["input_convention_from"]) == ("SimpleITKIO", "plans.json")
    dice, delta = _compare(ours, stock)
    print(f"SimpleITKIO (default reader): Dice(ours, nnUNetv2_predict) = {dice:.4f}, max |Δp| = {delta:.2e} "
          f"(engine {report['engine']})")
    assert dice >= 0.99 and delta <= 5e-3
    # with torch running the network (the default CPU engine is onnxruntime: its own rounding), the very numbers
    torch_engine = predict_probability(card, [test_file], options=replace(options, engine="torch"))
    dice, delta = _compare(torch_engine, stock)
    print(f"SimpleITKIO, torch engine: Dice(ours, nnUNetv2_predict) = {dice:.4f}, max |Δp| = {delta:.2e}")
    assert delta <= 1e-5

    # the old behaviour, always RAS+ (what a card stating "RAS" still does): another array, another result
    [old_card] = resolve_models(_write_card(tmp_path / "old", model, {"input_convention": "RAS"}))
    old = predict_probability(old_card, [test_file], options=options)
    old_dice, old_delta = _compare(old, stock)
    print(f"old behaviour (always RAS+): Dice(old, nnUNetv2_predict) = {old_dice:.4f}, max |Δp| = {old_delta:.2f}")
    assert old_dice < 0.8 and old_delta > 0.25


def test_stock_model_with_reorienting_reader_matches_nnunetv2_predict(stock_lps_model, tmp_path):
    """Same weights, plans.json naming NibabelIOWithReorient (the reader nnUNetv2_predict instantiates; dataset.json
    still names none): both reorient to RAS+, and agree."""
    from bids_postop.core.images import from_ras
    from bids_postop.segmentation.models import resolve_models
    from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability

    root, source = stock_lps_model["root"], stock_lps_model["model"]
    model = root / "results" / f"Dataset{REORIENT_DATASET_ID:03d}_StockLPSReorient" / source.name
    if not model.exists():
        (model / "fold_0").mkdir(parents=True)
        shutil.copy(source / "dataset.json", model / "dataset.json")
        plans = json.loads((source / "plans.json").read_text())
        plans["image_reader_writer"] = "NibabelIOWithReorient"
        (model / "plans.json").write_text(json.dumps(plans, indent=1))
        os.link(source / "fold_0" / "checkpoint_final.pth", model / "fold_0" / "checkpoint_final.pth")
    test_file = stock_lps_model["inputs"] / "test_0000.nii.gz"
    reference = nib.load(test_file)
    _stock_predict(root, REORIENT_DATASET_ID, stock_lps_model["inputs"], tmp_path / "stock", trainer=TRAINER,
                   save_probabilities=True)
    stock = _stock_probability(tmp_path / "stock", reference,
                               lambda p: from_ras(p.transpose(2, 1, 0), reference.affine))  # RAS+ (z, y, x)
    [card] = resolve_models(model)
    report: dict = {}
    ours = predict_probability(card, [test_file], options=NnUNetOptions(device="cpu", trust_checkpoint=True),
                               report=report)
    assert report["input_convention"] == "NibabelIOWithReorient"
    dice, delta = _compare(ours, stock)
    print(f"\nNibabelIOWithReorient: Dice(ours, nnUNetv2_predict) = {dice:.4f}, max |Δp| = {delta:.2e} "
          f"({(stock > 0.5).sum()} voxels)")
    assert (stock > 0.5).sum() > 30
    assert dice >= 0.99 and delta <= 5e-3
