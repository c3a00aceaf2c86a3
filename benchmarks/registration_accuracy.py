"""Benchmark: registration settings — accuracy against known transforms and against the full-resolution result,
with the time each takes (by hand, not CI; issue 18).

    python benchmarks/registration_accuracy.py --workdir /tmp/bench_regacc \\
        [--cases rigid-brats rigid-tcga rigid-study warp-brats warp-study] [--candidates full w2 ...] [--threads 1]

Cases (real scans from ../shared/data/real; every moving image is made from a real scan by a transform known
exactly, so the error of an estimate is measured at the brain voxels of the fixed image):

- ``rigid-brats``: BraTS-GLI-00001 T1w-CE (240×240×155, 1 mm, LPS, skull-stripped) fixed; the same scan moved by a
  known rigid motion (5°, 4.5°, −3°; 4, −3, 2.5 mm) and resampled (trilinear) onto a 1.1 mm grid tilted by 12°,
  with a 1 % noise floor. (Its T1w, t1n, is no ground truth: registered to the T1w-CE it moves 1.0–1.6 mm from
  BraTS's co-registration, depending on the settings.)
- ``rigid-tcga``: TCGA-FG-6692 native T1w-CE (256×224×26, 0.9×0.9×5.5 mm, oblique, with skull) fixed; the same
  scan moved (−4°, 3°, 6°; −3, 5, −2 mm) and resampled onto its own grid with noise; metric inside the HD-BET mask.
- ``rigid-study``: the ``study`` case of study_cases.py (430×461×180 at 0.67×0.64×1.96 mm, real head with skull)
  and the same scan moved (4°, 3°, −2°; 2, −3, 1.5 mm) on the same grid (registration_speed.py's moving image).
- ``warp-brats``: BraTS T1w-CE fixed; moving = the same scan through a known smooth warp (random sinusoids,
  wavelengths 50–110 mm, 2.0 mm RMS, ≤ 5 mm) after a rigid motion (3°, −2°, 4°; 3, 2, −4 mm), on the fixed grid,
  with noise: a pre-op scan in its own session.
- ``warp-study``: the ``study`` case's post-op T1w-CE fixed, and its pre-op T1w-CE (study_cases.py: the same real
  head through a known warp and motion, 430×461×180) with its pre-op tumour mask (an 18 ml ellipsoid in the
  anatomy): also the Dice of the transferred mask against the full-resolution transfer and against the truth.

Candidates (:class:`bids_postop.core.registration.RegistrationSettings`, see ``CANDIDATES``): ``full`` =
``FULL_RESOLUTION`` (ANTsPy's schedules on the images' own grids, the pipeline before issue 18); ``adopted`` =
``DEFAULT_SETTINGS``; the others vary the working voxel size, the crop, the SyN levels, the metric's sampling and
the linear iterations, or add a last full-resolution linear level. Rigid cases run the rigid model, warp
cases SyN (with the brain mask, as the pipeline does). Each registration runs in a fresh process with
``--threads`` ITK threads (the pipeline's default on 2 cores is 1) and is timed (wall and CPU: the machine may be
shared, CPU seconds are the steadier number). Results: ``<workdir>/registration_accuracy.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_cases import (  # noqa: E402
    SOURCE_FILES,
    machine,
    make_case,
    make_preop,
    real_data_dir,
    rigid_matrix,
    run_measured,
    warp_field,
)

from bids_postop.core.registration import DEFAULT_SETTINGS, FULL_RESOLUTION, RegistrationSettings  # noqa: E402

W2 = RegistrationSettings(working_mm=2.0, crop_margin_mm=None, syn_iterations=(40, 20, 10))
CANDIDATES: dict[str, RegistrationSettings] = {
    "full": FULL_RESOLUTION,  # the pipeline before issue 18
    "adopted": DEFAULT_SETTINGS,  # 2 mm, fixed cropped to the brain box + 20 mm, SyN 40x20x0 (8 and 4 mm)
    "2mm": W2,  # whole field of view, SyN 40x20x10 (8, 4 and 2 mm)
    "2mm-syn40x20x0": replace(W2, syn_iterations=(40, 20, 0)),
    "2mm-crop10": replace(W2, crop_margin_mm=10.0),
    "2mm-crop20": replace(W2, crop_margin_mm=20.0),
    "1.5mm-crop20": replace(DEFAULT_SETTINGS, working_mm=1.5),
    "3mm": replace(W2, working_mm=3.0),
    "3mm-crop10": replace(W2, working_mm=3.0, crop_margin_mm=10.0),
    "adopted-sampling0.1": replace(DEFAULT_SETTINGS, sampling_rate=0.1),
    "adopted-sampling0.05": replace(DEFAULT_SETTINGS, sampling_rate=0.05),
    "adopted-short": replace(DEFAULT_SETTINGS, linear_iterations=(200, 100, 50)),
    "adopted-refine10": replace(DEFAULT_SETTINGS, refine_iterations=10),
    "adopted-syn40x20x5": replace(DEFAULT_SETTINGS, syn_iterations=(40, 20, 5)),
    "adopted-syn80x40x0": replace(DEFAULT_SETTINGS, syn_iterations=(80, 40, 0)),
    "adopted-syn100x70x0": replace(DEFAULT_SETTINGS, syn_iterations=(100, 70, 0)),
}
RIGID_CASES = ("rigid-brats", "rigid-tcga", "rigid-study")
WARP_CASES = ("warp-brats", "warp-study")
FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


# --- cases ---------------------------------------------------------------------------------------------------

def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def _noise_floor(data: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    floor = 0.01 * float(np.percentile(data[data > 0], 99))
    return np.maximum(data, np.abs(rng.normal(0.0, floor, size=data.shape))).astype(np.float32)


def _sample(source: nib.Nifti1Image, world_ras: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``source`` at RAS points (…, 3); 0 outside."""
    from scipy.ndimage import map_coordinates

    inv = np.linalg.inv(source.affine)
    vox = world_ras @ inv[:3, :3].T + inv[:3, 3]
    data = np.asanyarray(source.dataobj).astype(np.float32)
    return map_coordinates(data, np.moveaxis(vox, -1, 0), order=1, mode="constant", cval=0.0)


