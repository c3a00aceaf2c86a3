"""``bids_postop-demo OUTDIR``: build the simulated demo dataset and run the participant level on it.

The dataset is made from real pre-operative scans shipped in the package (a resection cavity carved into
the real tumour, residual enhancing fragments on its rim for some participants, blood and a thin
non-tumour enhancing rim as distractors); the model is the embedded demo model — for simulated data,
not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bids_postop-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="where the demo BIDS dataset and its derivatives are written")
    parser.add_argument("--seed", type=int, default=None,
                        help="simulation seed (default: 0; with --training-set: 1000, and at least 1000)")
    parser.add_argument("--participants", type=int, default=None,
                        help="number of participants (default: 4, min 4; with --training-set: 32)")
    parser.add_argument("--training-set", action="store_true",
                        help="write a simulated BIDS training set for bids_postop-train instead (all inputs, "
                             "--sites hospitals, manual and pre-op masks as derivatives; seeds >= 1000, disjoint "
                             "from the demo's) and stop: see docs/training.md")
    parser.add_argument("--sites", type=int, default=4, help="with --training-set: number of sites, 2-6 (default: 4)")
    parser.add_argument("--nprocs", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dataset-only", action="store_true", help="write the dataset, do not run the pipeline")
    return parser


def dice(a, b) -> float | None:
    import numpy as np

    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * float((a & b).sum()) / total


def compare_with_truth(root: Path, output_dir: Path) -> str:
    """A small table: predicted vs simulated residual volume and Dice, per participant (the masks each measures
    file names, so a stale mask of an earlier run is never compared)."""
    import json

    import nibabel as nib

    from bids_postop.core.images import voxel_sizes
    from bids_postop.core.postprocess import volume_ml

    lines = [f"{'participant':<12}{'true ml':>9}{'predicted ml':>14}{'true':>6}{'pred':>6}{'Dice':>7}"]
    for measures in sorted(output_dir.glob("sub-*/ses-*/*_measures.json")):
        data = json.loads(measures.read_text())
        sub = data["participant_id"]
        truth = next((root / "derivatives" / "manual" / sub).glob("ses-*/anat/*_label-tumor_mask.nii.gz"), None)
        pred = output_dir / data.get("outputs", {}).get("residual_mask", "missing")
        if truth is None or not pred.is_file():
            continue
        t_img, p_img = nib.load(truth), nib.load(pred)
        t_ml = volume_ml(t_img.get_fdata() > 0, voxel_sizes(t_img))
        d = dice(t_img.get_fdata(), p_img.get_fdata())
        m = data["measures"]
        lines.append(f"{sub:<12}{t_ml:>9.2f}{float(m['residual_volume_ml']):>14.2f}"
                     f"{'GTR' if t_ml < 0.175 else 'RT':>6}{m['resection_status']:>6}"
                     f"{'-' if d is None else f'{d:.2f}':>7}")
    return "\n".join(lines)


def demo_dataset_is_current(root: Path, *, seed: int, n_participants: int) -> bool:
    """Whether ``root`` already holds the demo dataset of this version, seed and size (a rerun then keeps it, so
    that the work folder's cached steps stay valid: rewriting the files would change their timestamps)."""
    import json

    from bids_postop import __version__

    stamp = root / ".bids_postop_demo.json"
    try:
        return json.loads(stamp.read_text()) == {"version": __version__, "seed": seed,
                                                 "n_participants": n_participants}
    except (OSError, ValueError):
        return False


def stamp_demo_dataset(root: Path, *, seed: int, n_participants: int) -> None:
    import json

    from bids_postop import __version__

    (root / ".bids_postop_demo.json").write_text(json.dumps({"version": __version__, "seed": seed,
                                                             "n_participants": n_participants}))


def write_training_set(parser: argparse.ArgumentParser, args: argparse.Namespace, root: Path) -> int:
    """``--training-set``: write the simulated training set and say how to train on it."""
    from bids_postop.demo.training_set import write_training_dataset

    seed = 1000 if args.seed is None else args.seed
    n = 32 if args.participants is None else args.participants
    print(f"bids_postop-demo: writing a simulated BIDS training set ({n} participants, {args.sites} sites, "
          f"seed {seed}) to {root}", flush=True)
    try:
        data = write_training_dataset(root, n_participants=n, n_sites=args.sites, seed=seed)
    except ValueError as exc:
        parser.error(str(exc))
    n_rt = sum(p.residual for p in data.participants)
    print(f"{len(data.participants)} participants ({n_rt} with residual tumour) at sites {', '.join(data.sites)}.\n"
          f"Train on it with bids_postop-train {root} WORK_DIR --manual manual={root / 'derivatives' / 'manual'} "
          f"-d preop={root / 'derivatives' / 'preop_masks'} ... (docs/training.md)", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    outdir = args.outdir.expanduser().resolve()
    if args.training_set:
        return write_training_set(parser, args, outdir)
    from bids_postop.demo.dataset import write_demo_dataset

    # OUTDIR/bids: the dataset (derivatives inside it, as BIDS apps expect); OUTDIR/work: intermediate files, kept
    # out of the dataset (bids_postop refuses a work folder inside its input)
    root, work = outdir / "bids", outdir / "work"
    seed, n = args.seed or 0, max(4, args.participants or 4)
    if demo_dataset_is_current(root, seed=seed, n_participants=n):
        print(f"bids_postop-demo: reusing the simulated BIDS dataset in {root}", flush=True)
    else:
        print(f"bids_postop-demo: writing the simulated BIDS dataset to {root}", flush=True)
        write_demo_dataset(root, seed=seed, n_participants=n)
        stamp_demo_dataset(root, seed=seed, n_participants=n)
    if args.dataset_only:
        return 0
    from bids_postop.cli.run import main as run_main

    output_dir = root / "derivatives" / "bids_postop"
    argv_run = [str(root), str(output_dir), "participant", "--model", "demo",
                "-d", f"preop={root / 'derivatives' / 'preop_masks'}", "-w", str(work), "--device", args.device]
    if args.nprocs:
        argv_run += ["--nprocs", str(args.nprocs)]
    code = run_main(argv_run)
    if (output_dir / "dataset_description.json").exists():
        print("\nDemo results against the simulated ground truth (demo model, simulated data — not for "
              "clinical use):\n" + compare_with_truth(root, output_dir), flush=True)
        print(f"\nDerivatives: {output_dir}")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
