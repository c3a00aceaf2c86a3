"""Workflow graphs are built (not run) over generated BIDS skeletons, as niworkflows tests do."""

import json

import pytest
from conftest import make_bids

from bids_postop.bids.inputs import discover
from bids_postop.configurations import CONFIGURATIONS
from bids_postop.errors import ModelError
from bids_postop.segmentation.models import read_card, resolve, resolve_models
from bids_postop.workflows.base import init_participant_wf

FULL = {
    "ses-postop/anat/sub-01_ses-postop_ce-gadolinium_T1w.nii.gz": None,
    "ses-postop/anat/sub-01_ses-postop_T1w.nii.gz": None,
    "ses-postop/anat/sub-01_ses-postop_FLAIR.nii.gz": None,
    "ses-preop/anat/sub-01_ses-preop_ce-gadolinium_T1w.nii.gz": None,
}


def model_card(folder, config, threshold=0.4):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bids_postop_model.json").write_text(json.dumps({
        "name": f"test-{config}", "architecture": "nnunet", "configuration": config,
        "channels": list(CONFIGURATIONS[config]), "threshold": threshold, "nnunet": {"folds": [0]}}))
    return read_card(folder)


@pytest.mark.parametrize("config, expected, absent", [
    ("A", {"brain_extraction", "skullstrip_postop_t1ce", "segment", "postprocess", "ds_outputs"},
     {"register_postop_t1", "register_preop_t1ce"}),
    ("B", {"register_postop_t1", "resample_postop_t1", "skullstrip_postop_t1"},
     {"register_postop_flair", "register_preop_t1ce"}),
    ("E", {"register_postop_t1", "register_postop_flair", "register_preop_t1ce", "resample_preop_mask",
           "skullstrip_preop_t1ce"}, set()),
])
def test_graph_per_configuration(tmp_path, config, expected, absent):
    root = make_bids(tmp_path / "bids", {"01": FULL}, preop_masks={"01": "preop"})
    [inputs] = discover(root, derivatives={"preop": root / "derivatives" / "preop"}, validate=False)
    model_card(tmp_path / "model", config)
    [model] = resolve(tmp_path / "model")
    wf = init_participant_wf(inputs=inputs, model=model, output_dir=tmp_path / "out", bids_dir=root, omp_nthreads=3)
    names = {n.rsplit(".", 1)[-1] for n in wf.list_node_names()}
    assert expected <= names and not (absent & names)
    graph = wf._create_flat_graph()
    by_name = {n.fullname.split(".", 1)[1]: n for n in graph.nodes}  # "inputnode", "channels_wf.register_…"
    # the pre-op mask always reaches post-processing (pre-op volume, EOR), whatever the configuration
    assert any(v.name == "postprocess" for v in graph.successors(by_name["inputnode"]))
    assert by_name["postprocess"].inputs.threshold == 0.4
    # the model's content digest is part of the segmentation node's hash; threaded nodes declare their threads
    assert by_name["segment"].inputs.model_digest == model.digest and len(model.digest) == 64
    threaded = {n: node.n_procs for n, node in by_name.items()
                if n.rsplit(".", 1)[-1] in ("segment", "brain_extraction") or ".register_" in n}
    assert threaded and set(threaded.values()) == {3}, threaded
    if config == "E":
        kinds = {n: by_name[f"channels_wf.{n}"].inputs.kind for n in ("register_postop_t1", "register_postop_flair",
                                                                      "register_preop_t1ce")}
        assert kinds == {"register_postop_t1": "rigid", "register_postop_flair": "rigid",
                         "register_preop_t1ce": "syn"}
        assert by_name["channels_wf.resample_preop_mask"].inputs.interpolation == "nearest"


def test_model_cards_are_checked(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "bids_postop_model.json").write_text(json.dumps({
        "architecture": "nnunet", "configuration": "B", "channels": ["postop_t1", "postop_t1ce"]}))
    with pytest.raises(ModelError, match="do not match configuration B"):
        resolve_models(folder)
    with pytest.raises(ModelError, match="not found"):
        resolve_models(tmp_path / "missing")
    collection = tmp_path / "collection"
    model_card(collection / "a", "A")
    model_card(collection / "b", "B")
    assert [c.configuration for c in resolve_models(collection)] == ["A", "B"]
    model_card(collection / "b2", "B")
    with pytest.raises(ModelError, match="two models for configuration B"):
        resolve_models(collection)
