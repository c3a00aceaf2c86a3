"""``--fast``: the first fold only and no test-time mirroring, observed in what the backend ran."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest

from bids_postop.segmentation.models import resolve_models


@pytest.fixture(scope="module")
def two_fold_model(tmp_path_factory):
    """The demo model B with a second fold (a copy of the first): enough to see how many folds run."""
    [card] = [c for c in resolve_models("demo") if c.configuration == "B"]
    folder = tmp_path_factory.mktemp("model") / "B"
    shutil.copytree(card.folder, folder)
    shutil.copytree(folder / "nnunet" / "fold_0", folder / "nnunet" / "fold_1")
    raw = json.loads((folder / "bids_postop_model.json").read_text())
    raw["nnunet"]["folds"] = [0, 1]
    (folder / "bids_postop_model.json").write_text(json.dumps(raw))
    return folder


@pytest.fixture(scope="module")
def channels(tmp_path_factory):
    from bids_postop.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=3)
    anat = root / "sub-01" / "ses-postop" / "anat"
    return next(anat.glob("*_ce-*_T1w.nii.gz")), anat / "sub-01_ses-postop_T1w.nii.gz"


def test_fast_option_sets_the_preset(tmp_path):
    from bids_postop.cli.run import preset_provenance, settings_from_args

    base = [str(tmp_path), str(tmp_path / "out"), "participant"]
    default, fast = settings_from_args(base), settings_from_args([*base, "--fast"])
    assert (default.fast, default.use_mirroring) == (False, True)
    assert (fast.fast, fast.use_mirroring) == (True, False)
    assert preset_provenance(fast) == {"name": "fast", "folds": "first fold only", "test_time_mirroring": False,
                                       "precision": "bf16", "nnunet_engine": "auto"}
    assert preset_provenance(default) == {"name": "default", "folds": "all folds averaged",
                                          "test_time_mirroring": True, "precision": "fp32", "nnunet_engine": "auto"}
    explicit = settings_from_args([*base, "--fast", "--precision", "fp32", "--nnunet-engine", "torch"])
    assert (explicit.precision, explicit.nnunet_engine) == ("fp32", "torch")


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, False])
def test_segment_runs_one_fold_without_mirroring_under_fast(tmp_path, two_fold_model, channels, fast):
    from bids_postop.interfaces.core import Segment

    t1ce, t1 = channels
    node = Segment(model_folder=str(two_fold_model), device="cpu", threads=1, use_mirroring=not fast,
                   first_fold_only=fast, postop_t1ce=str(t1ce), postop_t1=str(t1))
    result = node.run(cwd=str(tmp_path))
    info = json.loads(Path(result.outputs.run_info).read_text())
    if fast:
        assert info["folds"] == [0] and info["n_networks"] == 1
        assert info["use_mirroring"] is False and info["mirror_axes"] == []
        assert (info["engine"], info["precision"]) == ("onnxruntime", "fp32")  # the Segment node's default
    else:
        assert info["folds"] == [0, 1] and info["n_networks"] == 2
        assert info["use_mirroring"] is True and info["mirror_axes"] == [2]  # the demo model's left-right axis
    assert nib.load(result.outputs.out_file).shape == nib.load(t1ce).shape


def test_workflow_passes_the_preset_to_the_segment_node(tmp_path):
    from bids_postop.bids.inputs import ParticipantInputs
    from bids_postop.segmentation.models import resolve
    from bids_postop.workflows.base import init_participant_wf

    [model] = [m for m in resolve("demo") if m.card.configuration == "B"]
    files = {role: tmp_path / f"{role}.nii.gz" for role in ("postop_t1ce", "postop_t1")}
    inputs = ParticipantInputs(subject="01", postop_session="postop", preop_session=None, site=None, files=files)
    for fast in (True, False):
        wf = init_participant_wf(inputs=inputs, model=model, output_dir=tmp_path / "out", bids_dir=tmp_path,
                                 use_mirroring=not fast, fast=fast)
        segment = wf.get_node("segment")
        assert (segment.inputs.first_fold_only, segment.inputs.use_mirroring) == (fast, not fast)
    wf = init_participant_wf(inputs=inputs, model=model, output_dir=tmp_path / "out", bids_dir=tmp_path,
                             precision="bf16", nnunet_engine="torch")
    segment = wf.get_node("segment")
    assert (segment.inputs.precision, segment.inputs.nnunet_engine) == ("bf16", "torch")
