import json
import os
import stat
from pathlib import Path

import pytest

from bids_postop.bids.derivatives import (
    SessionOutputs,
    atomic_write_text,
    check_output_dir,
    source_prefix,
    summary_row,
    write_dataset_description,
)
from bids_postop.errors import OutputError


def test_names_follow_the_source_contrast_t1w(tmp_path):
    src = Path("/x/sub-01/ses-postop/anat/sub-01_ses-postop_ce-gadolinium_run-2_T1w.nii.gz")
    assert source_prefix(src) == "sub-01_ses-postop_ce-gadolinium_run-2"
    out = SessionOutputs.for_source(tmp_path, src, "01", "postop")
    assert out.residual_mask == tmp_path / "sub-01/ses-postop/anat/" \
        "sub-01_ses-postop_ce-gadolinium_run-2_label-tumor_desc-residual_mask.nii.gz"
    assert out.residual_probseg.name.endswith("_label-tumor_desc-residual_probseg.nii.gz")
    assert out.brain_mask.name == "sub-01_ses-postop_ce-gadolinium_run-2_label-brain_mask.nii.gz"
    assert out.measures_tsv == tmp_path / "sub-01/ses-postop/sub-01_ses-postop_desc-residual_measures.tsv"
    nosession = SessionOutputs.for_source(tmp_path, Path("sub-01_ce-gd_T1w.nii"), "01", None)
    assert nosession.residual_mask.parent == tmp_path / "sub-01" / "anat"


def test_summary_row_has_empty_cells_for_unknowns():
    text = summary_row({"participant_id": "sub-01", "residual_volume_ml": 0.25, "resection_status": "RT",
                        "preop_volume_ml": None, "eor_percent": None})
    header, row = text.strip("\n").split("\n")
    assert header.split("\t") == ["participant_id", "session_id", "site", "config", "model",
                                  "residual_volume_ml", "resection_status", "preop_volume_ml", "eor_percent"]
    assert row.split("\t") == ["sub-01", "", "", "", "", "0.2500", "RT", "", ""]


def test_dataset_description_is_written_once_and_bidsignore_merged(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    (out).mkdir()
    (out / ".bidsignore").write_text("extra/\n")
    desc = write_dataset_description(out, bids)
    data = json.loads(desc.read_text())
    assert data["DatasetType"] == "derivative" and data["GeneratedBy"][0]["Name"] == "bids_postop"
    assert data["SourceDatasets"][0]["URL"].startswith("file://")
    mtime = desc.stat().st_mtime_ns
    write_dataset_description(out, bids)
    assert desc.stat().st_mtime_ns == mtime
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert ignore[0] == "extra/" and "logs" in ignore and "sub-*/figures" in ignore and len(ignore) == len(set(ignore))


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
    assert check_output_dir(bids / "derivatives" / "bids_postop", bids).is_dir()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(OutputError, match="cannot write"):
            check_output_dir(locked / "out", bids)
