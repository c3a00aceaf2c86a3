"""A participant run killed midway resumes from the same work directory: finished steps are not
recomputed, nothing half-written is visible, and the outputs equal those of a clean run."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_postop.demo.dataset import write_demo_dataset

pytestmark = pytest.mark.slow
KILL_AFTER = "register_postop_t1"


def command(root: Path, out: Path, work: Path) -> list[str]:
    # one thread: registration is then bit-for-bit reproducible, so a clean run can be compared exactly
    return [sys.executable, "-m", "bids_postop.cli.run", str(root), str(out), "participant", "--participant-label",
            "04", "-w", str(work), "--nprocs", "1", "--omp-nthreads", "1", "--device", "cpu", "--skip-bids-validation",
            "--model", "demo"]


def results(out: Path) -> dict[str, object]:
    found = {}
    for f in sorted(out.rglob("sub-04/**/*.nii.gz")):
        found[f.name] = np.asanyarray(nib.load(f).dataobj)
    for f in sorted(out.rglob("sub-04/**/*_measures.tsv")):
        found[f.name] = list(csv.DictReader(f.open(), delimiter="\t"))
    return found


def test_killed_run_resumes_without_recomputing(tmp_path):
    root = tmp_path / "bids"
    write_demo_dataset(root, seed=0)
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(command(root, out, work), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 900
    for line in proc.stderr:
        if KILL_AFTER in line and "done" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "the run never reached the registration"
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.rglob("*_label-tumor_desc-*_mask.nii.gz")), "no final output before segmentation ran"
    finished = {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}
    assert any("register_postop_t1" in str(p) for p in finished) and any("brain_extraction" in str(p)
                                                                            for p in finished)

    resumed = subprocess.run(command(root, out, work), capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent.name} was recomputed"
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"

    clean_out = tmp_path / "clean_out"
    clean = subprocess.run(command(root, clean_out, tmp_path / "clean_work"), capture_output=True, text=True,
                           timeout=1200)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = results(out), results(clean_out)
    # brain mask, tumour mask, probability map, its uncertainty map, measures
    assert a.keys() == b.keys() and len(a) == 5
    for name in a:
        if name.endswith("_probseg.nii.gz"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
        elif name.endswith(".nii.gz"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name]
