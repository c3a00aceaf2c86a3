"""The nnU-Net backend on the shipped demo model: grids, orientation handling, channel checks."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_postop.core.images import from_ras, to_ras
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation.models import DEMO_MODELS, resolve_models
from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability

FAST = NnUNetOptions(device="cpu", use_mirroring=False)


@pytest.fixture(scope="module")
def card_b():
    cards = {c.configuration: c for c in resolve_models("demo")}
    assert "B" in cards, f"demo model B missing in {DEMO_MODELS}"
    return cards["B"]


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory):
    """A simulated post-op case (RAS grid) with a residual fragment, skull-stripped as the pipeline does."""
    from bids_postop.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=3)
    anat = root / "sub-01" / "ses-postop" / "anat"
    t1ce = next(anat.glob("*_ce-*_T1w.nii.gz"))
    t1 = anat / "sub-01_ses-postop_T1w.nii.gz"
    return nib.load(t1ce), nib.load(t1)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, demo_case):
    """The demo case's T1w-CE and T1w written once, in the demo model's channel order."""
    root = tmp_path_factory.mktemp("demo_files")
    files = [root / "t1ce.nii.gz", root / "t1.nii.gz"]
    for img, path in zip(demo_case, files, strict=True):
        nib.save(img, path)
    return files


def reoriented(img: nib.Nifti1Image, codes: str, oblique_deg: float = 0.0) -> nib.Nifti1Image:
    """The same image stored in another voxel order (and optionally with an oblique affine)."""
    from nibabel import orientations as nio

    data = np.asanyarray(img.dataobj)
    ornt = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(tuple(codes)))
    new = img.as_reoriented(ornt)
    aff = new.affine.copy()
    if oblique_deg:
        t = np.deg2rad(oblique_deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        aff = rot @ aff
    assert new.shape == nio.apply_orientation(data, ornt).shape
    return nib.Nifti1Image(np.asanyarray(new.dataobj), aff)


@pytest.mark.slow
def test_probability_is_on_the_input_grid_whatever_the_orientation(tmp_path, card_b, demo_case):
    t1ce, t1 = demo_case
    results = {}
    for codes, oblique in [("RAS", 0.0), ("LPS", 0.0), ("PIL", 0.0), ("LPS", 8.0)]:
        files = []
        for name, img in (("t1ce", t1ce), ("t1", t1)):
            out = tmp_path / f"{codes}{oblique}_{name}.nii.gz"
            nib.save(reoriented(img, codes, oblique), out)
            files.append(out)
        prob = predict_probability(card_b, files, options=FAST)
        ref = nib.load(files[0])
        assert prob.shape == ref.shape and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        results[(codes, oblique)] = to_ras(prob, ref.affine)
    base = results[("RAS", 0.0)]
    assert (base > card_b.threshold).sum() > 20, "the residual fragment of the demo case should be found"
    for key, ras in results.items():
        # the network sees the same RAS array whatever the storage order: identical probabilities
        np.testing.assert_allclose(ras, base, atol=1e-4, err_msg=str(key))


def test_channel_count_and_grid_are_checked(tmp_path, card_b, demo_case):
    t1ce, t1 = demo_case
    nib.save(t1ce, tmp_path / "a.nii.gz")
    with pytest.raises(ModelError, match="takes 2 channels"):
        predict_probability(card_b, [tmp_path / "a.nii.gz"], options=FAST)
    small = nib.Nifti1Image(np.asanyarray(t1.dataobj)[:-2], t1.affine)
    nib.save(small, tmp_path / "b.nii.gz")
    with pytest.raises(InputDataError, match="b.nii.gz.*register it first"):
        predict_probability(card_b, [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], options=FAST)


def test_from_ras_of_to_ras_is_identity_on_demo_grid(demo_case):
    t1ce, _ = demo_case
    data = np.asanyarray(t1ce.dataobj)
    np.testing.assert_array_equal(from_ras(to_ras(data, t1ce.affine), t1ce.affine), data)


def test_checkpoints_load_without_code_execution():
    import torch

    for card in resolve_models("demo"):
        for ckpt in Path(card.folder).rglob("checkpoint_*.pth"):
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            assert "network_weights" in state and "optimizer_state" not in state


@pytest.mark.slow
def test_cropping_to_the_nonzero_box_gives_the_stock_result(tmp_path, card_b, demo_case):
    """Cropping before nnU-Net (the default) equals nnU-Net's own ``predict_single_npy_array`` on the whole
    grid: nnU-Net crops to the same nonzero box before resampling. Checked on an oblique LPS grid padded with
    a zero margin, the layout of a skull-stripped scan with a large field of view."""
    from dataclasses import replace

    t1ce, t1 = demo_case
    files = []
    for name, img in (("t1ce", t1ce), ("t1", t1)):
        moved = reoriented(img, "LPS", 5.0)
        data = np.pad(np.asanyarray(moved.dataobj), ((7, 3), (0, 12), (4, 0)))
        aff = moved.affine.copy()
        aff[:3, 3] -= aff[:3, :3] @ np.array([7, 0, 4])
        files.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, aff), files[-1])
    torch_engine = replace(FAST, engine="torch")  # the whole-grid stock path runs torch: compare like with like
    cropped = predict_probability(card_b, files, options=torch_engine)
    whole = predict_probability(card_b, files, options=replace(torch_engine, crop=False))
    assert cropped.shape == whole.shape == nib.load(files[0]).shape
    # identical up to float rounding (the lean two-class export resamples l1 - l0 instead of both logits)
    assert np.abs(cropped - whole).max() < 1e-3
    a, b = cropped > card_b.threshold, whole > card_b.threshold
    assert b.sum() > 20
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999


def test_nonzero_box():
    from bids_postop.segmentation.nnunet import nonzero_box

    a, b = np.zeros((5, 6, 7)), np.zeros((5, 6, 7))
    assert nonzero_box([a, b]) is None
    a[1, 2, 3] = 1
    b[3, 4, 0] = -2
    assert nonzero_box([a, b]) == (slice(1, 4), slice(2, 5), slice(0, 4))


def test_onnxruntime_engine_gives_the_torch_result(card_b, demo_files, caplog):
    """The default CPU engine answers nnU-Net's network calls with onnxruntime (fp32): same tiles, Gaussian,
    mirroring and fold averaging as torch, probabilities equal up to float rounding. The bf16 torch path is
    reported as such and stays close to fp32 on this trained model."""
    import logging
    from dataclasses import replace

    mirrored = NnUNetOptions(device="cpu", use_mirroring=True)
    reports = {}
    probabilities = {}
    with caplog.at_level(logging.WARNING, logger="bids_postop"):
        for name, options in (("torch", replace(mirrored, engine="torch")), ("auto", mirrored),
                              ("bf16", replace(mirrored, bf16=True))):
            reports[name] = {}
            probabilities[name] = predict_probability(card_b, demo_files, options=options, report=reports[name])
    assert not [r for r in caplog.records if "onnxruntime" in r.getMessage()], caplog.text
    assert reports["auto"]["engine"] == "onnxruntime" and reports["auto"]["precision"] == "fp32"
    assert reports["torch"]["engine"] == "torch" and reports["torch"]["precision"] == "fp32"
    from bids_postop.segmentation.nnunet_engines import cpu_computes_bf16

    if cpu_computes_bf16():  # elsewhere bf16 falls back to fp32 (and onnxruntime)
        assert reports["bf16"]["engine"] == "torch" and reports["bf16"]["precision"] == "bf16"
    assert reports["auto"]["mirror_axes"] == reports["torch"]["mirror_axes"] != []
    torch_p, ort_p, bf16_p = probabilities["torch"], probabilities["auto"], probabilities["bf16"]
    # nnU-Net sums tile logits in float16: fp32 differences of 1e-6 become up to ~1e-3 in probability
    assert np.abs(torch_p - ort_p).max() < 5e-3

    def dice(a, b):
        a, b = a > card_b.threshold, b > card_b.threshold
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert (torch_p > card_b.threshold).sum() > 20
    print(f"max |torch - onnxruntime| {np.abs(torch_p - ort_p).max():.2e}, Dice {dice(torch_p, ort_p):.5f}; "
          f"max |fp32 - bf16| {np.abs(torch_p - bf16_p).max():.2e}, Dice {dice(torch_p, bf16_p):.5f}")
    assert dice(torch_p, ort_p) >= 0.99  # the equivalence bound; 0.9990 measured (voxels at the threshold)
    assert dice(torch_p, bf16_p) >= 0.95  # bf16 changes probabilities; by how much is in benchmarks/RESULTS.md


def test_onnxruntime_engine_falls_back_to_torch_when_export_fails(card_b, demo_files, caplog,
                                                                  monkeypatch):
    """Without the ``onnx`` package torch cannot export the network: the step says so and runs torch."""
    import logging
    import sys
    import weakref
    from dataclasses import replace

    from bids_postop.segmentation import nnunet_engines

    expected = predict_probability(card_b, demo_files, options=replace(FAST, engine="torch"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an install without onnx looks like to torch.onnx
    monkeypatch.setattr(nnunet_engines, "_EXPORTED", weakref.WeakKeyDictionary())  # nothing exported by earlier tests
    report = {}
    with caplog.at_level(logging.WARNING, logger="bids_postop"):
        fallback = predict_probability(card_b, demo_files, options=replace(FAST, engine="onnxruntime"), report=report)
    assert "onnxruntime could not run this nnU-Net network" in caplog.text
    assert np.array_equal(fallback, expected)
    assert report["engine"] == "torch"  # segment.json says what ran


def test_onnxruntime_engine_exports_each_network_once(card_b, demo_files, caplog):
    """A process that segments several participants exports the fold networks once (about 10 s each for the
    study network), not once per participant."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="bids_postop"):
        first = predict_probability(card_b, demo_files, options=FAST)
        caplog.clear()
        report = {}
        second = predict_probability(card_b, demo_files, options=FAST, report=report)
    assert report["engine"] == "onnxruntime"
    assert "exported for onnxruntime" not in caplog.text
    assert np.array_equal(first, second)


