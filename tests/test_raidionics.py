"""Raidionics backend: tiny ONNX networks exported from torch, run on a real anisotropic oblique LAS scan
and compared with a straightforward reimplementation (numpy/scipy/skimage + onnxruntime) written here."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL, affine_for, write_nifti
from scipy import ndimage as ndi

from bids_postop.configurations import CONFIGURATIONS
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation import raidionics as R
from bids_postop.segmentation import raidionics_model as RM
from bids_postop.segmentation.raidionics_brain import extract_brain_raidionics
from bids_postop.segmentation.raidionics_model import card_for_raidionics_folder

T1C = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1c.nii.gz"
T1 = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1.nii.gz"  # same header as the t1c
BRAIN = REAL / "tcga-fg-6692" / "native" / "TCGA-FG-6692_t1c_brainmask_hdbet.nii.gz"

needs_real = pytest.mark.skipif(not T1C.is_file(), reason=f"real data not found at {REAL}")


# ------------------------------------------------------------------------------------------------
# tiny models in the Raidionics layout


def _net(n_in: int, *, channels_first: bool, softmax: bool, seed: int):
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv3d(n_in, 4, 3, padding=1)
            self.c2 = torch.nn.Conv3d(4, 2, 3, padding=1)

        def forward(self, x):
            if not channels_first:  # Raidionics' TF models: (B, X, Y, Z, C)
                x = x.permute(0, 4, 1, 2, 3)
            y = self.c2(torch.relu(self.c1(x)))
            if softmax:
                y = torch.softmax(y, dim=1)
            return y if channels_first else y.permute(0, 2, 3, 4, 1)

    torch.manual_seed(seed)
    return Net().eval()


def export(net, path: Path, n_in: int, *, channels_first: bool) -> Path:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (1, n_in, 16, 16, 8) if channels_first else (1, 16, 16, 8, n_in)
    axes = {2: "x", 3: "y", 4: "z"} if channels_first else {1: "x", 2: "y", 3: "z"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
        torch.onnx.export(net, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": axes, "output": axes}, dynamo=False)
    return path


def make_model(folder: Path, ini: str, *, n_in: int = 1, channels_first: bool = False, softmax: bool = True,
               seeds: tuple[int, ...] = (0,), folds: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pre_processing.ini").write_text(ini)
    for i, seed in enumerate(seeds):
        target = folder / f"fold{i}" / "model.onnx" if folds else folder / "model.onnx"
        export(_net(n_in, channels_first=channels_first, softmax=softmax, seed=seed), target, n_in,
               channels_first=channels_first)
    return folder


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
"""


# ------------------------------------------------------------------------------------------------
# an independent, straightforward implementation of the same pipeline


def ref_resample(data, affine, spacing, order):
    shape = data.shape
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in shape])), float)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(0), world.max(0)
    out_shape = tuple(int(v) for v in np.ceil((high - low) / spacing) + 1)
    out_affine = np.diag([*spacing, 1.0])
    out_affine[:3, 3] = low
    m = np.linalg.inv(affine) @ out_affine
    out = ndi.affine_transform(data.astype(np.float64), m[:3, :3], m[:3, 3], out_shape, order=order,
                               mode="constant", cval=0.0)
    return out, out_affine


def ref_box(mask):
    idx = np.argwhere(mask)
    return tuple(idx.min(0)), tuple(idx.max(0) + 1)


