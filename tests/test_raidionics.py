"""Raidionics backend: model folders, cards, ``pipeline.json``, runtime options, the pure steps, and the behaviours
chosen where raidionicsseg 1.5.2 crashes. That the whole pipeline gives raidionicsseg's result is
``test_raidionics_parity.py`` (side by side with the official library on real scans)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL, affine_for, write_nifti
from raidionics_onnx import make_onnx
from scipy import ndimage as ndi

from bids_postop.configurations import CONFIGURATIONS
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation import raidionics as R
from bids_postop.segmentation import raidionics_model as RM
from bids_postop.segmentation.raidionics_brain import extract_brain_raidionics
from bids_postop.segmentation.raidionics_model import card_for_raidionics_folder

T1C = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1c.nii.gz"  # 0.9 × 0.9 × 5.5 mm, LAS, with skull
BRAIN = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1c_brainmask_hdbet.nii.gz"

FULL_INI = """[Default]
imaging_modality = MRI
training_backend = TF
task = segmentation
[PreProcessing]
output_spacing = 1.0, 1.0, 1.0
background_cropping = minimum
intensity_clipping_range = 0.0, 99.5
normalization_method = zeromean   # comment as in Raidionics files
new_axial_size = 64, 56, 48
number_inputs = 1
[Training]
nb_classes = 2
classes = background, tumor
optimal_thresholds = 0.3, 0.45
deep_supervision = true
"""


def real_scan():
    assert T1C.is_file() and BRAIN.is_file(), f"real scans not found under {REAL}"
    return T1C


def package(folder, ini=FULL_INI, *, folds=(1.0,), n_in=1, layout="folds", **net):
    """A Raidionics package: ``pre_processing.ini`` and a closed-form network per fold (fold k's weights × folds[k])."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pre_processing.ini").write_text(ini)
    for k, scale in enumerate(folds):
        target = folder / f"fold{k}" / "model.onnx" if layout == "folds" else folder / "model.onnx"
        make_onnx(target, n_in, weights=np.linspace(1, -0.5, n_in) * scale, **net)
    return folder


def pipeline_json(inputs, model):
    """A Raidionics pipeline: brain segmentation, then the model's step on ``inputs`` (timestamp, sequence, labels)."""
    steps = {str(i): {"timestamp": t, "sequence": s, "labels": lab, "space": {"timestamp": 1, "sequence": "T1-CE"}}
             for i, (t, s, lab) in enumerate(inputs)}
    return json.dumps({"1": {"task": "Segmentation", "inputs": {"0": steps["0"]}, "target": ["Brain"],
                             "model": "MRI_Brain"},
                       "2": {"task": "Segmentation", "inputs": steps, "target": ["Tumor"], "model": model}})


# ------------------------------------------------------------------------------------------------
# cards, pipeline.json, runtime options


@pytest.mark.parametrize("n, config", [(1, "A"), (2, "B"), (3, "C"), (4, "D"), (5, "E")])
def test_card_maps_postop_models_to_configurations(tmp_path, n, config):
    folder = tmp_path / f"MRI_GBM_Postop_FV_{n}p"
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(FULL_INI.replace("number_inputs = 1", f"number_inputs = {n}"))
    (folder / "model.onnx").write_bytes(b"")  # never loaded here
    card = card_for_raidionics_folder(folder)
    assert (card.configuration, card.channels, card.architecture) == (config, CONFIGURATIONS[config], "raidionics")
    assert card.threshold == 0.45  # the tumour class of "0.3, 0.45"
    # what the official pipeline does: built-in channel order, registered (unstripped) scans, first fold only
    assert card.details["channel_order"] == list(CONFIGURATIONS[config])
    assert card.details["channel_order_source"] == "built-in table"
    assert card.details["input_images"] == "registered"
    assert RM.runtime_options(card.details) == RM.RuntimeOptions(folds_ensembling=False)
    assert RM.network_channel_order(card) == (CONFIGURATIONS[config], "built-in table")


def test_pipeline_json_gives_the_channel_order(tmp_path):
    name = "MRI_GBM_Postop_FV_4p"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(FULL_INI.replace("number_inputs = 1", "number_inputs = 4"))
    (folder / "model.onnx").write_bytes(b"")
    (folder / "pipeline.json").write_text(pipeline_json(
        [(1, "T1-CE", None), (0, "T1-CE", None), (0, "T1-CE", "Tumor"), (1, "T1-w", None)], name))
    card = card_for_raidionics_folder(folder)
    order = ("postop_t1ce", "preop_t1ce", "preop_mask", "postop_t1")
    assert card.configuration == "D" and card.channels == CONFIGURATIONS["D"]
    assert card.details["channel_order"] == list(order) and card.details["channel_order_source"] == "pipeline.json"
    assert RM.network_channel_order(card) == (order, "pipeline.json")
    # a folder whose name the table does not know is accepted through its pipeline.json
    other = shutil.copytree(folder, tmp_path / "MRI_Tumor_Postop")
    (other / "pipeline.json").write_text(pipeline_json(
        [(1, "T1-CE", None), (0, "T1-CE", None), (0, "T1-CE", "Tumor"), (1, "T1-w", None)], "MRI_Tumor_Postop"))
    assert card_for_raidionics_folder(other).details["channel_order"] == list(order)


@pytest.mark.parametrize("inputs, match", [
    ([(1, "T1-CE", None), (1, "T2", None)], "none of the scans"),
    ([(1, "T1-w", None), (1, "T1-CE", None)], "start with the post-operative T1-CE"),
    ([(1, "T1-CE", None), (1, "T1-w", None), (1, "T1-w", None)], "name each scan once"),
    ([(1, "T1-CE", None), (1, "FLAIR", None)], "match no configuration"),
    ([(1, "T1-CE", None), (1, "T1-w", None), (1, "FLAIR", None)], "folder name MRI_GBM_Postop_FV_2p"),
])
def test_bad_pipeline_json_is_refused_with_the_reason(tmp_path, inputs, match):
    folder = tmp_path / "MRI_GBM_Postop_FV_2p"
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(FULL_INI.replace("number_inputs = 1", f"number_inputs = {len(inputs)}"))
    (folder / "model.onnx").write_bytes(b"")
    (folder / "pipeline.json").write_text(pipeline_json(inputs, folder.name))
    with pytest.raises(ModelError, match=match):
        card_for_raidionics_folder(folder)


def test_runtime_options():
    assert RM.runtime_options({}) == RM.PROJECT_RUNTIME == RM.RuntimeOptions(folds_ensembling=True)
    assert RM.runtime_options({}, default=RM.RuntimeOptions()).folds_ensembling is False
    given = RM.runtime_options({"runtime": {"ensembling_strategy": "maximum", "overlapping_ratio": 0.25,
                                            "reconstruction_order": "resample_second"}})
    assert given == RM.RuntimeOptions(True, "maximum", 0.25, "resample_second")
    for bad, match in [({"folds": 2}, "unknown runtime"), ({"ensembling_strategy": "median"}, "ensembling_strategy"),
                       ({"overlapping_ratio": 1.5}, "overlapping_ratio"), ({"reconstruction_order": "x"}, "order")]:
        with pytest.raises(ModelError, match=match):
            RM.runtime_options({"runtime": bad})


@pytest.mark.parametrize("name, ini, match", [
    ("MRI_GBM_Postop_FV_2p", FULL_INI, "number_inputs"),
    ("MRI_Brain", FULL_INI, "not one of the published"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("zeromean   #", "zscore   #"), "normalization_method"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("64, 56, 48", "64, 56, 48, 2"), "new_axial_size"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("= minimum", "= lungs_clip"), "background_cropping"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("imaging_modality = MRI", "imaging_modality = CT"), "MRI"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("new_axial_size = 64, 56, 48", ""), "patch_size"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("new_axial_size = 64, 56, 48", "new_axial_size = 64, 56"), "slab_size"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("0.3, 0.45", "0.3, 1.5"), r"not in \(0, 1\)"),
    ("MRI_GBM_Postop_FV_1p", FULL_INI.replace("number_inputs = 1", "number_inputs = 1\ndiffloader_pairs = 0, 1"),
     "diffloader_pairs"),
])
def test_bad_model_folders_are_refused_with_the_reason(tmp_path, name, ini, match):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(ini)
    (folder / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=match):
        card_for_raidionics_folder(folder)


def test_missing_onnx_and_missing_ini(tmp_path):
    folder = tmp_path / "MRI_GBM_Postop_FV_1p"
    folder.mkdir()
    with pytest.raises(ModelError, match="pre-processing"):
        card_for_raidionics_folder(folder)
    (folder / "pre_processing.ini").write_text(FULL_INI)
    with pytest.raises(ModelError, match="model.onnx"):
        card_for_raidionics_folder(folder)


def test_ini_defaults_and_thresholds(tmp_path):
    path = tmp_path / "pre_processing.ini"
    path.write_text("[Default]\nimaging_modality = MRI\n[PreProcessing]\nnew_axial_size = 8,8,8\n")
    config = RM.read_preprocessing_ini(path)
    assert (config.channels_order, config.normalization_method, config.background_cropping) == (
        "channels_last", None, None)
    assert config.intensity_clipping_range == (0.0, 100.0) and RM.class_threshold(config) is None
    assert config.intensity_clipping_values is None and config.diffloader_pairs == ()
    sigmoid = RM.RaidionicsConfig(nb_classes=1, activation_layer_type="sigmoid", optimal_thresholds=(0.6,))
    assert sigmoid.foreground_class == 0 and RM.class_threshold(sigmoid) == 0.6
    # raidionicsseg 1.5.2 crashes on background_cropping = false; here it is no cropping, as an absent key
    path.write_text(FULL_INI.replace("= minimum", "= false").replace("number_inputs = 1", "number_inputs = 3\n"
                    "intensity_clipping_values = -5, 700\ndiffloader_pairs = 0, 1; 2, 0\nswap_training_input = true"))
    config = RM.read_preprocessing_ini(path)
    assert config.background_cropping is None and config.intensity_clipping_values == (-5.0, 700.0)
    assert config.diffloader_pairs == ((0, 1), (2, 0)) and config.swap_training_input


def test_inputs_are_checked(tmp_path):
    folder = tmp_path / "MRI_GBM_Postop_FV_2p"
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(FULL_INI.replace("number_inputs = 1", "number_inputs = 2"))
    (folder / "model.onnx").write_bytes(b"")
    card = card_for_raidionics_folder(folder)
    a = write_nifti(tmp_path / "a.nii.gz", np.ones((8, 8, 8), np.float32), affine_for("RAS"))
    b = write_nifti(tmp_path / "b.nii.gz", np.ones((8, 8, 8), np.float32), affine_for("LPS"))
    with pytest.raises(ModelError, match="takes 2 channels"):
        R.predict_probability(card, [a])
    with pytest.raises(InputDataError, match="not on the grid"):
        R.predict_probability(card, [a, b])


# ------------------------------------------------------------------------------------------------
# the pure steps


def test_label_channels_are_decided_by_content():
    rng = np.random.default_rng(0)
    assert R.is_label_volume(np.array([0, 1, 2, 4] * 10, np.float32))  # a BraTS label map
    assert R.is_label_volume(np.arange(25, dtype=np.float32))
    assert not R.is_label_volume(np.arange(26, dtype=np.float32))  # more than 25 values
    assert not R.is_label_volume(np.array([0, 1, 300], np.float32))  # above 255
    assert not R.is_label_volume(np.array([0, 1, -2], np.float32))  # below -1
    assert not R.is_label_volume(rng.normal(100, 10, 1000))


@pytest.mark.parametrize("size, patch, offset, starts", [
    (100, 40, 10, [0, 30, 60]), (70, 40, 10, [0, 30]), (40, 40, 0, [0]), (30, 40, 10, [0]), (41, 40, 20, [0, 1]),
])
def test_patch_starts(size, patch, offset, starts):
    assert R.patch_starts(size, patch, offset) == starts


def test_intensity_steps():
    volume = np.array([-5.0, 0.0, 1.0, 2.0, 3.0, 100.0])
    assert R.clip_intensities(volume).min() == 0
    # percentiles of the volume with its negatives set to 0 (raidionicsseg's order)
    assert R.clip_intensities(volume, (0, 50)).max() == pytest.approx(np.percentile(np.maximum(volume, 0), 50))
    # values apply only with the full percentile range, where the input lies outside them (negatives included)
    assert list(R.clip_intensities(volume, (0, 100), (-1, 50))) == [-1, 0, 1, 2, 3, 50]
    assert list(R.clip_intensities(volume, (0, 90), (-1, 50))) == list(R.clip_intensities(volume, (0, 90)))
    z = R.normalize_intensities(volume, "zeromean")
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1, abs=1e-5)
    nz = R.normalize_intensities(np.array([0, 0, 1, 2, 3], np.float32), "zeromean_nonzero")
    assert list(nz[:2]) == [0, 0] and nz[2:].std(ddof=1) == pytest.approx(1)
    mm = R.normalize_intensities(volume, "default")
    assert (mm.min(), mm.max()) == (0, 1)
    assert list(R.normalize_intensities(np.full(4, 7.0), "zeromean")) == [7, 7, 7, 7]  # constant: left as is
    with pytest.raises(ValueError, match="normalization"):
        R.normalize_intensities(volume, "zscore")