def _grid_points(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _oblique(affine: np.ndarray, degrees: float, spacing: float) -> np.ndarray:
    """The same field of view centre, axes tilted by ``degrees`` about an oblique axis, isotropic ``spacing``."""
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    out = np.eye(4)
    out[:3, :3] = rot @ direction * spacing
    return out


def make_cases(workdir: Path, names: list[str]) -> dict[str, dict]:
    """Write the cases' images; returns, per case, the files and the true fixed→moving map (RAS points → RAS)."""
    real = real_data_dir().parent.parent  # .../shared/data/real
    brats_dir = real / "brats-gli-00001-000"
    out: dict[str, dict] = {}
    d = workdir / "cases"
    d.mkdir(parents=True, exist_ok=True)
    if "rigid-brats" in names or "warp-brats" in names:
        t1c = nib.load(brats_dir / "BraTS-GLI-00001-000-t1c.nii.gz")
        fixed = d / "brats_t1c.nii.gz"
        mask = d / "brats_mask.nii.gz"
        if not mask.exists():
            data = np.asanyarray(t1c.dataobj)
            _save(data, t1c.affine, fixed, np.int16)
            _save(data > 0, t1c.affine, mask, np.uint8)
    if "rigid-brats" in names:
        motion = rigid_matrix((5.0, 4.5, -3.0), (4.0, -3.0, 2.5), centre=_centre(t1c))
        moving = d / "brats_t1c_moved.nii.gz"
        if not moving.exists():
            grid = _oblique(t1c.affine, 12.0, 1.1)
            shape = (210, 210, 150)
            centre = t1c.affine @ np.array([*(np.array(t1c.shape) - 1) / 2, 1.0])
            grid[:3, 3] = centre[:3] - grid[:3, :3] @ ((np.array(shape) - 1) / 2)
            pts = _grid_points(shape, grid)
            # moving(y) = t1c(M^-1 y): the anatomy at x in the fixed scan lies at M x in the moving one
            inv = np.linalg.inv(motion)
            data = _sample(t1c, pts @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32))
            _save(np.round(_noise_floor(data, 1)), grid, moving, np.int16)
        out["rigid-brats"] = {"fixed": fixed, "moving": moving, "mask": mask, "kind": "rigid",
                              "truth": ("matrix", motion.tolist())}
    if "warp-brats" in names:
        motion = rigid_matrix((3.0, -2.0, 4.0), (3.0, 2.0, -4.0), centre=_centre(t1c))
        field = warp_field(seed=7, rms_mm=2.0, centre=_centre(t1c))
        moving = d / "brats_t1c_warped.nii.gz"
        if not moving.exists():
            pts = _grid_points(t1c.shape, t1c.affine)
            # moving(y) = t1c(w(y)), w(y) = z + d(z) with z = M^-1 y: the truth map (fixed → moving) is w^-1
            inv = np.linalg.inv(motion)
            z = pts @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32)
            data = _sample(t1c, z + field(z))
            _save(np.round(_noise_floor(data, 2)), t1c.affine, moving, np.int16)
        out["warp-brats"] = {"fixed": fixed, "moving": moving, "mask": mask, "kind": "syn",
                             "truth": ("warp", {"seed": 7, "rms_mm": 2.0, "centre": _centre(t1c).tolist(),
                                                "motion": motion.tolist()})}
    if "rigid-tcga" in names:
        src = real_data_dir()
        t1c = nib.load(src / SOURCE_FILES["t1ce"])
        motion = rigid_matrix((-4.0, 3.0, 6.0), (-3.0, 5.0, -2.0), centre=_centre(t1c))
        moving = d / "tcga_t1c_moved.nii.gz"
        if not moving.exists():
            pts = _grid_points(t1c.shape, t1c.affine)
            inv = np.linalg.inv(motion)
            data = _sample(t1c, pts @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32))
            _save(np.round(_noise_floor(data, 3)), t1c.affine, moving, np.int16)
        out["rigid-tcga"] = {"fixed": src / SOURCE_FILES["t1ce"], "moving": moving,
                             "mask": src / SOURCE_FILES["brain_mask"], "kind": "rigid",
                             "truth": ("matrix", motion.tolist())}
    if "rigid-study" in names or "warp-study" in names:
        files = make_case("study", workdir / "cases" / "study")
    if "rigid-study" in names:
        from registration_speed import make_moving
        from registration_speed import motion as study_motion

        moving = make_moving(files, d / "study" / "t1ce_moved.nii.gz")
        out["rigid-study"] = {"fixed": files["t1ce"], "moving": moving, "mask": files["brain_mask"], "kind": "rigid",
                              "truth": ("matrix", study_motion().tolist())}
    if "warp-study" in names:
        pre = make_preop("study", workdir / "cases" / "study")
        out["warp-study"] = {"fixed": files["t1ce"], "moving": pre["preop_t1ce"], "mask": files["brain_mask"],
                             "kind": "syn", "preop_mask": pre["preop_mask"], "truth_mask": pre["truth_mask"],
                             "truth": ("warp", json.loads(pre["truth"].read_text()))}
    return out