def ref_pipeline(files, *, spacing, new_size, crop, clip, norm, onnx_files, channels_first=False, mask=None,
                 activation=None, patch=None, slab=None):
    import onnxruntime as ort

    resize = pytest.importorskip("skimage.transform").resize
    imgs = [nib.load(str(f)) for f in files]
    affine, shape = imgs[0].affine, imgs[0].shape
    spacing = np.asarray(spacing, float)
    vols = []
    for img in imgs:
        out, grid_affine = ref_resample(img.get_fdata(), affine, spacing, 1)
        vols.append(out)
    grid_shape = vols[0].shape
    if crop == "minimum":
        limit = int((vols[0].max() - vols[0].min()) * 0.2)
        lo, hi = ref_box(vols[0] >= limit)
    else:
        m, _ = ref_resample(nib.load(str(mask)).get_fdata(), affine, spacing, 0)
        lab, n = ndi.label(m > 0.5)
        biggest = lab == (np.argmax([(lab == i).sum() for i in range(1, n + 1)]) + 1)
        lo, hi = ref_box(biggest)
        if crop == "brain_mask":
            keep = np.zeros(m.shape, bool)
            keep[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
            vols = [np.where((m > 0.5) & keep, v, 0) for v in vols]
    chans = []
    for v in vols:
        c = v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        crop_shape = c.shape
        if new_size is not None:
            target = new_size if len(new_size) == 3 else (*new_size, int(c.shape[2] * new_size[1] / c.shape[1]))
            c = resize(c, target, order=1)
        c = np.maximum(c, 0)
        if clip != (0, 100):
            c = np.clip(c, *np.percentile(c, clip))
        if norm == "zeromean":
            c = (c - c.mean()) / c.std()
        elif norm == "zeromean_nonzero":
            nz = c != 0
            c[nz] = (c[nz] - c[nz].mean()) / c[nz].std(ddof=1)
        elif norm == "default":
            c = (c - c.min()) / (c.max() - c.min())
        chans.append(c)
    x = np.stack(chans, -1)[None].astype(np.float32)

    def run(session, block):
        inp = np.transpose(block, (0, 4, 1, 2, 3)) if channels_first else block
        out = session.run(None, {"input": np.ascontiguousarray(inp)})[0]
        return np.transpose(out, (0, 2, 3, 4, 1))[0] if channels_first else out[0]

    probs = []
    for f in onnx_files:
        session = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        if patch is not None:  # Raidionics' loop, written as in its source
            size, offset = patch
            result = np.full(x.shape[1:4] + (2,), -np.inf, np.float32)
            for i, j, k in itertools.product(*[range(int(np.ceil(x.shape[a + 1] / (size[a] - offset[a]))))
                                               for a in range(3)]):
                bounds = []
                for a, n in enumerate((i, j, k)):
                    b0 = n * (size[a] - offset[a])
                    b1 = b0 + size[a]
                    if b1 >= x.shape[a + 1]:
                        b0, b1 = b0 - (b1 - x.shape[a + 1]), x.shape[a + 1]
                    bounds.append(slice(b0, b1))
                result[tuple(bounds)] = np.maximum(result[tuple(bounds)], run(session, x[(0, *bounds)][None]))
            out = result
        elif slab is not None:
            parts = []
            for start in range(0, x.shape[3], slab):
                block = x[:, :, :, start:start + slab]
                if block.shape[3] < slab:
                    block = np.concatenate([block] + [block[:, :, :, -1:]] * (slab - block.shape[3]), axis=3)
                parts.append(run(session, block))
            out = np.concatenate(parts, axis=2)[:, :, :x.shape[3]]
        else:
            out = run(session, x)
        if activation == "softmax":
            out = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
        probs.append(out)
    fg = np.mean(probs, axis=0)[..., 1]
    back = ndi.zoom(fg, np.divide(crop_shape, fg.shape), order=1, mode="nearest", grid_mode=True)
    full = np.zeros(grid_shape)
    full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = back
    m = np.linalg.inv(grid_affine) @ affine
    return ndi.affine_transform(full, m[:3, :3], m[:3, 3], shape, order=1, mode="constant", cval=0.0)


# ------------------------------------------------------------------------------------------------
# end to end on a real scan


@needs_real
def test_full_volume_channels_last_matches_reference(tmp_path):
    folder = make_model(tmp_path / "MRI_GBM_Postop_FV_1p", FULL_INI)
    card = card_for_raidionics_folder(folder)
    prob = R.predict_probability(card, [T1C])
    img = nib.load(str(T1C))
    assert prob.shape == img.shape and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1 and prob.max() > 0.1
    expected = ref_pipeline([T1C], spacing=(1, 1, 1), new_size=(64, 56, 48), crop="minimum", clip=(0, 99.5),
                            norm="zeromean", onnx_files=[folder / "model.onnx"])
    assert np.abs(prob - expected).max() < 1e-4


@needs_real
def test_two_channels_first_brain_mask_matches_reference(tmp_path):
    ini = FULL_INI.replace("background_cropping = minimum", "background_cropping = brain_mask").replace(
        "zeromean   #", "zeromean_nonzero   #").replace("number_inputs = 1", "number_inputs = 2").replace(
        "[PreProcessing]", "[PreProcessing]\nchannels_order = channels_first").replace(
        "1.0, 1.0, 1.0", "1.5, 1.5, 2.0")
    folder = make_model(tmp_path / "MRI_GBM_Postop_FV_2p", ini, n_in=2, channels_first=True)
    card = card_for_raidionics_folder(folder)
    assert card.configuration == "B"
    with pytest.raises(ModelError, match="brain_mask"):
        R.predict_probability(card, [T1C, T1])
    prob = R.predict_probability(card, [T1C, T1], brain_mask=BRAIN)
    expected = ref_pipeline([T1C, T1], spacing=(1.5, 1.5, 2.0), new_size=(64, 56, 48), crop="brain_mask",
                            clip=(0, 99.5), norm="zeromean_nonzero", onnx_files=[folder / "model.onnx"],
                            channels_first=True, mask=BRAIN)
    assert prob.shape == nib.load(str(T1C)).shape
    assert np.abs(prob - expected).max() < 1e-4
    # outside the brain box the probability is 0
    assert prob[nib.load(str(BRAIN)).get_fdata() == 0].min() == 0


@needs_real
def test_patch_mode_torch_logits_matches_reference(tmp_path):
    ini = """[Default]
imaging_modality = MRI
training_backend = Torch
[PreProcessing]
output_spacing = 2.0, 2.0, 2.0
background_cropping = minimum
normalization_method = default
channels_order = channels_first
number_inputs = 1
[Training]
nb_classes = 2
patch_size = 48, 40, 32
patch_offset = 16, 8, 8
activation_layer_included = false
activation_layer_type = softmax
optimal_thresholds = 0.4
"""
    folder = make_model(tmp_path / "MRI_GBM_Postop_FV_1p", ini, channels_first=True, softmax=False)
    config = RM.read_preprocessing_ini(folder)
    assert config.mode == "patch" and RM.class_threshold(config) == 0.4
    prob = R.predict_probability(card_for_raidionics_folder(folder), [T1C])
    expected = ref_pipeline([T1C], spacing=(2, 2, 2), new_size=None, crop="minimum", clip=(0, 100), norm="default",
                            onnx_files=[folder / "model.onnx"], channels_first=True, activation="softmax",
                            patch=((48, 40, 32), (16, 8, 8)))
    assert np.abs(prob - expected).max() < 1e-4


@needs_real
def test_slab_mode_matches_reference(tmp_path):
    ini = FULL_INI.replace("new_axial_size = 64, 56, 48", "new_axial_size = 48, 40").replace(
        "[Training]", "[Training]\nslab_size = 8")
    folder = make_model(tmp_path / "MRI_GBM_Postop_FV_1p", ini)
    assert RM.read_preprocessing_ini(folder).mode == "slab"
    prob = R.predict_probability(card_for_raidionics_folder(folder), [T1C])
    expected = ref_pipeline([T1C], spacing=(1, 1, 1), new_size=(48, 40), crop="minimum", clip=(0, 99.5),
                            norm="zeromean", onnx_files=[folder / "model.onnx"], slab=8)
    assert np.abs(prob - expected).max() < 1e-4


@needs_real
def test_folds_are_averaged(tmp_path):
    both = make_model(tmp_path / "both" / "MRI_GBM_Postop_FV_1p", FULL_INI, seeds=(1, 2), folds=True)
    assert [p.parent.name for p in RM.model_files(both)] == ["fold0", "fold1"]
    single = [make_model(tmp_path / f"s{s}" / "MRI_GBM_Postop_FV_1p", FULL_INI, seeds=(s,)) for s in (1, 2)]
    p_both = R.predict_probability(card_for_raidionics_folder(both), [T1C])
    p_each = [R.predict_probability(card_for_raidionics_folder(f), [T1C]) for f in single]
    assert np.abs(p_each[0] - p_each[1]).max() > 1e-3  # the folds really differ
    assert np.abs(p_both - (p_each[0] + p_each[1]) / 2).max() < 1e-5


@needs_real
def test_extract_brain_raidionics_writes_a_mask_on_the_input_grid(tmp_path):
    pytest.importorskip("onnx")
    import torch

    class Bright(torch.nn.Module):  # "brain" = min-max normalised intensity above 0.25
        def forward(self, x):
            return torch.softmax(torch.cat([torch.zeros_like(x), 40 * (x - 0.25)], dim=-1), dim=-1)

    folder = tmp_path / "MRI_Brain"
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(FULL_INI.replace("zeromean   #", "default   #").replace(
        "optimal_thresholds = 0.3, 0.45", "optimal_thresholds = 0.5").replace("classes = background, tumor",
                                                                             "classes = background, Brain"))
    export(Bright(), folder / "model.onnx", 1, channels_first=False)
    out = extract_brain_raidionics(T1C, model_folder=folder, out_mask=tmp_path / "out" / "mask.nii.gz")
    mask_img, img = nib.load(str(out)), nib.load(str(T1C))
    data = np.asanyarray(mask_img.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    assert mask_img.shape == img.shape and np.array_equal(mask_img.affine, img.affine)
    assert ndi.label(data)[1] == 1
    assert 0.05 < data.mean() < 0.9


# ------------------------------------------------------------------------------------------------
# configuration, cards and errors


@pytest.mark.parametrize("n, config", [(1, "A"), (2, "B"), (3, "C"), (4, "D"), (5, "E")])
def test_card_maps_postop_models_to_configurations(tmp_path, n, config):
    ini = FULL_INI.replace("number_inputs = 1", f"number_inputs = {n}")
    folder = tmp_path / f"MRI_GBM_Postop_FV_{n}p"
    folder.mkdir()
    (folder / "pre_processing.ini").write_text(ini)
    (folder / "model.onnx").write_bytes(b"")  # never loaded here
    card = card_for_raidionics_folder(folder)
    assert (card.configuration, card.channels, card.architecture) == (config, CONFIGURATIONS[config], "raidionics")
    assert card.threshold == 0.45  # the tumour class of "0.3, 0.45"


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
    sigmoid = RM.RaidionicsConfig(nb_classes=1, activation_layer_type="sigmoid", optimal_thresholds=(0.6,))
    assert sigmoid.foreground_class == 0 and RM.class_threshold(sigmoid) == 0.6


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


@pytest.mark.parametrize("shape, target", [((40, 30, 20), (16, 16, 16)), ((10, 12, 7), (20, 9, 14)),
                                           ((33, 21, 17), (33, 21, 17))])
def test_resize_volume_is_skimage_resize(shape, target):
    resize = pytest.importorskip("skimage.transform").resize
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(R.resize_volume(volume, target), resize(volume, target, order=1), atol=1e-5)


@pytest.mark.parametrize("size, patch, offset, starts", [
    (100, 40, 10, [0, 30, 60]), (70, 40, 10, [0, 30]), (40, 40, 0, [0]), (30, 40, 10, [0]), (41, 40, 20, [0, 1]),
])
def test_patch_starts(size, patch, offset, starts):
    assert R.patch_starts(size, patch, offset) == starts


def test_intensity_steps():
    volume = np.array([-5.0, 0.0, 1.0, 2.0, 3.0, 100.0], np.float32)
    assert R.clip_intensities(volume).min() == 0
    assert R.clip_intensities(volume, (0, 50)).max() == pytest.approx(np.percentile(volume, 50))
    z = R.normalize_intensities(volume, "zeromean")
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1, abs=1e-5)
    nz = R.normalize_intensities(np.array([0, 0, 1, 2, 3], np.float32), "zeromean_nonzero")
    assert list(nz[:2]) == [0, 0] and nz[2:].std(ddof=1) == pytest.approx(1)
    mm = R.normalize_intensities(volume, "default")
    assert (mm.min(), mm.max()) == (0, 1)
    with pytest.raises(ValueError, match="normalization"):
        R.normalize_intensities(volume, "zscore")


def test_boxes_and_label_channels():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:10, 6:12, 7:9] = 100
    volume[0, 0, 0] = 10  # below 20 % of the range: ignored by the 'minimum' box
    assert R.head_bbox(volume) == (5, 6, 7, 10, 12, 9)
    mask = np.zeros((20, 20, 20), bool)
    mask[2:12, 2:12, 2:12] = True
    mask[15:17, 15:17, 15:17] = True  # a smaller, separate component
    box, inside = R.brain_bbox(mask)
    assert box == (2, 2, 2, 12, 12, 12) and not inside[15:17, 15:17, 15:17].any()
    config = RM.RaidionicsConfig(output_spacing=(1.0, 1.0, 1.0), new_axial_size=(8, 8, 8),
                                normalization_method="zeromean", number_inputs=2)
    labels = (volume > 50).astype(np.float32)
    prepared = R.preprocess([volume + 1, labels], np.eye(4), config, label_channels=[False, True])
    assert prepared.data.shape == (8, 8, 8, 2)
    assert abs(prepared.data[..., 0].mean()) < 1e-5  # normalised
    assert prepared.data[..., 1].min() >= 0 and prepared.data[..., 1].max() <= 1  # label map left as is
    back = R.to_reference_grid(np.ones((8, 8, 8), np.float32), prepared)
    assert back.shape == (20, 20, 20) and back.max() == 1