@pytest.fixture(scope="module")
def two_fold_model(tmp_path_factory, card_b):
    """Demo model B with a second fold: fold 0's weights perturbed (5 % of each tensor's spread), so that the
    ensemble differs from fold 0 alone (tests/two_fold_model.py)."""
    from two_fold_model import write_two_fold_model

    [two] = resolve_models(write_two_fold_model(card_b.folder, tmp_path_factory.mktemp("two_fold") / "B"))
    return two


@pytest.mark.slow
def test_engines_run_every_fold_of_an_ensemble(two_fold_model, demo_files, caplog):
    """onnxruntime and torch.compile with frozen weights give eager torch's two-fold ensemble: each fold is
    exported / compiled from the predictor's torch network (not from the previous fold's engine network, which
    made every multi-fold model fall back to torch) and, compiled, is its own copy (a graph frozen with fold 0's
    weights would answer fold 1's calls with them)."""
    import logging
    from dataclasses import replace

    from bids_postop.segmentation.nnunet_engines import cpu_computes_bf16, cxx_compiler

    card = two_fold_model
    engines = ["onnxruntime"] + (["compiled"] if cxx_compiler() else [])  # without a compiler: fallback test below
    eager = predict_probability(card, demo_files, options=replace(FAST, engine="torch"))
    fold_0 = predict_probability(card, demo_files, options=replace(FAST, engine="torch", folds=(0,)))
    reports: dict[str, dict] = {name: {} for name in engines}
    with caplog.at_level(logging.WARNING, logger="bids_postop"):
        results = {name: predict_probability(card, demo_files, options=replace(FAST, engine=name),
                                             report=reports[name]) for name in engines}
    assert "could not run" not in caplog.text

    def dice(a, b):
        a, b = a > card.threshold, b > card.threshold
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert (eager > card.threshold).sum() > 20
    assert np.abs(eager - fold_0).max() > 0.05  # fold 1 matters here
    for name, result in results.items():
        assert reports[name]["engine"] == name and reports[name]["precision"] == "fp32", name
        assert reports[name]["n_networks"] == 2, name
        assert np.abs(eager - result).max() < 5e-3, name  # float16 tile accumulation
        assert dice(eager, result) >= 0.99, name
        print(f"{name} vs eager: max {np.abs(eager - result).max():.2e}, Dice {dice(eager, result):.5f}")
    if "compiled" in engines and cpu_computes_bf16():
        report: dict = {}
        bf16 = predict_probability(card, demo_files, options=replace(FAST, engine="compiled", bf16=True),
                                   report=report)
        assert report["engine"] == "compiled" and report["precision"] == "bf16"
        assert dice(eager, bf16) >= 0.95

