import json

import pytest
from conftest import make_bids

from bids_postop.bids.inputs import discover, format_inputs_table, load_bids_filters, normalize_label
from bids_postop.configurations import choose_configuration
from bids_postop.errors import InputDataError, UsageError

FULL = {
    "ses-postop/anat/sub-{s}_ses-postop_ce-gadolinium_T1w.nii.gz": None,
    "ses-postop/anat/sub-{s}_ses-postop_T1w.nii.gz": None,
    "ses-postop/anat/sub-{s}_ses-postop_FLAIR.nii.gz": None,
    "ses-preop/anat/sub-{s}_ses-preop_ce-gadolinium_T1w.nii.gz": None,
}


def files(label, template=FULL, drop=()):
    return {k.format(s=label): None for k in template if not any(d in k for d in drop)}


def test_full_participant_with_preop_mask_and_site(tmp_path):
    root = make_bids(tmp_path / "bids", {"01": files("01")}, sites={"01": "north"}, preop_masks={"01": "preop"})
    [p] = discover(root, derivatives={"preop": root / "derivatives" / "preop"}, validate=False)
    assert p.site == "north" and p.postop_session == "postop"
    assert set(p.files) == {"postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask"}
    assert p.files["postop_t1"].name == "sub-01_ses-postop_T1w.nii.gz"  # the non-ce T1w
    assert choose_configuration(p.available, {"A", "B", "C", "D", "E"}) == "E"


@pytest.mark.parametrize("label", ["gadolinium", "Gd", "GADOLINIUM", "gadobutrol"])
def test_any_ce_label_is_the_contrast_t1w(tmp_path, label):
    root = make_bids(tmp_path / "bids", {"01": {
        f"ses-postop/anat/sub-01_ses-postop_ce-{label}_T1w.nii.gz": None,
        "ses-postop/anat/sub-01_ses-postop_T1w.nii.gz": None}})
    [p] = discover(root, validate=False)
    assert p.files["postop_t1ce"].name == f"sub-01_ses-postop_ce-{label}_T1w.nii.gz"
    assert p.files["postop_t1"].name == "sub-01_ses-postop_T1w.nii.gz"


def test_missing_sequences_and_fallback_configuration(tmp_path):
    root = make_bids(tmp_path / "bids", {
        "01": files("01", drop=("FLAIR", "preop")),
        "02": files("02", drop=("ce-",)),
        "03": files("03", drop=("_T1w.nii.gz",)) | {"ses-postop/anat/sub-03_ses-postop_ce-Gd_T1w.nii.gz": None},
    })
    found = {p.subject: p for p in discover(root, validate=False)}
    assert found["01"].missing == ("postop_flair", "preop_t1ce", "preop_mask")
    assert choose_configuration(found["01"].available, {"A", "B", "E"}) == "B"
    assert "postop_t1ce" not in found["02"].files
    assert choose_configuration(found["02"].available, {"A", "B", "E"}) is None
    assert set(found["03"].files) == {"postop_t1ce", "postop_flair"}
    assert choose_configuration(found["03"].available, {"A", "B", "C"}) == "A"
    assert choose_configuration(found["03"].available, {"A", "B"}, "B") is None
    table = format_inputs_table(list(found.values()), {"01": "B", "02": None, "03": "A"})
    assert "sub-02" in table and "skip" in table


def test_custom_session_names(tmp_path):
    root = make_bids(tmp_path / "bids", {"01": {
        "ses-early/anat/sub-01_ses-early_ce-gadolinium_T1w.nii.gz": None,
        "ses-diagnosis/anat/sub-01_ses-diagnosis_ce-gadolinium_T1w.nii.gz": None}},
        preop_masks={"01": "diagnosis"})
    [p] = discover(root, postop_session="early", preop_session="diagnosis",
                   derivatives={"masks": root / "derivatives" / "preop"}, validate=False)
    assert p.files["postop_t1ce"].parent.parent.name == "ses-early"
    assert p.files["preop_t1ce"].parent.parent.name == "ses-diagnosis"
    assert "preop_mask" in p.files
    [default] = discover(root, validate=False)
    assert "postop_t1ce" not in default.files and any("ses-postop" in n for n in default.notes)


def test_participant_labels_with_and_without_prefix(tmp_path):
    root = make_bids(tmp_path / "bids", {s: files(s) for s in ("01", "02", "03")})
    assert [p.subject for p in discover(root, participant_labels=["sub-02", "03"], validate=False)] == ["02", "03"]
    assert normalize_label("sub-7") == "7"
    with pytest.raises(InputDataError, match="sub-09.*not found.*sub-01, sub-02, sub-03"):
        discover(root, participant_labels=["09"], validate=False)


def test_several_runs_take_the_highest_and_say_so(tmp_path):
    root = make_bids(tmp_path / "bids", {"01": {
        "ses-postop/anat/sub-01_ses-postop_ce-gadolinium_run-1_T1w.nii.gz": None,
        "ses-postop/anat/sub-01_ses-postop_ce-gadolinium_run-2_T1w.nii.gz": None}})
    [p] = discover(root, validate=False)
    assert p.files["postop_t1ce"].name.endswith("run-2_T1w.nii.gz")
    assert any("run-2" in n and "run-1" in n for n in p.notes)


def test_sessionless_participant_is_postop(tmp_path):
    root = make_bids(tmp_path / "bids", {"01": {"anat/sub-01_ce-gadolinium_T1w.nii.gz": None,
                                                "anat/sub-01_T1w.nii.gz": None}})
    [p] = discover(root, validate=False)
    assert p.postop_session is None and set(p.files) == {"postop_t1ce", "postop_t1"}


def test_bids_filter_file_overrides_queries(tmp_path):
    root = make_bids(tmp_path / "bids", {"01": {
        "ses-postop/anat/sub-01_ses-postop_acq-3d_ce-gadolinium_T1w.nii.gz": None,
        "ses-postop/anat/sub-01_ses-postop_acq-2d_ce-gadolinium_T1w.nii.gz": None}})
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1ce": {"acquisition": "3d"}}))
    [p] = discover(root, bids_filters=load_bids_filters(filt), validate=False)
    assert "acq-3d" in p.files["postop_t1ce"].name
    filt.write_text(json.dumps({"bold": {}}))
    with pytest.raises(UsageError, match="unknown key 'bold'"):
        load_bids_filters(filt)


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="dataset_description.json is missing"):
        discover(tmp_path / "empty", validate=False)
    with pytest.raises(InputDataError, match="does not exist"):
        discover(tmp_path / "nowhere", validate=False)
