"""Benchmark of the group level on a synthetic cohort (run by hand; results in benchmarks/RESULTS.md).

    python benchmarks/group_level.py --n 1000 --workdir /tmp/bench_group [--reuse] [--medpy 5]

Synthesizes ``--n`` participants with 256×256×160 masks (0.9×0.9×1.2 mm): a participant-level output
dataset (residual mask + measures TSV per session), a manual dataset with two raters (reference masks
without ``desc`` and ``desc-r2``), six sites in five folds plus a hold-out site, then times
:func:`bids_postop.group.run_group_level` end to end. ``--medpy K`` also times MedPy's hd95 on the full
grid for K patients and checks that the values equal ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_postop.bids.derivatives import SessionOutputs, summary_row
from bids_postop.core.postprocess import classify_resection, volume_ml

SHAPE = (256, 256, 160)
SPACING = (0.9, 0.9, 1.2)
AFFINE = np.diag([*SPACING, 1.0])
SITES = ("amsterdam", "trondheim", "milan", "paris", "vienna", "st-louis")


def _save(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))


def _blobs(rng: np.random.Generator, centre: np.ndarray, n: int, radius: tuple[float, float]) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    for _ in range(n):
        r = rng.uniform(*radius, size=3)
        c = np.clip(centre + rng.normal(0, 6, 3), r + 1, np.array(SHAPE) - r - 2)
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, SHAPE)
        grid = np.indices(tuple(hi - lo)).astype(float) + lo[:, None, None, None]
        inside = (((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= inside
    return mask


def make_participant(args: tuple[Path, int]) -> None:
    root, i = args
    rng = np.random.default_rng(i)
    label, site = f"{i:04d}", SITES[i % len(SITES)]
    anat = root / "bids" / "derivatives" / "manual" / f"sub-{label}" / "ses-postop" / "anat"
    if (anat / f"sub-{label}_ses-postop_desc-r2_label-tumor_mask.nii.gz").exists():
        return  # written by an earlier, interrupted synthesis
    centre = np.array(SHAPE) / 2 + rng.normal(0, 25, 3)
    gtr = rng.random() < 0.35
    truth = _blobs(rng, centre, int(rng.integers(0, 2)), (1.0, 2.0)) if gtr else \
        _blobs(rng, centre, int(rng.integers(1, 5)), (2.0, 8.0))
    pred = np.roll(truth, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    if rng.random() < 0.3:  # a false-positive fragment (blood, vessel)
        pred |= _blobs(rng, centre + rng.normal(0, 15, 3), 1, (1.5, 4.0))
    if rng.random() < 0.1:
        pred[:] = False
    rater2 = np.roll(truth, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
    out = SessionOutputs.for_source(root / "out", Path(f"sub-{label}_ses-postop_ce-gd_T1w.nii.gz"), label, "postop")
    _save(out.residual_mask, pred)
    ml = volume_ml(pred, SPACING)
    out.measures_tsv.write_text(summary_row({
        "participant_id": f"sub-{label}", "session_id": "ses-postop", "site": site, "config": "B",
        "model": "nnunet-B", "residual_volume_ml": ml, "resection_status": classify_resection(ml)}))
    _save(anat / f"sub-{label}_ses-postop_label-tumor_mask.nii.gz", truth)
    _save(anat / f"sub-{label}_ses-postop_desc-r2_label-tumor_mask.nii.gz", rater2)


def synthesize(root: Path, n: int, workers: int) -> None:
    (root / "bids").mkdir(parents=True, exist_ok=True)
    (root / "bids" / "participants.tsv").write_text(
        "participant_id\tsite\n" + "".join(f"sub-{i:04d}\t{SITES[i % len(SITES)]}\n" for i in range(n)))
    (root / "folds.tsv").write_text("site\tfold\n" + "".join(
        f"{s}\t{'test' if k == len(SITES) - 1 else k + 1}\n" for k, s in enumerate(SITES)))
    (root / "groups.tsv").write_text("rater\tgroup\nmanual\texpert\nr2\tnovice\n")
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(make_participant, [(root, i) for i in range(n)], chunksize=8))


def time_medpy(root: Path, k: int) -> str:
    from medpy.metric.binary import hd95 as medpy_hd95

    from bids_postop.evaluation.metrics import hd95

    lines, ours_t, medpy_t = [], 0.0, 0.0
    masks = sorted((root / "out").glob("sub-*/ses-postop/anat/*_desc-residual_mask.nii.gz"))
    done = 0
    for pred_path in masks:
        label = pred_path.name.split("_")[0]
        truth_path = root / "bids/derivatives/manual" / label / "ses-postop/anat" / \
            f"{label}_ses-postop_label-tumor_mask.nii.gz"
        pred, truth = (np.asanyarray(nib.load(str(p)).dataobj) > 0 for p in (pred_path, truth_path))
        if not (pred.any() and truth.any()):
            continue
        t0 = time.perf_counter()
        ours = hd95(pred, truth, SPACING).value
        t1 = time.perf_counter()
        ref = medpy_hd95(pred, truth, voxelspacing=SPACING)
        t2 = time.perf_counter()
        ours_t, medpy_t = ours_t + t1 - t0, medpy_t + t2 - t1
        lines.append(f"{label}: ours {ours:.6f} mm, MedPy {ref:.6f} mm, |diff| {abs(ours - ref):.1e}")
        done += 1
        if done == k:
            break
    lines.append(f"HD95 per patient: ours {ours_t / done * 1000:.1f} ms (bounding box), "
                 f"MedPy {medpy_t / done * 1000:.0f} ms (full grid)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_group"))
    parser.add_argument("--reuse", action="store_true", help="time an already synthesized cohort (no synthesis); "
                        "without it, participants already written are kept and the others synthesized")
    parser.add_argument("--workers", type=int, default=2, help="processes for the synthesis only")
    parser.add_argument("--medpy", type=int, default=0, help="also compare HD95 with MedPy on K patients")
    args = parser.parse_args()
    root = args.workdir
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; n = {args.n}, shape {SHAPE}", flush=True)
    if not args.reuse:
        t = time.perf_counter()
        synthesize(root, args.n, args.workers)
        print(f"synthesis: {time.perf_counter() - t:.0f} s", flush=True)
    from bids_postop.group import run_group_level

    for old in (root / "out" / "group").glob("*"):
        if old.is_file():
            old.unlink()
    t = time.perf_counter()
    files = run_group_level(root / "out", bids_dir=root / "bids", manual={"manual": root / "bids/derivatives/manual"},
                            rater_groups_tsv=root / "groups.tsv", folds_tsv=root / "folds.tsv",
                            progress=lambda m: print(f"  [{time.perf_counter() - t:6.1f} s] {m}", flush=True))
    elapsed = time.perf_counter() - t
    print(f"group level: {elapsed:.1f} s for {args.n} sessions ({elapsed / args.n * 1000:.0f} ms per session, "
          f"{len(files)} files written)")
    if args.medpy:
        print(time_medpy(root, args.medpy))


if __name__ == "__main__":
    main()
