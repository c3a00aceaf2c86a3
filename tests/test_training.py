"""End to end: ``bids_postop-train`` with the tiny network on a simulated 3-site dataset (slow: minutes; the training
is shared with test_agunet.py and test_protocol.py: tests/trained_protocol.py)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import trained_protocol
from conftest import read_tsv

from bids_postop.cli.train import main as train_main
from bids_postop.segmentation.models import read_card, resolve_models


@pytest.fixture(scope="session")
def protocol(tmp_path_factory):
    return trained_protocol.trained(tmp_path_factory)


@pytest.mark.slow
def test_train_tiny_nnunet_configs_a_and_b(protocol, tmp_path):
    import torch

    bids, work = protocol["bids"], protocol["work"]
    assert protocol["codes"]["nnunet"] == 0

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

    # model folder + card, stripped checkpoints; the card records the threshold rule and every candidate's scores
    model = work / "models" / "A"
    card = read_card(model)
    assert card.configuration == "A" and card.channels == ("postop_t1ce",) and 0 < card.threshold < 1
    raw = json.loads((model / "bids_postop_model.json").read_text())
    assert raw["nnunet"]["folds"] == [0, 1] and len(raw["training"]["data_hash"]) == 64
    name = json.loads((bids / "dataset_description.json").read_text())["Name"]
    assert raw["training"]["dataset_name"] == name and f"on {name!r}" in raw["description"]
    selection = raw["threshold_selection"]
    assert selection["rule"] == "dice_f1" and selection["threshold"] == card.threshold
    assert [r["threshold"] for r in selection["table"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert {"dice_P", "recall", "specificity", "balanced_accuracy", "scores"} <= set(selection["table"][0])
    # the review flag's section (issue #20): each fold's own threshold on its own validation participants, and
    # every validation participant's mirror score from its own fold's network (mirrored passes of the --tiny
    # network: left-right)
    review = raw["uncertainty"]
    assert review["version"] == 1 and review["score"] == "mirror_score" and set(review["members"]) == {"fold_0",
                                                                                                      "fold_1"}
    for member in review["members"].values():
        assert member["threshold"] in [r["threshold"] for r in selection["table"]]
        assert member["validation"]["n"] == 2 and isinstance(member["votes"], bool)
    chosen = review["score_threshold_selection"]
    scored = {v["participant_id"]: v["mirror_score"] for v in chosen.get("validation", [])}
    assert set(scored) | set(chosen.get("left_out", [])) == set(selection["validation_participants"])
    assert all(0 <= s <= 1 for s in scored.values()) and chosen["n"] == len(scored)
    assert review["score_threshold"] is None or 0 <= review["score_threshold"] <= 1
    for fold in (0, 1):
        ck = torch.load(model / "nnunet" / f"fold_{fold}" / "checkpoint_final.pth", weights_only=True)
        assert "optimizer_state" not in ck and ck["trainer_name"] == "nnUNetTrainer"
    assert [c.configuration for c in resolve_models(work / "models")] == ["A", "B"]

    # the predictions dataset: every validation participant by its own fold's network (fold recorded), the test
    # site by the fold ensemble; masks exactly on the post-op T1w-CE grid
    fold_of = {r["participant_id"]: r["fold"] for r in splits}
    predictions = work / "predictions" / "A"
    for sub in ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06"):
        (measures,) = (predictions / sub / "ses-postop").glob("*_measures.json")
        data = json.loads(measures.read_text())
        cv = data["provenance"].get("cross_validation")
        assert (cv is None) if fold_of[sub] == "test" else (str(cv["fold"]) == fold_of[sub]), sub
        t1ce = next((bids / sub / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
        (mask,) = (predictions / sub / "ses-postop" / "anat").glob("*_label-tumor_desc-*_mask.nii.gz")
        ref, out = nib.load(t1ce), nib.load(mask)
        assert out.shape == ref.shape
        assert np.array_equal(out.affine, ref.affine)
    # the group level of this model: validation (cross-validation) and test columns
    (row,) = read_tsv(predictions / "group" / "paper_segmentation.tsv")
    assert (row["architecture"], row["configuration"], row["validation_n"], row["test_n"]) == ("nnU-Net", "A", "4",
                                                                                              "2")

    # resumable: a rerun skips finished folds and preprocessing. It also asks for the demo models' recipe
    # (docs/training.md): one fold, another inference patch, the card name, a copy of the model folder; only
    # the export, the validation predictions and the card are redone. (On a copy: the shared run stays intact.)
    work = tmp_path / "train"
    shutil.copytree(protocol["work"], work, symlinks=True)
    argv = [a if a != str(protocol["work"]) else str(work) for a in protocol["argv"]["nnunet"]]
    argv.remove("B")  # --config A: configuration A only
    model = work / "models" / "A"
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


# --- threshold rules (no training) ------------------------------------------------------------------------------

def _threshold_cases():
    """Six validation participants on a 1 mm grid: four with residual tumour (probability ramps of different
    heights over the true box), two GTR (one with a spurious 0.35-probability blob)."""
    from bids_postop.training.threshold import ValidationCase

    rng = np.random.default_rng(0)
    cases = []
    for i, peak in enumerate([0.95, 0.8, 0.55, 0.35, None, None]):
        truth = np.zeros((24, 24, 16), bool)
        prob = rng.uniform(0, 0.05, truth.shape).astype(np.float32)
        if peak is not None:
            truth[4:12, 4:12, 3:9] = True  # 384 voxels = 0.384 ml
            prob[3:13, 4:12, 3:9] = peak * 0.7
            prob[4:12, 4:12, 3:9] = peak
        elif i == 5:
            prob[15:20, 15:20, 3:13] = 0.35  # 250 voxels (0.25 ml): a false positive up to threshold 0.3
        cases.append(ValidationCase(prob, truth, np.eye(4), f"sub-{i}", fold=i % 2))
    return cases


def _expected_row(cases, t):
    """Independent recomputation with numpy/scipy of one threshold's scores (components < 20 voxels removed)."""
    from scipy import ndimage

    dices, per = [], []
    for c in cases:
        pred = c.probability >= t
        labels, n = ndimage.label(pred, structure=np.ones((3, 3, 3)))
        sizes = ndimage.sum(pred, labels, range(1, n + 1))
        pred = np.isin(labels, [k + 1 for k, s in enumerate(sizes) if s >= 20])
        both = pred.sum() + c.truth.sum()
        d = 2 * (pred & c.truth).sum() / both if both else None
        true_pos, pred_pos = c.truth.sum() / 1000 >= 0.175, pred.sum() / 1000 >= 0.175
        outcome = ("TP" if d is not None and d >= 0.01 else "FN") if true_pos and pred_pos else \
            "FN" if true_pos else "FP" if pred_pos else "TN"
        per.append((d, true_pos, outcome))
        dices.append(1.0 if d is None else d)
    tp, fn = sum(o == "TP" for *_, o in per), sum(o == "FN" for *_, o in per)
    tn, fp = sum(o == "TN" for *_, o in per), sum(o == "FP" for *_, o in per)
    recall, spec = tp / (tp + fn), (tn / (tn + fp) if tn + fp else None)
    dice_p = float(np.mean([d for d, pos, _ in per if pos]))
    f1 = 2 * tp / (2 * tp + fp + fn)
    detected = [d for d, _, o in per if o == "TP"]
    return {"dice_all": float(np.mean(dices)), "dice_P": dice_p, "recall": recall, "specificity": spec,
            "balanced_accuracy": None if spec is None else (recall + spec) / 2, "f1": f1,
            "dice_f1": (float(np.mean(dices)) + f1) / 2,
            "dice_recall": (float(np.mean(detected)) + recall) / 2 if detected else None}