def _centre(img: nib.Nifti1Image) -> np.ndarray:
    return (img.affine @ np.array([*(np.array(img.shape[:3]) - 1) / 2, 1.0]))[:3]


def true_map(truth, points_ras: np.ndarray) -> np.ndarray:
    """Where the known transform puts fixed-image points (RAS) in the moving image (RAS)."""
    kind, value = truth
    if kind == "matrix":
        m = np.asarray(value)
        return points_ras @ m[:3, :3].T + m[:3, 3]
    field = warp_field(seed=value["seed"], rms_mm=value["rms_mm"], centre=np.asarray(value["centre"]))
    motion = np.asarray(value["motion"])
    z = points_ras.copy()
    for _ in range(60):  # z + d(z) = x  (|grad d| << 1: a contraction)
        z = points_ras - field(z)
    return z @ motion[:3, :3].T + motion[:3, 3]


def brain_points(mask_file: Path, n: int = 20000) -> np.ndarray:
    mask = nib.load(mask_file)
    idx = np.argwhere(np.asanyarray(mask.dataobj).reshape(mask.shape[:3]) > 0)
    idx = idx[np.random.default_rng(0).choice(len(idx), size=min(n, len(idx)), replace=False)]
    return idx @ mask.affine[:3, :3].T + mask.affine[:3, 3]


def estimated_map(transforms: list[str], points_ras: np.ndarray) -> np.ndarray:
    import ants
    import pandas as pd

    pts = pd.DataFrame(points_ras * FLIP, columns=["x", "y", "z"])
    moved = ants.apply_transforms_to_points(3, pts, transforms)[["x", "y", "z"]].to_numpy()
    return moved * FLIP


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


