"""The participant level runs the cohort as one graph (issue #18): ``--nprocs 2`` overlaps participants, and a
participant whose step fails is reported alone while the others finish."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from bids_postop.demo.dataset import write_demo_dataset

pytestmark = pytest.mark.slow


def test_participants_overlap_and_a_failing_one_is_isolated(tmp_path):
    bids = tmp_path / "bids"
    write_demo_dataset(bids, seed=0, n_participants=4)
    out, work = tmp_path / "out", tmp_path / "work"
    # sub-03 cannot be written: a folder stands where its residual mask goes (its last step fails, late)
    t1ce = next((bids / "sub-03" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
    mask_name = t1ce.name.replace("_T1w.nii.gz", "_label-tumor_desc-demoB_mask.nii.gz")
    blocked = out / "sub-03" / "ses-postop" / "anat" / mask_name
    blocked.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "bids_postop.cli.run", str(bids), str(out), "participant",
                           "--participant-label", "01", "03", "04", "--model", "demo", "--config", "B", "--no-tta",
                           "--nprocs", "2", "-w", str(work), "--device", "cpu", "--skip-bids-validation"],
                          capture_output=True, text=True, timeout=1800)
    log = proc.stderr
    assert proc.returncode == 1, log[-3000:]
    lines = log.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    # overlap: a second participant starts before the first one to start has finished
    starts = sorted((first(f"sub-{s}: start"), s) for s in ("01", "03", "04"))
    assert starts[1][0] < first(f"sub-{starts[0][1]}: ds_report"), "participants ran one after another"
    # isolation: sub-03 failed on its own step; sub-01 and sub-04 finished with their results
    assert "sub-03: failed" in log and "ds_outputs" in log[log.index("sub-03: failed"):][:400]
    rows = {}
    for tsv in out.glob("sub-*/ses-postop/*_measures.tsv"):
        with tsv.open() as handle:
            rows.update({r["participant_id"]: r for r in csv.DictReader(handle, delimiter="\t")})
    assert set(rows) == {"sub-01", "sub-04"} and all(r["config"] == "B" for r in rows.values())
    table = log[log.index("Summary"):]
    assert all(f"sub-{s}" in table for s in ("01", "03", "04")) and "failed" in table
    assert (out / "sub-03.html").is_file() and "ds_outputs" in (out / "sub-03.html").read_text()
    # quiet by default: the worker processes follow -v like the main one (no nipype INFO lines without it)
    assert "nipype.workflow INFO" not in log and "[Node] Setting-up" not in log
