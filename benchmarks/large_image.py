"""Benchmark: the full participant level on a very large image (run by hand, not in CI).

    python benchmarks/large_image.py --workdir /tmp/bench_large [--shape 896 896 512] [--nprocs 1] [--tta]

Writes the demo dataset, then a one-participant BIDS dataset whose post-op T1w-CE and T1w are the demo's
sub-04 images (configuration B) resampled (trilinear) onto a ``--shape`` grid over the same field of view
(896×896×512 by default: ~0.2×0.2×0.3 mm, 0.77 GiB of int16 voxels per image), and runs
``bids_postop … participant`` on it in a child process. Prints the wall time and peak RSS of:

1. the input checks alone (``discover`` + ``check_participant_inputs``, as in tests/test_robustness.py);
2. ``postprocess_probability`` alone on a float32 probability of that shape;
3. the whole participant run (``resource.getrusage(RUSAGE_CHILDREN)``: the largest process of the run,
   nipype's Linear plugin running every step in one process with ``--nprocs 1``), with each step's time
   from the log.

The machine should be otherwise idle: the numbers are meaningless next to other jobs. Record results in
benchmarks/RESULTS.md with the machine (CPU, memory) and the versions printed.

``tests/test_large_image.py`` (slow) runs the same kind of participant run (configuration A, the T1w-CE only)
and asserts outputs on the input grid and a peak RSS of at most 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np

GIB = 2**30


def resample_onto(img: nib.Nifti1Image, shape: tuple[int, int, int]) -> nib.Nifti1Image:
    """``img`` resampled (trilinear, scipy) onto a ``shape`` grid with the same axes and field of view."""
    from scipy.ndimage import affine_transform

    src_shape = np.array(img.shape[:3], float)
    scale = src_shape / np.array(shape, float)  # source voxels per target voxel, per axis
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * scale
    # voxel centres: target i ↔ source (i + 0.5) * scale - 0.5
    affine[:3, 3] = img.affine[:3, :3] @ (0.5 * scale - 0.5) + img.affine[:3, 3]
    data = np.asanyarray(img.dataobj).astype(np.float32)
    out = np.empty(shape, np.int16)
    step = 32  # slabs along the last axis keep the float32 temporaries small
    for z0 in range(0, shape[2], step):
        z1 = min(z0 + step, shape[2])
        slab = affine_transform(data, np.diag(scale), offset=0.5 * scale - 0.5 + np.array([0, 0, z0 * scale[2]]),
                                output_shape=(shape[0], shape[1], z1 - z0), order=1, output=np.float32)
        out[:, :, z0:z1] = np.clip(np.round(slab), -32768, 32767).astype(np.int16)
    result = nib.Nifti1Image(out, affine)
    result.set_qform(affine, code=1)
    result.set_sform(affine, code=1)
    return result


def make_dataset(workdir: Path, shape: tuple[int, int, int]) -> Path:
    from bids_postop.demo.dataset import write_demo_dataset

    demo = workdir / "demo"
    if not (demo / "sub-04").is_dir():
        write_demo_dataset(demo, seed=0)
    bids = workdir / "bids"
    anat = bids / "sub-large" / "ses-postop" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "large image", "BIDSVersion": "1.10.0"}))
    for name in ("ce-Gd_T1w", "T1w"):
        dest = anat / f"sub-large_ses-postop_{name}.nii"  # uncompressed: the benchmark times processing
        if dest.exists() and nib.load(dest).shape == shape:
            continue
        start = time.monotonic()
        nib.save(resample_onto(nib.load(demo / "sub-04" / "ses-postop" / "anat" / f"sub-04_ses-postop_{name}.nii.gz"),
                               shape), dest)
        print(f"wrote {dest.name} {shape} in {time.monotonic() - start:.0f} s", flush=True)
    return bids


def in_fresh_process(code: str) -> tuple[float, float, str]:
    """Run ``code`` in a fresh interpreter: (wall seconds, peak RSS GiB, stdout)."""
    script = textwrap.dedent(code) + ("\nimport resource\n"
                                      "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"failed:\n{proc.stderr[-3000:]}")
    kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB")))
    return took, kib / 2**20, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--shape", type=int, nargs=3, default=(896, 896, 512))
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--tta", action="store_true", help="test-time mirroring (default: --no-tta)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}", flush=True)
    bids = make_dataset(workdir, shape)

    took, peak, out = in_fresh_process(f"""
        from bids_postop.bids.inputs import discover
        from bids_postop.workflows.preflight import check_participant_inputs
        [p] = [check_participant_inputs(p) for p in discover({str(bids)!r}, validate=False)]
        print("FILES", sorted(p.files), "NOTES", list(p.notes))
    """)
    print(f"input checks:     {took:7.1f} s  peak RSS {peak:5.2f} GiB  ({out.splitlines()[0]})", flush=True)

    took, peak, out = in_fresh_process(f"""
        import numpy as np
        from bids_postop.core.postprocess import postprocess_probability
        prob = np.zeros({shape!r}, np.float32)
        prob[100:160, 100:170, 50:90] = 0.9
        mask, m = postprocess_probability(prob, (0.2, 0.2, 0.3), threshold=0.5)
        print("RESIDUAL_VOXELS", m.residual_voxels)
    """)
    print(f"post-processing:  {took:7.1f} s  peak RSS {peak:5.2f} GiB", flush=True)

    out_dir, work = workdir / "out", workdir / "work"
    command = [sys.executable, "-m", "bids_postop.cli.run", str(bids), str(out_dir), "participant",
               "--participant-label", "large", "-w", str(work), "--nprocs", str(args.nprocs),
               "--device", args.device, "--skip-bids-validation", *([] if args.tta else ["--no-tta"])]
    print("running:", " ".join(command), flush=True)
    # a wrapper process whose only children are the run's: RUSAGE_CHILDREN is then the run's largest process
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=False)
    took = time.monotonic() - start
    kib = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB")]
    peak = kib[-1] / 2**20 if kib else float("nan")
    steps = re.findall(r"sub-large: (\S+)\s+(done  |FAILED)\s+([\d.]+) s", proc.stderr)
    for name, status, seconds in steps:
        print(f"  {name:<26}{status.strip():<7}{float(seconds):8.1f} s")
    print(f"participant run:  {took:7.1f} s  peak RSS {peak:5.2f} GiB (largest process)  exit {proc.returncode}")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