# --- runs ----------------------------------------------------------------------------------------------------

def run_candidate(case: dict, name: str, settings: RegistrationSettings, prefix: Path, threads: int) -> dict:
    code = textwrap.dedent(f"""
        import json, os
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "{threads}"
        from bids_postop.core import registration as R
        settings = R.RegistrationSettings(**{{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in json.loads({json.dumps(json.dumps(settings.describe()))})
                                             .items()}})
        result = R.register({str(case['fixed'])!r}, {str(case['moving'])!r}, kind={case['kind']!r},
                            out_prefix={str(prefix)!r}, threads={threads}, fixed_mask={str(case['mask'])!r},
                            settings=settings)
        print("TRANSFORMS", json.dumps([str(t) for t in result.transforms]))
    """)
    result = run_measured([sys.executable, "-c", code])
    if result["returncode"] != 0:
        raise SystemExit(result["output"][-3000:])
    transforms = json.loads(next(line.split(" ", 1)[1] for line in result["output"].splitlines()
                                 if line.startswith("TRANSFORMS ")))
    return {"wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "peak_rss_gib": result["peak_tree_rss_gib"],
            "transforms": transforms}


def transfer_mask(case: dict, transforms: list[str], out: Path) -> np.ndarray:
    from bids_postop.core.registration import apply_transforms

    apply_transforms(case["preop_mask"], case["fixed"], transforms, interpolation="nearest", out_file=out)
    return np.asanyarray(nib.load(out).dataobj) > 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=[*RIGID_CASES, *WARP_CASES], choices=[*RIGID_CASES, *WARP_CASES])
    parser.add_argument("--candidates", nargs="+", default=["full", "adopted"], choices=sorted(CANDIDATES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    cases = make_cases(workdir, args.cases)
    print(f"machine: {json.dumps(machine())}", flush=True)
    results_file = workdir / "registration_accuracy.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    new_rows = []
    for case_name in args.cases:
        case = cases[case_name]
        points = brain_points(case["mask"])
        truth = true_map(case["truth"], points)
        full_mask = None
        for name in args.candidates:
            load = machine()["load_average"]
            prefix = workdir / "runs" / case_name / f"{name}_"
            prefix.parent.mkdir(parents=True, exist_ok=True)
            run = run_candidate(case, name, CANDIDATES[name], prefix, args.threads)
            err = np.linalg.norm(estimated_map(run["transforms"], points) - truth, axis=1)
            row = {"case": case_name, "candidate": name, "kind": case["kind"], "threads": args.threads,
                   "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_rss_gib": run["peak_rss_gib"],
                   "error_mean_mm": round(float(err.mean()), 3),
                   "error_p95_mm": round(float(np.percentile(err, 95)), 3),
                   "error_max_mm": round(float(err.max()), 3), "load_before": load,
                   "settings": CANDIDATES[name].describe()}
            if "preop_mask" in case:
                moved = transfer_mask(case, run["transforms"], prefix.parent / f"{name}_mask.nii.gz")
                truth_mask = np.asanyarray(nib.load(case["truth_mask"]).dataobj) > 0
                row["dice_truth"] = round(dice(moved, truth_mask), 4)
                if name == "full":
                    full_mask = moved
                full_file = prefix.parent / "full_mask.nii.gz"
                if full_mask is None and full_file.exists():
                    full_mask = np.asanyarray(nib.load(full_file).dataobj) > 0
                row["dice_full"] = round(dice(moved, full_mask), 4) if full_mask is not None else None
            print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
            new_rows.append(row)
            rows.append(row)
            results_file.write_text(json.dumps(rows, indent=1))
    print("\n| case | candidate | wall s | CPU s | error mean / p95 / max mm | Dice vs full / truth | load |")
    print("|---|---|---|---|---|---|---|")
    for r in new_rows:
        dices = f"{r.get('dice_full', '–')} / {r.get('dice_truth', '–')}" if "dice_truth" in r else "–"
        print(f"| {r['case']} | {r['candidate']} | {r['wall_s']} | {r['cpu_s']} | {r['error_mean_mm']} / "
              f"{r['error_p95_mm']} / {r['error_max_mm']} | {dices} | {r['load_before'][0]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
