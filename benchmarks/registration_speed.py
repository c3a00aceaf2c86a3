"""Benchmark: rigid registration on the study grid — time against accuracy for a known motion (by hand, not CI).

    python benchmarks/registration_speed.py --workdir /tmp/bench_reg [--case study|large]
        [--variants default brainmask] [--threads 2]

Fixed image: the case's T1w-CE (benchmarks/study_cases.py, a real head with skull on the study grid, e.g.
430×461×180 at 0.67×0.64×1.96 mm). Moving image: the same real T1w-CE moved by a known rigid motion
(4°, 3°, −2°; 2, −3, 1.5 mm) and resampled onto the same grid, with the same noise floor. Each variant of
:func:`bids_postop.core.registration.register` runs in a fresh process; reported: wall and CPU seconds, peak RSS,
and the recovery error (mm) of the estimated transform at 5000 brain voxels (mean, 95th percentile, max).

Variants: ``default`` (the whole field of view, as the pipeline ran before issue #9), ``brainmask`` (the
metric restricted to the post-op brain mask, ``fixed_mask``), ``nofull`` (no full-resolution iterations) — these
three on the images' own grids (``FULL_RESOLUTION``, the pipeline before issue 18) — and ``adopted`` (brain mask,
``DEFAULT_SETTINGS``: ~2 mm copies cut to the brain box; see registration_accuracy.py for more settings and cases).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_cases import CASES, SOURCE_FILES, machine, make_case, real_data_dir, resample, run_measured  # noqa: E402

ANGLES_DEG = (4.0, 3.0, -2.0)
SHIFT_MM = (2.0, -3.0, 1.5)


def motion() -> np.ndarray:
    """4×4 world (RAS) rigid motion about the source image's centre."""
    ax, ay, az = np.deg2rad(ANGLES_DEG)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    src = nib.load(real_data_dir() / SOURCE_FILES["t1ce"])
    centre = (src.affine @ np.array([*(np.array(src.shape[:3]) - 1) / 2, 1.0]))[:3]
    rot = rz @ ry @ rx
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre - rot @ centre + np.array(SHIFT_MM)
    return out


def make_moving(files: dict[str, Path], out: Path) -> Path:
    if out.exists():
        return out
    fixed = nib.load(files["t1ce"])
    src = nib.load(real_data_dir() / SOURCE_FILES["t1ce"])
    moved_src = nib.Nifti1Image(np.asanyarray(src.dataobj), motion() @ src.affine)  # the head, moved in the world
    data = resample(moved_src, fixed.shape, fixed.affine, order=1)
    rng = np.random.default_rng(1)
    floor = 0.01 * float(np.percentile(data[data > 0], 99))
    data = np.maximum(data, np.abs(rng.normal(0.0, floor, size=data.shape)).astype(np.float32))
    img = nib.Nifti1Image(np.round(data).astype(np.int16), fixed.affine)
    img.set_qform(fixed.affine, code=1)
    img.set_sform(fixed.affine, code=1)
    nib.save(img, out)
    return out


def recovery_error(transform: Path, files: dict[str, Path]) -> dict[str, float]:
    """Distance (mm) between where the estimated transform maps brain points and where the motion put them."""
    import ants

    mask = nib.load(files["brain_mask"])
    idx = np.argwhere(np.asanyarray(mask.dataobj) > 0)
    idx = idx[np.random.default_rng(0).choice(len(idx), size=min(5000, len(idx)), replace=False)]
    ras = (mask.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    truth = (motion() @ np.c_[ras, np.ones(len(ras))].T).T[:, :3]
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    tx = ants.read_transform(str(transform))
    est = np.array([tx.apply_to_point(tuple(p * flip)) for p in ras]) * flip
    err = np.linalg.norm(est - truth, axis=1)
    return {"mean_mm": round(float(err.mean()), 3), "p95_mm": round(float(np.percentile(err, 95)), 3),
            "max_mm": round(float(err.max()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--case", default="study", choices=sorted(CASES))
    parser.add_argument("--variants", nargs="+", default=["default", "brainmask"],
                        choices=["default", "brainmask", "nofull", "adopted"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    files = make_case(args.case, workdir / "cases" / args.case)
    moving = make_moving(files, workdir / "cases" / args.case / "t1ce_moved.nii.gz")
    print(f"machine: {json.dumps(machine())}", flush=True)
    rows = []
    for variant in args.variants:
        prefix = workdir / f"{args.case}_{variant}_"
        mask = str(files["brain_mask"]) if variant in ("brainmask", "adopted") else None
        code = textwrap.dedent(f"""
            import os
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "{args.threads}"
            from bids_postop.core import registration as R
            if {variant!r} == "nofull":
                R.FINE_VOXEL_MM = 1e9
            settings = R.DEFAULT_SETTINGS if {variant!r} == "adopted" else R.FULL_RESOLUTION
            result = R.register({str(files['t1ce'])!r}, {str(moving)!r}, kind="rigid", out_prefix={str(prefix)!r},
                                threads={args.threads}, settings=settings,
                                fixed_mask={mask!r})
            print("TRANSFORM", result.transforms[0])
        """)
        load = machine()["load_average"]
        result = run_measured([sys.executable, "-c", code])
        if result["returncode"] != 0:
            sys.exit(result["output"][-3000:])
        transform = Path(next(line.split(" ", 1)[1] for line in result["output"].splitlines()
                              if line.startswith("TRANSFORM ")))
        row = {"variant": variant, "wall_s": result["wall_s"], "cpu_s": result["cpu_s"],
               "peak_rss_gib": result["peak_tree_rss_gib"], **recovery_error(transform, files), "load_before": load,
               "load_after": machine()["load_average"]}
        rows.append(row)
        print(row, flush=True)
    (workdir / f"registration_{args.case}.json").write_text(json.dumps(rows, indent=1))
    print("\n| variant | wall s | CPU s | peak RSS GiB | error mean / p95 / max mm | load before → after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gib']} | {r['mean_mm']} / "
              f"{r['p95_mm']} / {r['max_mm']} | {r['load_before'][0]} → {r['load_after'][0]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