def test_compiled_engine_falls_back_to_torch_without_a_compiler(card_b, demo_files, caplog, monkeypatch):
    """No C++ compiler for inductor: the step says so, runs torch, and segment.json reports torch."""
    import logging
    from dataclasses import replace

    from bids_postop.segmentation import nnunet_engines

    expected = predict_probability(card_b, demo_files, options=replace(FAST, engine="torch"))
    monkeypatch.setattr(nnunet_engines, "cxx_compiler", lambda: None)
    monkeypatch.setattr(nnunet_engines, "_COMPILED", __import__("weakref").WeakKeyDictionary())
    report = {}
    with caplog.at_level(logging.WARNING, logger="bids_postop"):
        fallback = predict_probability(card_b, demo_files, options=replace(FAST, engine="compiled"), report=report)
    assert "compiled could not run this nnU-Net network" in caplog.text and "C++ compiler" in caplog.text
    assert np.array_equal(fallback, expected)
    assert report["engine"] == "torch"


# ------------------------------------------------------------------------------------------------
# ensemble members (issue #20): folds, mirrored passes, none


def _preprocessed(card, files, use_mirroring):
    """The predictor (cached, as the backend builds it) and the preprocessed box tensor of ``files``."""
    import torch

    from bids_postop.segmentation import nnunet as N

    folder = N.trained_model_folder(card)
    folds = tuple(card.details["folds"])
    predictor = N.build_predictor(folder, folds, "checkpoint_final.pth", "cpu", use_mirroring, 0.5)
    arrays, view = N.reader_arrays(N.input_convention(card)[0], files)
    box = N.nonzero_box(arrays)
    data, _ = N._preprocess_for_inference(predictor, np.stack([a[box] for a in arrays]), list(view.spacing))
    return predictor, torch.from_numpy(data)


