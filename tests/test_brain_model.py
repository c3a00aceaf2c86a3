"""``--brain-model`` (issue 3): a Raidionics brain model (ONNX, onnxruntime) as the brain extractor, through the
CLI; and the errors when the model is missing or the options conflict."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_bids
from raidionics_onnx import make_onnx
from scipy import ndimage as ndi

from bids_postop.cli.run import main, settings_from_args
from bids_postop.errors import EXIT_OK, EXIT_USAGE

SHAPE = (40, 40, 32)
THRESHOLD = 200.0  # the tiny model's "brain": raw intensity above this (the blob of conftest.blob_image)

# patch-wise (no new_axial_size), 1 mm like the test images, no cropping, no normalisation: the network sees
# the raw intensities on the image's own grid, so its output can be recomputed here without bids_postop
BRAIN_INI = """[Default]
imaging_modality = MRI
training_backend = TF
task = segmentation
[PreProcessing]
output_spacing = 1.0, 1.0, 1.0
normalization_method = none
number_inputs = 1
[Training]
nb_classes = 2
classes = background, Brain
patch_size = 16, 16, 16
optimal_thresholds = 0.5
"""


def make_brain_model(folder: Path) -> Path:
    """A Raidionics-layout folder whose model.onnx is a real (tiny) closed-form ONNX network: the logit
    0.1 × (intensity − THRESHOLD) for every voxel, then a softmax over (0, logit), channels last as Raidionics'
    TensorFlow models."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pre_processing.ini").write_text(BRAIN_INI)
    # logit = gain × (w × x × 1 − centre) = 0.1 × (x − THRESHOLD): no position dependence (ramp 0)
    make_onnx(folder / "model.onnx", 1, weights=(0.1,), ramp=(0.0, 0.0, 0.0), centre=0.1 * THRESHOLD, gain=1.0)
    return folder


def model_mask(model_onnx: Path, image: Path) -> np.ndarray:
    """What the network computes on the whole image (onnxruntime directly), thresholded, largest component."""
    import onnxruntime as ort

    data = nib.load(image).get_fdata(dtype=np.float32)
    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    probability = session.run(None, {"input": data[None, ..., None]})[0][0, ..., 1]
    labels, count = ndi.label(probability >= 0.5)
    assert count >= 1
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


@pytest.mark.slow
def test_brain_model_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("BIDS_POSTOP_HOME", str(tmp_path / "empty_cache"))
    bids = make_bids(tmp_path / "bids", {"01": {"ses-postop/anat/sub-01_ses-postop_ce-gadolinium_T1w.nii.gz": None}},
                     shape=SHAPE)
    model = make_brain_model(tmp_path / "models" / "MRI_Brain")
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--model", "demo", "--brain-model", str(model),
                 "-w", str(tmp_path / "work"), "--nprocs", "1", "--device", "cpu", "--skip-bids-validation"])
    assert code == EXIT_OK
    t1ce = bids / "sub-01" / "ses-postop" / "anat" / "sub-01_ses-postop_ce-gadolinium_T1w.nii.gz"
    anat = out / "sub-01" / "ses-postop" / "anat"
    written = nib.load(anat / "sub-01_ses-postop_ce-gadolinium_desc-brain_mask.nii.gz")
    expected = model_mask(model / "model.onnx", t1ce)
    assert written.shape == SHAPE and np.array_equal(written.affine, nib.load(t1ce).affine)
    assert 50 < expected.sum() < expected.size / 2
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected.astype(np.uint8))

    # provenance: brain mask sidecar, measures JSON, methods paragraph
    sidecar = json.loads((anat / "sub-01_ses-postop_ce-gadolinium_desc-brain_mask.json").read_text())
    assert sidecar["BrainExtraction"]["method"] == "raidionics"
    assert sidecar["BrainExtraction"]["model"] == "MRI_Brain" and sidecar["BrainExtraction"]["onnx_md5"]
    measures = json.loads((out / "sub-01" / "ses-postop" / "sub-01_ses-postop_desc-demoA_measures.json").read_text())
    assert measures["provenance"]["brain_extraction"]["folder"] == str(model.resolve())
    assert "raidionics" in (out / "sub-01.html").read_text()  # the report's provenance section
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "Raidionics brain model MRI_Brain" in citation and "Bouget D" in citation