def test_boxes():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:10, 6:12, 7:9] = 100
    volume[0, 0, 0] = 10  # below 20 % of the range: ignored by the 'minimum' box
    assert R.head_bbox(volume) == (5, 6, 7, 10, 12, 9)
    mask = np.zeros((20, 20, 20), bool)
    mask[2:12, 2:12, 2:12] = True
    mask[15:17, 15:17, 15:17] = True  # a smaller, separate component
    box, inside = R.brain_bbox(mask)
    assert box == (2, 2, 2, 12, 12, 12) and not inside[15:17, 15:17, 15:17].any()


def test_crop_comes_first_on_the_scans_own_grid():
    """The box is taken on the scan's voxel grid (anisotropic, oblique here), the label channel stays a label map,
    and the way back puts the block where it came from."""
    affine = affine_for("LAS", (0.9, 0.9, 5.5), oblique_deg=15)
    volume = np.zeros((60, 50, 12), np.float32)
    volume[10:40, 12:35, 3:9] = np.random.default_rng(1).normal(300, 30, (30, 23, 6))
    labels = np.zeros_like(volume)
    labels[20:30, 20:25, 5:7] = 1
    config = RM.RaidionicsConfig(output_spacing=(1.0, 1.0, 1.0), background_cropping="minimum",
                                 normalization_method="zeromean", new_axial_size=(16, 16, 16), number_inputs=2)
    prepared = R.preprocess([volume, labels], affine, config)
    assert prepared.box == (10, 12, 3, 40, 35, 9) and prepared.block_shape == (30, 23, 6)
    assert prepared.label_channels == (False, True) and prepared.data.shape == (16, 16, 16, 2)
    assert abs(prepared.data[..., 0].mean()) < 1e-5 and 0 <= prepared.data[..., 1].min() <= 1  # label as is
    back = R.to_reference_grid(np.ones((16, 16, 16), np.float32), prepared)
    assert back.shape == volume.shape and back[:10].max() == 0 and back[40:].max() == 0
    assert back[12:38, 14:33, 4:8].min() > 0.99  # well inside the box
    # a training label follows the same geometry: with no intensity steps it is the channel itself
    plain = dataclasses.replace(config, normalization_method=None, intensity_clipping_range=(0.0, 100.0))
    again = R.preprocess([volume, labels], affine, plain)
    np.testing.assert_array_equal(R.to_network_grid(volume, again, plain), again.data[..., 0])