def test_threshold_rules_and_the_table_every_candidate_records():
    from bids_postop.training.threshold import DEFAULT_RULE, RULES, THRESHOLDS, choose_threshold

    cases = _threshold_cases()
    assert DEFAULT_RULE == "dice_f1" and set(RULES) == {"dice_f1", "dice_positive", "dice_recall",
                                                        "balanced_accuracy"}
    chosen = {rule: choose_threshold(cases, rule=rule) for rule in RULES}
    table = chosen["dice_f1"]["table"]
    assert [r["threshold"] for r in table] == list(THRESHOLDS)
    for row in table:
        expected = _expected_row(cases, row["threshold"])
        for key in ("dice_all", "dice_P", "recall", "specificity", "balanced_accuracy", "f1"):
            assert row[key] == pytest.approx(expected[key]), (row["threshold"], key)
        assert row["scores"]["dice_f1"] == pytest.approx(expected["dice_f1"])
        assert row["scores"]["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    for rule, result in chosen.items():
        scores = [r["scores"][rule] for r in result["table"] if r["scores"][rule] is not None]
        assert result["score"] == pytest.approx(max(scores)), rule
        assert result["rule"] == rule and result["rule_description"] == RULES[rule] and RULES[rule] in result["how"]
    # the rules disagree on this set: balanced accuracy avoids the false positive (threshold > 0.35), Dice-P alone
    # keeps the lowest threshold that segments the faintest tumour (<= 0.35)
    assert chosen["balanced_accuracy"]["threshold"] > 0.35 >= chosen["dice_positive"]["threshold"]
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(cases, rule="auc")


def test_no_positive_validation_participant_keeps_the_default_threshold():
    from bids_postop.training.threshold import ValidationCase, choose_threshold

    empty = [ValidationCase(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), bool), np.eye(4), "sub-1")]
    result = choose_threshold(empty, rule="dice_positive")
    assert result["threshold"] == 0.5 and "default" in result["how"]
