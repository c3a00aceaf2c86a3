"""The nnU-Net backend's input conventions against nnU-Net's own image readers (issue 15): for every reader a
model may name, the arrays and spacing the backend feeds nnU-Net equal the reader's ``read_images`` exactly, and
a prediction is mapped back to the file's grid as the reader's ``write_seg`` does. Which convention a model
gets: card field, card default (RAS), bare folder (plans.json, as nnU-Net's PlansManager reads it)."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
from conftest import affine_for

from bids_postop.core.images import to_ras
from bids_postop.errors import ModelError
from bids_postop.segmentation import nnunet as N
from bids_postop.segmentation.models import CARD_NAME, resolve_models


def _reader_class(name):
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    return recursive_find_reader_writer_by_name(name)


def _pixdim_mismatch(shape):
    """An oblique LAS grid whose sform (code 2) and pixdim/qform (code 1, 2 mm isotropic) disagree."""
    aff = affine_for("LAS", (0.9, 1.1, 2.5), oblique_deg=20)
    img = nib.Nifti1Image(np.zeros(shape, np.float32), aff)
    img.set_qform(np.diag([-2.0, 2.0, 2.0, 1.0]), code=1)
    img.set_sform(aff, code=2)
    return img


GEOMETRIES = {
    "RAS": lambda s: nib.Nifti1Image(np.zeros(s, np.float32), affine_for("RAS", (1.0, 1.2, 3.0))),
    "LPS": lambda s: nib.Nifti1Image(np.zeros(s, np.float32), affine_for("LPS", (0.9, 0.9, 5.5))),
    "PLI": lambda s: nib.Nifti1Image(np.zeros(s, np.float32), affine_for("PLI", (1.0, 2.0, 3.0))),
    "LPS oblique": lambda s: nib.Nifti1Image(np.zeros(s, np.float32),
                                             affine_for("LPS", (0.9, 1.1, 2.5), oblique_deg=20)),
    "RAS oblique": lambda s: nib.Nifti1Image(np.zeros(s, np.float32),
                                             affine_for("RAS", (1.0, 1.2, 3.0), oblique_deg=15)),
    "LAS sform≠qform": _pixdim_mismatch,
}


def _write(tmp_path, name, geometry, seed):
    shape = (9, 7, 5)
    template = GEOMETRIES[geometry](shape)
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    img = nib.Nifti1Image(data, template.affine, template.header)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(img, path)
    return path


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("reader", N.READERS)
def test_arrays_and_spacing_equal_the_readers_own(tmp_path, reader, geometry):
    files = [_write(tmp_path, "c0", geometry, 0), _write(tmp_path, "c1", geometry, 1)]
    expected, properties = _reader_class(reader)().read_images([str(f) for f in files])
    arrays, view = N.reader_arrays(reader, files)
    ours = np.stack(arrays)
    assert ours.dtype == expected.dtype == np.float32
    assert ours.shape == expected.shape, (reader, geometry)
    np.testing.assert_array_equal(ours, expected)
    assert list(view.spacing) == [float(v) for v in properties["spacing"]], (reader, geometry)

    # back to the file's grid exactly as the reader's own export writes a segmentation there
    labels = (expected[0] > 100).astype(np.uint8)
    out = tmp_path / "seg.nii.gz"
    _reader_class(reader)().write_seg(labels, str(out), properties)
    written = nib.load(out)
    reference = nib.load(files[0])
    assert written.shape == reference.shape
    if "sform≠qform" not in geometry:  # there SimpleITK places its output by the qform (it distrusts the sform)
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-3)
    np.testing.assert_array_equal(view.to_stored(labels), np.asanyarray(written.dataobj))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_ras_convention_is_the_historic_one(tmp_path, geometry):
    """RAS: the arrays bids_postop always fed (to_ras, spacing from the affine); round trip exact."""
    from bids_postop.core.images import ras_voxel_sizes

    path = _write(tmp_path, "c0", geometry, 0)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    [array], view = N.reader_arrays(N.RAS, [path])
    np.testing.assert_array_equal(array, to_ras(data, img.affine).transpose(2, 1, 0))
    assert view.spacing == tuple(ras_voxel_sizes(img.affine)[::-1])
    np.testing.assert_array_equal(view.to_stored(np.asarray(array)), data)


def _bare_model(folder, *, planned=None, overwrite=None):
    folder.mkdir(parents=True)
    plans = {"plans_name": "nnUNetPlans", "configurations": {}}
    if planned:
        plans["image_reader_writer"] = planned
    dataset = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumor": 1}, "file_ending": ".nii.gz"}
    if overwrite:
        dataset["overwrite_image_reader_writer"] = overwrite
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def test_which_convention_a_model_gets(tmp_path, caplog):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # bare nnU-Net folders: the reader nnUNetv2_predict instantiates (PlansManager.image_reader_writer_class)
    cases = {"planned": ("NibabelIOWithReorient", None), "conflict": ("SimpleITKIO", "NibabelIO"),
             "dataset only": (None, "NibabelIO"), "none": (None, None)}
    expected = {"planned": ("NibabelIOWithReorient", "plans.json"), "conflict": ("SimpleITKIO", "plans.json"),
                "dataset only": ("NibabelIO", "dataset.json"), "none": ("SimpleITKIO", "nnU-Net default")}
    for name, (planned, overwrite) in cases.items():
        folder = _bare_model(tmp_path / name.replace(" ", "_"), planned=planned, overwrite=overwrite)
        [card] = resolve_models(folder)
        with caplog.at_level(logging.WARNING, logger="bids_postop"):
            assert N.input_convention(card) == expected[name], name
        if planned:
            plans = json.loads((folder / "plans.json").read_text())
            assert N.reader_convention(card) == PlansManager(plans).image_reader_writer_class.__name__
    assert "nnUNetv2_predict uses plans.json's" in caplog.text

    # bids_postop cards: the field, else RAS (cards written before the field); "nnUNetv2_predict" follows the folder
    model = tmp_path / "carded"
    _bare_model(model / "nnunet", planned="SimpleITKIO")
    card = {"architecture": "nnunet", "configuration": "A", "channels": ["postop_t1ce"], "threshold": 0.5,
            "nnunet": {"trained_model_folder": "nnunet"}}
    for value, want in [(None, (N.RAS, f"{CARD_NAME} (default)")), ("RAS", (N.RAS, CARD_NAME)),
                        ("NibabelIO", ("NibabelIO", CARD_NAME)), ("nnUNetv2_predict", ("SimpleITKIO", "plans.json"))]:
        card["nnunet"] = {"trained_model_folder": "nnunet", **({N.CONVENTION_KEY: value} if value else {})}
        (model / CARD_NAME).write_text(json.dumps(card))
        [read] = resolve_models(model)
        assert N.input_convention(read) == want, value
    card["nnunet"][N.CONVENTION_KEY] = "Tiff3DIO"
    (model / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="Tiff3DIO.*not supported"):
        N.reader_convention(resolve_models(model)[0])


def test_shipped_demo_cards_state_ras():
    for card in resolve_models("demo"):
        assert card.details.get(N.CONVENTION_KEY) == N.RAS, card.folder
        assert N.input_convention(card) == (N.RAS, CARD_NAME)