def test_thresholding_on_the_network_grid_gives_a_mask():
    affine = affine_for("RAS", (1.0, 1.0, 2.0))
    volume = np.random.default_rng(2).normal(300, 30, (30, 30, 10)).astype(np.float32)
    config = RM.RaidionicsConfig(output_spacing=(1.0, 1.0, 1.0), new_axial_size=(16, 16, 16))
    prepared = R.preprocess([volume], affine, config)
    probabilities = np.zeros((16, 16, 16, 2), np.float32)
    probabilities[4:10, 5:11, 6:12, 1] = 0.7
    later = RM.RuntimeOptions(reconstruction_order="resample_second")
    second = R.reconstruct(probabilities, prepared, 1, runtime=later, threshold=0.5)
    first = R.reconstruct(probabilities, prepared, 1, runtime=RM.RuntimeOptions(), threshold=0.5)
    assert set(np.unique(second)) == {0.0, 1.0} and first.max() == pytest.approx(0.7)
    assert 0.8 < (second > 0).sum() / max(1, (first >= 0.35).sum()) < 1.25  # the same object, nearest neighbour


# ------------------------------------------------------------------------------------------------
# real scans: where raidionicsseg 1.5.2 crashes, and the fold rule


def test_single_output_and_top_level_model_give_the_deep_supervision_result(tmp_path):
    """raidionicsseg crashes on a full-volume TF model without deep supervision and on a folder without fold
    sub-folders; here both run the network's first output, as a deep-supervision model in fold sub-folders does."""
    scan = real_scan()
    reference = package(tmp_path / "ds" / "MRI_GBM_Postop_FV_1p", decoy=True)
    single = package(tmp_path / "single" / "MRI_GBM_Postop_FV_1p",
                     FULL_INI.replace("deep_supervision = true", "deep_supervision = false"), layout="top")
    p_ref = R.predict_probability(card_for_raidionics_folder(reference), [scan])
    p_single = R.predict_probability(card_for_raidionics_folder(single), [scan])
    assert 0.01 < (p_ref >= 0.45).mean() < 0.8
    np.testing.assert_array_equal(p_single, p_ref)