@pytest.mark.parametrize("argv, method, model", [
    ([], "deepbet", None),
    (["--brain-method", "hdbet"], "hdbet", None),
    (["--brain-method", "raidionics"], "raidionics", "MRI_Brain"),
    (["--brain-model", "MyBrain"], "raidionics", "MyBrain"),
    (["--brain-method", "raidionics", "--brain-model", "/m/b"], "raidionics", "/m/b"),
])
def test_brain_options_give_the_settings(argv, method, model):
    settings = settings_from_args(["/bids", "/out", "participant", *argv])
    assert (settings.brain_method, settings.brain_model) == (method, model)


def test_brain_model_with_another_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        settings_from_args(["/bids", "/out", "participant", "--brain-method", "deepbet", "--brain-model", "MRI_Brain"])
    assert exc.value.code == EXIT_USAGE
    assert "--brain-method raidionics" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["MRI_Brain", "missing/folder"])
def test_missing_brain_model_names_the_fetch_command(tmp_path, monkeypatch, spec):
    monkeypatch.setenv("BIDS_POSTOP_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)
    bids = make_bids(tmp_path / "bids", {"01": {"ses-postop/anat/sub-01_ses-postop_ce-gadolinium_T1w.nii.gz": None}})
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--model", "demo", "--brain-model", spec, "-w",
                 str(tmp_path / "work"),
                 "--skip-bids-validation"])
    assert code == EXIT_USAGE
    log = next((out / "logs").glob("*.log")).read_text()
    assert "bids_postop-models fetch MRI_Brain" in log
    assert not (out / "sub-01").exists(), "nothing runs when the brain model is missing"


def test_resolve_brain_model_checks_the_folder(tmp_path):
    from bids_postop.errors import ModelError
    from bids_postop.segmentation.raidionics_brain import resolve_brain_model

    folder = tmp_path / "Brain2"
    folder.mkdir()
    with pytest.raises(ModelError, match="no pre_processing.ini.*bids_postop-models fetch MRI_Brain"):
        resolve_brain_model(folder)
    (folder / "pre_processing.ini").write_text(BRAIN_INI.replace("number_inputs = 1", "number_inputs = 2"))
    with pytest.raises(ModelError, match="one input"):
        resolve_brain_model(folder)
    (folder / "pre_processing.ini").write_text(BRAIN_INI)
    with pytest.raises(ModelError, match="no model.onnx"):
        resolve_brain_model(folder)


def test_training_preparation_and_participant_workflow_use_the_brain_model(tmp_path):
    from bids_postop.workflows.channels import init_channels_wf

    wf = init_channels_wf(roles=["postop_t1ce", "postop_t1"], brain_method="raidionics", brain_model=str(tmp_path))
    node = wf.get_node("brain_extraction")
    assert node.inputs.method == "raidionics" and node.inputs.model_folder == str(tmp_path)
    with pytest.raises(ValueError, match="needs brain_model"):
        init_channels_wf(roles=["postop_t1ce"], brain_method="raidionics")


def test_train_refuses_a_missing_brain_model(tmp_path, monkeypatch):
    from bids_postop.cli.train import _raidionics_brain_model, build_parser
    from bids_postop.errors import ModelError

    monkeypatch.setenv("BIDS_POSTOP_HOME", str(tmp_path / "empty_cache"))
    args = build_parser().parse_args([str(tmp_path), str(tmp_path / "w"), "--manual", f"manual={tmp_path}",
                                      "--brain-method", "raidionics"])
    with pytest.raises(ModelError, match="bids_postop-models fetch MRI_Brain"):
        _raidionics_brain_model(args)
    model = make_brain_model(tmp_path / "MyBrain")
    args.brain_model = str(model)
    assert _raidionics_brain_model(args) == str(model.resolve())