def _passes_run_alone(predictor, data):
    """One network's two left-right passes, each by nnU-Net's sliding window without mirroring: the volume's, and the
    flipped volume's flipped back (the cached predictor's mirroring is put back)."""
    import torch

    predictor.use_mirroring = False
    try:
        with torch.inference_mode():
            alone = predictor.predict_sliding_window_return_logits(data).float()
            flipped = torch.flip(predictor.predict_sliding_window_return_logits(torch.flip(data, [3])), [3]).float()
    finally:
        predictor.use_mirroring = True
    return alone, flipped


@pytest.mark.slow
def test_fold_members_leave_the_ensemble_unchanged(two_fold_model, demo_files):
    """Two folds: keeping each fold's logits does not change the ensemble (the same operations as nnU-Net's own
    fold loop, bit for bit), and each member is what that fold gives alone (with its mirrored passes averaged, as
    nnU-Net averages them inside a fold). The onnxruntime engine with members: the Segment node test below."""
    from dataclasses import replace

    from bids_postop.segmentation.nnunet import predict

    card = two_fold_model
    options = NnUNetOptions(device="cpu", engine="torch")
    plain = predict_probability(card, demo_files, options=options)  # nnU-Net's predict_logits_from_preprocessed_data
    kept = predict(card, demo_files, options=options, keep_members=True)
    np.testing.assert_array_equal(kept.probability, plain)
    assert kept.members.kind == "folds" and kept.members.names == ("fold_0", "fold_1")
    members = list(kept.members)
    assert np.abs(members[0] - members[1]).max() > 0.05  # the folds differ
    for fold, member in zip((0, 1), members, strict=True):  # members cover the crop; 0 outside, as the ensemble
        alone = predict_probability(card, demo_files, options=replace(options, folds=(fold,)))
        np.testing.assert_array_equal(kept.members.paste(member, alone.shape), alone, err_msg=f"fold {fold}")