def test_no_cropping_written_false_is_no_cropping(tmp_path):
    scan = real_scan()
    absent = package(tmp_path / "absent" / "MRI_GBM_Postop_FV_1p", FULL_INI.replace(
        "background_cropping = minimum\n", ""))
    false = package(tmp_path / "false" / "MRI_GBM_Postop_FV_1p", FULL_INI.replace("= minimum", "= false"))
    np.testing.assert_array_equal(R.predict_probability(card_for_raidionics_folder(false), [scan]),
                                  R.predict_probability(card_for_raidionics_folder(absent), [scan]))


def test_slab_mode_without_activation_gives_probabilities_for_any_depth(tmp_path):
    """raidionicsseg 1.5.2 crashes when the resized depth is no multiple of slab_size, and leaves slab-mode logits
    without their activation; here the last slab is edge-padded and the softmax applied."""
    scan = real_scan()
    ini = FULL_INI.replace("new_axial_size = 64, 56, 48", "new_axial_size = 48, 40").replace(
        "training_backend = TF", "training_backend = Torch").replace(
        "[Training]", "[Training]\nslab_size = 7\nactivation_layer_included = false")
    folder = package(tmp_path / "MRI_GBM_Postop_FV_1p", ini, output="logits")
    config = RM.read_preprocessing_ini(folder)
    prepared = R.preprocess([nib.load(str(scan)).get_fdata(dtype=np.float32)], nib.load(str(scan)).affine, config)
    assert config.mode == "slab" and prepared.data.shape[2] % 7 != 0
    probability = R.predict_probability(card_for_raidionics_folder(folder), [scan])
    assert probability.shape == nib.load(str(scan)).shape and 0 <= probability.min() and probability.max() <= 1
    assert 0.01 < (probability >= 0.45).mean() < 0.8


