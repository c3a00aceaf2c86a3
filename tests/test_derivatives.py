import json
import os
import stat
from pathlib import Path

import pytest

from bids_postop.bids.derivatives import (
    SUMMARY_COLUMNS,
    SessionOutputs,
    atomic_write_text,
    source_prefix,
    summary_row,
    write_dataset_description,
)
from bids_postop.cli.paths import check_output_dir, prepare_output_dir
from bids_postop.errors import OutputError


def test_names_follow_the_source_contrast_t1w_and_carry_the_model(tmp_path):
    src = Path("/x/sub-01/ses-postop/anat/sub-01_ses-postop_ce-gadolinium_run-2_T1w.nii.gz")
    assert source_prefix(src) == "sub-01_ses-postop_ce-gadolinium_run-2"
    out = SessionOutputs.for_source(tmp_path, src, "01", "postop", model_label="demoB")
    assert out.residual_mask == tmp_path / "sub-01/ses-postop/anat/" \
        "sub-01_ses-postop_ce-gadolinium_run-2_label-tumor_desc-demoB_mask.nii.gz"
    assert out.residual_probseg.name.endswith("_label-tumor_desc-demoB_probseg.nii.gz")
    assert out.brain_mask.name == "sub-01_ses-postop_ce-gadolinium_run-2_desc-brain_mask.nii.gz"
    assert out.measures_tsv == tmp_path / "sub-01/ses-postop/sub-01_ses-postop_desc-demoB_measures.tsv"
    other = SessionOutputs.for_source(tmp_path, src, "01", "postop", model_label="MRIGBMPostopFV2p")
    assert not set(out.all_files()) & set(other.all_files()) - {out.brain_mask, sidecar_of(out.brain_mask)}
    nosession = SessionOutputs.for_source(tmp_path, Path("sub-01_ce-gd_T1w.nii"), "01", None, model_label="m")
    assert nosession.residual_mask.parent == tmp_path / "sub-01" / "anat"
    with pytest.raises(ValueError, match="alphanumeric"):
        SessionOutputs.for_source(tmp_path, src, "01", "postop", model_label="demo-B")


def sidecar_of(image: Path) -> Path:
    return image.with_name(image.name.replace(".nii.gz", ".json"))


def test_summary_row_writes_n_a_for_unknowns_and_booleans_in_lower_case():
    text = summary_row({"participant_id": "sub-01", "residual_volume_ml": 0.25, "resection_status": "RT",
                        "preop_volume_ml": None, "eor_percent": None, "threshold": 0.5, "gtr_cutoff_ml": 0.175,
                        "gtr_inclusive": False, "not_for_clinical_use": True})
    header, row = text.strip("\n").split("\n")
    assert tuple(header.split("\t")) == SUMMARY_COLUMNS
    assert header.split("\t")[9:13] == ["threshold", "gtr_cutoff_ml", "gtr_inclusive", "not_for_clinical_use"]
    assert row.split("\t") == ["sub-01", "n/a", "n/a", "n/a", "n/a", "0.2500", "RT", "n/a", "n/a", "0.5000",
                                "0.1750", "false", "true", *["n/a"] * 8]


def test_dataset_description_is_kept_current_and_bidsignore_merged(tmp_path, monkeypatch):
    from bids_postop.bids import derivatives as D

    bids = tmp_path / "bids"
    (bids / "derivatives" / "preop").mkdir(parents=True)
    masks = tmp_path / "elsewhere" / "masks"
    masks.mkdir(parents=True)
    out = tmp_path / "out"
    (out).mkdir()
    (out / ".bidsignore").write_text("extra/\n")
    desc = write_dataset_description(out, bids, derivatives={"preop": bids / "derivatives" / "preop"})
    data = json.loads(desc.read_text())
    assert data["DatasetType"] == "derivative" and data["GeneratedBy"][0]["Name"] == "bids_postop"
    assert data["SourceDatasets"][0]["URL"].startswith("file://")
    assert set(data["DatasetLinks"]) == {"raw", "preop"} and "License" in data and "Helland" in data["HowToAcknowledge"]
    mtime = desc.stat().st_mtime_ns
    write_dataset_description(out, bids, derivatives={"preop": bids / "derivatives" / "preop"})
    assert desc.stat().st_mtime_ns == mtime, "unchanged content is not rewritten"
    # a later run with another version and another -d dataset: GeneratedBy names it first, links are merged
    monkeypatch.setattr(D, "__version__", "9.9.9")
    monkeypatch.setenv("BIDS_POSTOP_CONTAINER_TYPE", "docker")
    data = json.loads(write_dataset_description(out, bids, derivatives={"masks": masks}).read_text())
    assert [g["Version"] for g in data["GeneratedBy"]] == ["9.9.9", "0.1.0"]
    assert data["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "bids_postop:9.9.9"}
    assert set(data["DatasetLinks"]) == {"raw", "preop", "masks"}
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert ignore[0] == "extra/" and "logs" in ignore and "sub-*/figures" in ignore and len(ignore) == len(set(ignore))


def test_sources_are_bids_uris_of_the_dataset_holding_them(tmp_path):
    from bids_postop.bids.derivatives import bids_uri

    bids, masks = tmp_path / "bids", tmp_path / "masks"
    inside = bids / "derivatives" / "preop"
    links = {"preop": inside, "masks": masks}
    assert bids_uri(bids / "sub-01" / "anat" / "a.nii.gz", bids, derivatives=links) == "bids:raw:sub-01/anat/a.nii.gz"
    assert bids_uri(inside / "sub-01" / "m.nii.gz", bids, derivatives=links) == "bids:preop:sub-01/m.nii.gz"
    assert bids_uri(masks / "sub-01" / "m.nii.gz", bids, derivatives=links) == "bids:masks:sub-01/m.nii.gz"
    assert bids_uri(tmp_path / "x.nii.gz", bids, derivatives=links).startswith("file://")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.tsv", "x\n")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.tsv"]


def test_output_dir_checks(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    with pytest.raises(OutputError, match="derivatives/bids_postop"):
        check_output_dir(bids, bids)
    with pytest.raises(OutputError, match="inside the BIDS dataset"):
        check_output_dir(bids / "results", bids)
    with pytest.raises(OutputError, match="contains the BIDS dataset"):
        check_output_dir(tmp_path, bids)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    with pytest.raises(OutputError, match="swapped"):
        check_output_dir(raw, bids)
    out = bids / "derivatives" / "bids_postop"
    assert check_output_dir(out, bids) == out and not out.exists()  # checks write nothing
    assert prepare_output_dir(out).is_dir()
    with pytest.raises(OutputError, match="cannot write"):
        prepare_output_dir(Path("/proc/bids_postop_out"))  # not writable, even by root
    if os.geteuid() != 0:  # root writes anywhere else
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(OutputError, match="cannot write"):
            prepare_output_dir(locked / "out")