@pytest.mark.slow
def test_mirrored_passes_are_the_members_of_a_single_fold(card_b, demo_files):
    """One fold with test-time mirroring (the demo model mirrors left-right): the members are the unmirrored pass
    and the mirrored pass flipped back. nnU-Net's own mirrored logits are unchanged, bit for bit; the members' mean
    equals them within float16 accumulation; the unmirrored member is nnU-Net's prediction without mirroring, and
    the mirrored member is the prediction of the flipped volume flipped back (a wrong flip would be far off)."""
    import torch

    from bids_postop.segmentation import nnunet_engines as E
    from bids_postop.segmentation.nnunet import predict

    options = NnUNetOptions(device="cpu", engine="torch")
    plain = predict_probability(card_b, demo_files, options=options)
    kept = predict(card_b, demo_files, options=options, keep_members=True)
    np.testing.assert_array_equal(kept.probability, plain)
    assert kept.members.kind == "mirrored passes" and kept.members.names == ("unmirrored", "mirrored axes 2")
    unmirrored = predict_probability(card_b, demo_files, options=NnUNetOptions(device="cpu", engine="torch",
                                                                               use_mirroring=False))
    np.testing.assert_array_equal(kept.members.paste(next(iter(kept.members)), unmirrored.shape), unmirrored)

    predictor, data = _preprocessed(card_b, demo_files, True)
    stock = predictor.predict_logits_from_preprocessed_data(data).float()
    ensemble, members = E.predict_logits_and_members(predictor, data, 1, "torch", keep_members=True)
    assert torch.equal(ensemble.float(), stock)
    assert predictor.label_manager.num_segmentation_heads == 2  # the stand-in is gone
    mean = torch.stack([m.float() for m in members.logits]).mean(0)
    alone, flipped = _passes_run_alone(predictor, data)
    assert torch.equal(members.logits[0].float(), alone)

    def foreground(logits):  # the two-class softmax's foreground
        return torch.sigmoid(logits[1] - logits[0])

    # float16 sums of Gaussian-weighted tiles: where the weights are tiny (the padded corners) the logits differ
    # by up to ~0.5, which the probabilities do not show
    gap = float((foreground(mean) - foreground(stock)).abs().max())
    flip_gap = float((foreground(members.logits[1].float()) - foreground(flipped)).abs().max())
    passes_gap = float((foreground(members.logits[1].float()) - foreground(alone)).abs().max())
    print(f"foreground probability: mean of passes vs nnU-Net {gap:.2e}; mirrored pass vs flipped run {flip_gap:.2e}; "
          f"mirrored vs unmirrored pass {passes_gap:.2e}")
    assert gap < 2e-3 and flip_gap < 2e-3
    assert passes_gap > 0.05  # the passes really differ