def test_fold_rule(tmp_path):
    """Published folders run the first fold only (raidionicsseg's default); folds_ensembling averages or takes the
    maximum; --fast (max_folds=1) keeps the first."""
    scan = real_scan()
    both = package(tmp_path / "both" / "MRI_GBM_Postop_FV_1p", folds=(1.0, -0.6))
    first = package(tmp_path / "first" / "MRI_GBM_Postop_FV_1p", folds=(1.0,))
    second = package(tmp_path / "second" / "MRI_GBM_Postop_FV_1p", folds=(-0.6,))
    card = card_for_raidionics_folder(both)
    p_first = R.predict_probability(card_for_raidionics_folder(first), [scan])
    p_second = R.predict_probability(card_for_raidionics_folder(second), [scan])
    assert np.abs(p_first - p_second).max() > 0.5  # the folds really differ
    report: dict = {}
    np.testing.assert_array_equal(R.predict_probability(card, [scan], report=report), p_first)
    assert report["n_networks"] == 1 and report["folds_ensembling"] is False
    assert report["matches"] == "raidionicsseg 1.5.2"

    def with_runtime(**runtime):
        return dataclasses.replace(card, details={**card.details, "runtime": runtime})

    average = R.predict_probability(with_runtime(folds_ensembling=True), [scan])
    maximum = R.predict_probability(with_runtime(folds_ensembling=True, ensembling_strategy="maximum"), [scan])
    assert np.abs(average - (p_first + p_second) / 2).max() < 1e-5  # linear steps back: the average commutes
    assert maximum.max() <= 1 and (maximum >= np.maximum(p_first, p_second) - 1e-5).all()
    np.testing.assert_array_equal(R.predict_probability(with_runtime(folds_ensembling=True), [scan], max_folds=1),
                                  p_first)


