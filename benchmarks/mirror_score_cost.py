"""What the review flag's mirror scores cost (issue #20): a fold ensemble with and without them, by hand.

    python benchmarks/mirror_score_cost.py --workdir /tmp/mirror_cost [--repeat 2] [--grid 430 461 180]

A 2-fold model (demo model B plus a second fold whose weights are fold 0's perturbed, as in
tests/test_nnunet_backend.py) segments a demo case resampled to ``--grid`` (default: the study case's grid), in
fresh processes: the ensemble alone (``mirror_scores=False``), then with each fold's mirror score (the passes ride
along in nnU-Net's sliding window as extra channels). Prints wall time and peak RSS of each run, and checks that
the ensemble probability is the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from bids_postop.segmentation.backend import predict
from bids_postop.segmentation.models import resolve_models
[card] = resolve_models(sys.argv[1])
files = sys.argv[2:4]
scores = sys.argv[4] == "1"
start = time.perf_counter()
out = predict(card, files, threads=2, keep_members=False, mirror_scores=scores, report=(report := {}))
took = time.perf_counter() - start
np.save(sys.argv[5], out.probability)
print(json.dumps({"seconds": round(took, 2), "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 2**20, 2), "mirror_scores": report.get("mirror_scores"), "engine": report.get("engine")}))
"""


def two_fold_model(work: Path) -> Path:
    """The tests' 2-fold model (tests/two_fold_model.py), made once in ``work``."""
    from bids_postop.segmentation.models import resolve_models

    root = work / "B2"
    if (root / "bids_postop_model.json").is_file():
        return root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from two_fold_model import write_two_fold_model

    [card] = [c for c in resolve_models("demo") if c.configuration == "B"]
    return write_two_fold_model(card.folder, root)


def case_on_grid(work: Path, grid: list[int]) -> list[Path]:
    import nibabel as nib
    import numpy as np
    from nibabel.processing import resample_from_to

    from bids_postop.demo.dataset import write_demo_dataset

    out = [work / f"{name}_grid.nii.gz" for name in ("t1ce", "t1")]
    if all(p.is_file() for p in out):
        return out
    bids = work / "bids"
    if not (bids / "participants.tsv").is_file():
        write_demo_dataset(bids, seed=0, n_participants=1)
    anat = bids / "sub-01" / "ses-postop" / "anat"
    t1ce = nib.load(anat / "sub-01_ses-postop_ce-gadolinium_T1w.nii.gz")
    extent = np.array(t1ce.shape[:3]) * np.array(t1ce.header.get_zooms()[:3])
    zooms = extent / np.array(grid)
    affine = t1ce.affine.copy()
    affine[:3, :3] = t1ce.affine[:3, :3] / np.array(t1ce.header.get_zooms()[:3]) * zooms
    for src, dst in zip((anat / "sub-01_ses-postop_ce-gadolinium_T1w.nii.gz", anat / "sub-01_ses-postop_T1w.nii.gz"),
                        out, strict=True):
        img = resample_from_to(nib.load(src), (tuple(grid), affine), order=1)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), affine), dst)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--grid", type=int, nargs=3, default=[430, 461, 180])
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, files = two_fold_model(work), case_on_grid(work, args.grid)
    results = {}
    for variant in ("ensemble", "with mirror scores"):
        runs = []
        for k in range(args.repeat):
            done = subprocess.run([sys.executable, "-c", CHILD, str(model), *map(str, files),
                                   "1" if variant != "ensemble" else "0", str(work / f"{variant[0]}{k}.npy")],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(variant, runs[-1], flush=True)
        results[variant] = runs
    import numpy as np

    same = np.array_equal(np.load(work / "e0.npy"), np.load(work / "w0.npy"))
    print(json.dumps({"grid": args.grid, "same_ensemble": bool(same), **results}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