@pytest.mark.slow
def test_mirror_scores_are_each_networks_mirrored_pass_disagreement(card_b, two_fold_model, demo_files):
    """The review flag's mirror score (issue #20): for one network, 1 - the soft agreement of its unmirrored pass and
    the flipped volume's pass flipped back, each run on its own by nnU-Net's sliding window without mirroring; for
    a fold ensemble, each fold's score is the score that fold gives alone (what a validation participant gets from
    its own fold), and asking for the scores changes neither the ensemble nor the members."""
    from dataclasses import replace

    import torch

    from bids_postop.core.uncertainty import mirror_disagreement
    from bids_postop.segmentation import nnunet_engines as E
    from bids_postop.segmentation.nnunet import predict

    predictor, data = _preprocessed(card_b, demo_files, True)
    _, scored = E.predict_logits_and_members(predictor, data, 1, "torch", mirror_scores=True)
    assert scored.kind == "none" and len(scored.mirror_scores) == 1
    alone, flipped = _passes_run_alone(predictor, data)
    by_hand = mirror_disagreement([torch.sigmoid(x[1] - x[0]).numpy() for x in (alone, flipped)])
    print(f"mirror score {scored.mirror_scores[0]:.5f}, by hand {by_hand:.5f}")
    assert 0.005 < by_hand < 0.9  # the passes differ, and agree mostly
    assert scored.mirror_scores[0] == pytest.approx(by_hand, abs=2e-3)  # float16 accumulation of the window

    options = NnUNetOptions(device="cpu", engine="torch")
    plain = predict(two_fold_model, demo_files, options=options, keep_members=True)
    with_scores = predict(two_fold_model, demo_files, options=replace(options, mirror_scores=True),
                          keep_members=True, report=(report := {}))
    np.testing.assert_array_equal(with_scores.probability, plain.probability)
    for a, b in zip(plain.members, with_scores.members, strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain.mirror_scores is None and report["mirror_scores"] == list(with_scores.mirror_scores)
    for fold in (0, 1):
        single = {}
        predict_probability(two_fold_model, demo_files, options=replace(options, folds=(fold,), mirror_scores=True),
                            report=single)
        assert single["mirror_scores"] == pytest.approx([with_scores.mirror_scores[fold]], abs=1e-9)
    assert with_scores.mirror_scores[0] != with_scores.mirror_scores[1]


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIL", "SAR"])
def test_members_box_in_the_stored_voxel_order(codes):
    """Members cover the stored grid's region that nnU-Net's (reader-order) crop maps to, whatever the orientation."""
    from nibabel import orientations as nio

    from bids_postop.segmentation.nnunet import ReaderView, stored_box

    shape = (7, 9, 11)
    affine = nio.inv_ornt_aff(nio.axcodes2ornt(tuple(codes)), shape)  # any affine with these axis codes
    view = ReaderView(nio.io_orientation(affine), (1.0, 1.0, 1.0))
    stored = np.random.default_rng(0).random(shape)
    reader = view.to_reader(stored)
    box = (slice(1, 4), slice(2, reader.shape[1]), slice(0, 5))
    np.testing.assert_array_equal(view.to_stored(reader[box]), stored[stored_box(view, reader.shape, box)])


@pytest.mark.slow
def test_one_fold_without_mirroring_has_no_members(card_b, demo_files):
    from bids_postop.segmentation.nnunet import predict

    kept = predict(card_b, demo_files, options=FAST, keep_members=True)
    assert kept.members.kind == "none" and len(kept.members) == 0 and list(kept.members) == []
    np.testing.assert_array_equal(kept.probability, predict_probability(card_b, demo_files, options=FAST))


@pytest.mark.slow
def test_segment_node_writes_the_uncertainty_map_and_summary(tmp_path, two_fold_model, demo_files):
    """The Segment node: probability and run info as before; the member std map on the T1w-CE grid and the summary
    JSON for two folds; no map and n/a values for one fold without mirroring (--fast); neither output when the
    assessment is switched off."""
    import json

    from nipype.interfaces.base import isdefined

    from bids_postop.interfaces.core import Segment

    card = two_fold_model
    results = {}
    for name, fast, assess in (("full", False, True), ("fast", True, True), ("off", False, False)):
        node = Segment(model_folder=str(card.folder), device="cpu", threads=1, use_mirroring=False,
                       first_fold_only=fast, postop_t1ce=str(demo_files[0]), postop_t1=str(demo_files[1]),
                       threshold=card.threshold, assess_uncertainty=assess)
        (tmp_path / name).mkdir()
        results[name] = node.run(cwd=str(tmp_path / name)).outputs
    reference = nib.load(demo_files[0])
    off = results["off"]
    assert not isdefined(off.uncertainty) and not isdefined(off.uncertainty_json)
    full = results["full"]
    np.testing.assert_array_equal(np.asanyarray(nib.load(full.out_file).dataobj),
                                  np.asanyarray(nib.load(off.out_file).dataobj))
    report: dict = {}
    expected = predict_probability(card, demo_files, options=FAST, report=report)
    np.testing.assert_array_equal(np.asanyarray(nib.load(full.out_file).dataobj), expected)
    assert set(json.loads(open(full.run_info).read())) == {*report, "device", "mirror_scores"}
    uncertainty = nib.load(full.uncertainty)
    assert uncertainty.shape == reference.shape and np.allclose(uncertainty.affine, reference.affine)
    data = np.asanyarray(uncertainty.dataobj)
    assert data.dtype == np.float32 and 0 <= data.min() and 0 < data.max() <= 0.5
    summary = json.loads(open(full.uncertainty_json).read())
    assert summary["members_kind"] == "folds" and summary["members_count"] == 2
    assert summary["member_names"] == ["fold_0", "fold_1"] and len(summary["member_volumes_ml"]) == 2
    assert summary["residual_volume_ml_min"] <= summary["residual_volume_ml_max"]
    assert summary["threshold"] == card.threshold and isinstance(summary["review_flag"], bool)
    assert summary["uncertainty_score"] > 0
    assert summary["mirror_scores"] is None and summary["rules"]["score_above_threshold"] is None  # no mirroring
    print(json.dumps({k: summary[k] for k in ("member_volumes_ml", "rt_fraction_members", "uncertainty_score",
                                              "review_flag", "reasons")}))
    fast = results["fast"]
    assert not isdefined(fast.uncertainty)
    summary = json.loads(open(fast.uncertainty_json).read())
    assert summary["members_kind"] == "none" and summary["review_flag"] is None
    assert summary["residual_volume_ml_min"] is None and summary["rt_fraction_members"] is None


@pytest.mark.slow
def test_segment_node_applies_the_cards_review_section(tmp_path, two_fold_model, demo_files):
    """A card with a review section (as bids_postop-train writes it): each fold member post-processed at its own
    threshold, a non-voting fold named, each fold's mirror score computed and compared with the card's threshold."""
    import json
    import shutil

    from bids_postop.interfaces.core import Segment

    root = tmp_path / "B"
    shutil.copytree(two_fold_model.folder, root)
    card = json.loads((root / "bids_postop_model.json").read_text())
    card["uncertainty"] = {"version": 1, "score": "mirror_score", "score_threshold": 0.0,
                           "members": {"fold_0": {"threshold": 0.3, "votes": True},
                                       "fold_1": {"threshold": 0.7, "votes": False}}}
    (root / "bids_postop_model.json").write_text(json.dumps(card))
    node = Segment(model_folder=str(root), device="cpu", threads=1, postop_t1ce=str(demo_files[0]),
                   postop_t1=str(demo_files[1]), threshold=two_fold_model.threshold)
    summary = json.loads(open(node.run(cwd=str(tmp_path)).outputs.uncertainty_json).read())
    assert summary["member_thresholds"] == [0.3, 0.7] and summary["members_not_voting"] == ["fold_1"]
    assert len(summary["mirror_scores"]) == 2  # each fold's; the mean over the voting ones: fold_0's alone
    assert summary["mirror_score"] == summary["mirror_scores"][0] != summary["mirror_scores"][1]
    assert summary["rules"]["score_above_threshold"] is True and summary["review_flag"] is True
    assert any("mirror score" in r for r in summary["reasons"])


@pytest.mark.parametrize("source, target, current, new", [
    ((20, 25, 30), (53, 61, 77), (1.5, 1.5, 1.5), (0.6, 0.6, 0.6)),  # up
    ((40, 41, 39), (17, 13, 29), (1.0, 1.0, 1.0), (2.3, 3.1, 1.3)),  # down and up
    ((30, 64, 64), (80, 150, 150), (3.0, 1.0, 1.0), (1.1, 0.43, 0.43)),  # anisotropy 3: not separate z
    ((10, 12, 14), (10, 12, 14), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # no resampling
    ((6, 40, 40), (33, 44, 44), (5.5, 0.9, 0.9), (1.0, 0.82, 0.82)),  # separate z: nnU-Net's own function
])
def test_float32_resampling_is_nnunets_bit_for_bit(source, target, current, new):
    """The export's probability resampling, written straight into float32 (no float64 copy of the box), gives
    nnU-Net's ``resample_data_or_seg_to_shape`` exactly; configurations it does not cover go to nnU-Net."""
    from functools import partial

    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from bids_postop.segmentation.nnunet import _resample_linear_float32

    class Configuration:  # what the export reads from nnU-Net's ConfigurationManager
        resampling_fn_probabilities = partial(resample_data_or_seg_to_shape, is_seg=False, order=1, order_z=0,
                                              force_separate_z=None)

    data = np.random.default_rng(0).normal(0, 8, (1, *source)).astype(np.float32)
    expected = np.asarray(Configuration.resampling_fn_probabilities(data, target, current, new)[0], np.float32)
    mine = _resample_linear_float32(Configuration, data, target, current, new)
    if current[0] == 5.5:
        assert mine is None
    else:
        assert mine.dtype == np.float32
        np.testing.assert_array_equal(mine, expected)