def test_fold_members(tmp_path):
    """Several folds run (folds_ensembling): each fold's probability is a member, exactly what that fold gives alone,
    and the ensemble (average or maximum) is unchanged; one fold (the published default, or --fast) has none."""
    from bids_postop.segmentation.backend import predict

    scan = real_scan()
    both = package(tmp_path / "both" / "MRI_GBM_Postop_FV_1p", folds=(1.0, -0.6))
    first = package(tmp_path / "first" / "MRI_GBM_Postop_FV_1p", folds=(1.0,))
    second = package(tmp_path / "second" / "MRI_GBM_Postop_FV_1p", folds=(-0.6,))
    card = card_for_raidionics_folder(both)
    alone = [R.predict_probability(card_for_raidionics_folder(f), [scan]) for f in (first, second)]
    for strategy in ("average", "maximum"):
        ensemble = dataclasses.replace(card, details={**card.details, "runtime": {
            "folds_ensembling": True, "ensembling_strategy": strategy}})
        kept = predict(ensemble, [scan], keep_members=True)
        np.testing.assert_array_equal(kept.probability, R.predict_probability(ensemble, [scan]), err_msg=strategy)
        assert kept.members.kind == "folds" and kept.members.names == ("fold0", "fold1")
        for member, expected in zip(kept.members, alone, strict=True):  # on the crop box, 0 outside it
            assert kept.members.box is not None and member.shape != expected.shape
            np.testing.assert_array_equal(kept.members.paste(member, expected.shape), expected)
        fast = predict(ensemble, [scan], keep_members=True, first_fold_only=True)
        assert fast.members.kind == "none" and len(fast.members) == 0
    assert predict(card, [scan], keep_members=True).members.kind == "none"  # published default: first fold only


