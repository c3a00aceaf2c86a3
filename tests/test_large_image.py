"""The whole participant level on a very large image (896×896×512), through the CLI, within 8 GiB (issue 8).

A synthetic T1w-CE: the demo's sub-04 contrast T1w (a simulated post-operative head, LPS, oblique) resampled
onto an 896×896×512 grid over the same field of view (about 0.2×0.2×0.3 mm; 0.77 GiB of int16 voxels),
configuration A with the demo model and deepbet. The run is a child process; its peak RSS is the largest
``ru_maxrss`` of the processes it waited for (``resource.getrusage(RUSAGE_CHILDREN)`` inside a wrapper process
whose only child is the run). ``benchmarks/large_image.py`` times the same run step by step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow

LARGE_SHAPE = (896, 896, 512)
PEAK_RSS_BOUND_GIB = 8.0  # what an HPC job typically gets per participant
GIB = 2**30


def resample_onto(img: nib.Nifti1Image, shape: tuple[int, int, int]) -> nib.Nifti1Image:
    """``img`` resampled (trilinear) onto a ``shape`` grid with the same axes and field of view (int16)."""
    from scipy.ndimage import affine_transform

    scale = np.array(img.shape[:3], float) / np.array(shape, float)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * scale
    affine[:3, 3] = img.affine[:3, :3] @ (0.5 * scale - 0.5) + img.affine[:3, 3]
    data = np.asanyarray(img.dataobj).astype(np.float32)
    out = np.empty(shape, np.int16)
    step = 32  # slabs keep the float32 temporaries small
    for z0 in range(0, shape[2], step):
        z1 = min(z0 + step, shape[2])
        slab = affine_transform(data, np.diag(scale), offset=0.5 * scale - 0.5 + np.array([0, 0, z0 * scale[2]]),
                                output_shape=(shape[0], shape[1], z1 - z0), order=1, output=np.float32)
        out[:, :, z0:z1] = np.clip(np.round(slab), -32768, 32767).astype(np.int16)
    result = nib.Nifti1Image(out, affine)
    result.set_qform(affine, code=1)
    result.set_sform(affine, code=1)
    return result


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def test_large_image_through_the_cli_within_8_gib(tmp_path):
    import json

    from bids_postop.demo.dataset import write_demo_dataset

    if _available_gib() < PEAK_RSS_BOUND_GIB + 2:
        pytest.skip(f"needs {PEAK_RSS_BOUND_GIB + 2:.0f} GiB of free memory")
    if (free := os.statvfs(tmp_path)).f_bavail * free.f_frsize < 8 * GIB:
        pytest.skip("needs 8 GiB of free disk space")
    demo = tmp_path / "demo"
    write_demo_dataset(demo, seed=0)
    source = next((demo / "sub-04" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
    bids = tmp_path / "bids"
    anat = bids / "sub-large" / "ses-postop" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "large image", "BIDSVersion": "1.10.0"}))
    t1ce = anat / "sub-large_ses-postop_ce-Gd_T1w.nii.gz"
    nib.save(resample_onto(nib.load(source), LARGE_SHAPE), t1ce)

    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "bids_postop.cli.run", str(bids), str(out), "participant",
               "--participant-label", "large", "-w", str(work), "--model", "demo", "--config", "A",
               "--brain-method", "deepbet", "--nprocs", "1", "--omp-nthreads", "2", "--device", "cpu",
               "--skip-bids-validation"]
    # a wrapper whose only child is the run: RUSAGE_CHILDREN is then the run's largest process
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print('PEAK_KIB', r.ru_maxrss, 'CPU_S', r.ru_utime + r.ru_stime); sys.exit(code)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                          timeout=1500, check=False)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    usage = next(line.split() for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB"))
    peak, cpu = int(usage[1]) / 2**20, float(usage[3])
    steps = re.findall(r"sub-large: (\S+)\s+done\s+([\d.]+) s", proc.stderr)
    print(f"\n{LARGE_SHAPE} participant run: {took:.0f} s wall, {cpu:.0f} s CPU, load average "
          f"{os.getloadavg()[0]:.1f}, peak RSS {peak:.2f} GiB; steps: "
          + ", ".join(f"{name} {float(s):.0f} s" for name, s in steps))

    ref = nib.load(t1ce)
    prefix = out / "sub-large" / "ses-postop" / "anat"
    for suffix, dtype in (("label-tumor_desc-demoA_mask", np.uint8),
                          ("label-tumor_desc-demoA_probseg", np.float32), ("desc-brain_mask", np.uint8)):
        img = nib.load(prefix / f"sub-large_ses-postop_ce-Gd_{suffix}.nii.gz")
        assert img.shape == LARGE_SHAPE, suffix
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5, err_msg=suffix)
        assert img.get_data_dtype() == dtype, suffix
    brain = np.asanyarray(nib.load(prefix / "sub-large_ses-postop_ce-Gd_desc-brain_mask.nii.gz").dataobj)
    voxel_ml = float(np.prod(ref.header.get_zooms()[:3])) / 1000
    assert 800 < int(np.count_nonzero(brain)) * voxel_ml < 2000, "a plausible brain volume in ml"
    assert peak <= PEAK_RSS_BOUND_GIB, f"peak RSS {peak:.2f} GiB > {PEAK_RSS_BOUND_GIB} GiB"