def test_extract_brain_raidionics_writes_a_mask_on_the_input_grid(tmp_path):
    scan = real_scan()
    folder = tmp_path / "MRI_Brain"
    # "brain" = min-max normalised intensity above 0.25 (no position dependence)
    package(folder, FULL_INI.replace("zeromean   #", "default   #").replace("optimal_thresholds = 0.3, 0.45",
            "optimal_thresholds = 0.5").replace("classes = background, tumor", "classes = background, Brain"),
            ramp=(0, 0, 0), centre=0.25, gain=40.0)
    out = extract_brain_raidionics(scan, model_folder=folder, out_mask=tmp_path / "out" / "mask.nii.gz")
    mask_img, img = nib.load(str(out)), nib.load(str(scan))
    data = np.asanyarray(mask_img.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    assert mask_img.shape == img.shape and np.array_equal(mask_img.affine, img.affine)
    assert ndi.label(data)[1] == 1
    assert 0.05 < data.mean() < 0.9


# ------------------------------------------------------------------------------------------------
# what the participant workflow feeds a Raidionics model


@pytest.mark.parametrize("published", [True, False])
def test_published_models_get_the_registered_scans_own_models_the_skull_stripped_ones(tmp_path, published):
    """A published Raidionics folder is fed the registered scans before skull stripping (the official pipeline's
    inputs; its ini crops with the brain mask), a model trained here (card without input_images) the skull-stripped
    channels it was trained on; the brain mask always reaches the segmentation node."""
    from conftest import make_bids

    from bids_postop.bids.inputs import discover
    from bids_postop.segmentation.models import resolve
    from bids_postop.workflows.base import init_participant_wf

    files = {f"ses-postop/anat/sub-01_ses-postop_{s}.nii.gz": None for s in ("ce-gadolinium_T1w", "T1w", "FLAIR")}
    files["ses-preop/anat/sub-01_ses-preop_ce-gadolinium_T1w.nii.gz"] = None
    root = make_bids(tmp_path / "bids", {"01": files}, preop_masks={"01": "preop"})
    [inputs] = discover(root, derivatives={"preop": root / "derivatives" / "preop"}, validate=False)
    folder = tmp_path / "MRI_GBM_Postop_FV_5p"
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(FULL_INI.replace("number_inputs = 1", "number_inputs = 5"))
    (folder / "model.onnx").write_bytes(b"")
    if not published:
        (folder / "bids_postop_model.json").write_text(json.dumps({
            "name": "ours-E", "architecture": "raidionics", "configuration": "E",
            "channels": list(CONFIGURATIONS["E"]), "threshold": 0.4, "raidionics": {"model_folder": "."}}))
    [model] = resolve(folder)
    wf = init_participant_wf(inputs=inputs, model=model, output_dir=tmp_path / "out", bids_dir=root)
    graph = wf._create_flat_graph()
    fed = {dest: (src.fullname.split(".", 1)[1], field) for src, dst, data in graph.in_edges(data=True)
           if dst.name == "segment" for field, dest in data["connect"]}
    out = "channels_wf.outputnode"  # channels_wf's contract: <role> skull-stripped, <role>_registered before that
    if published:
        assert fed["postop_t1ce"] == ("inputnode", "postop_t1ce")  # the scan itself: the grid everything is on
        for role in ("postop_t1", "postop_flair", "preop_t1ce"):
            assert fed[role] == (out, f"{role}_registered"), fed[role]
    else:
        for role in ("postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce"):
            assert fed[role] == (out, role), fed[role]
    assert fed["preop_mask"] == (out, "preop_mask") and fed["brain_mask"] == (out, "brain_mask")
