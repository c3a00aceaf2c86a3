"""Train the tiny demo nnU-Net v2 models shipped in ``bids_postop/data/models/demo/<CONFIG>/``.

Usage (CPU, about 10–15 min per configuration on 2 cores; uses a GPU if one is visible)::

    python scripts/train_demo_model.py --configs B E A [--workdir /tmp/bids_postop_demo_train]
        [--n-train 48] [--n-val 8] [--epochs 25] [--iterations 12] [--seed 1000]

What it does, per configuration (channels in the role order of
``bids_postop.configurations.CONFIGURATIONS[CONFIG]``):

1. Simulates post-operative cases (``bids_postop.demo.simulate``) from the three shipped real cases,
   RT (70 %) and GTR mixed, with random left-right flips and small rotations, and resamples them onto
   grids like the demo sites (1.2 mm isotropic RAS, or 0.9×0.9×2.5 mm LPS tilted by a few degrees).
   Seeds start at ``--seed`` (default 1000): disjoint from those ``write_demo_dataset`` uses (< 1000).
   The pre-operative channels get a small random misregistration (≤ 2°, ≤ 1.5 mm).
2. Writes an nnU-Net raw dataset following the conventions of the inference code: skull-stripped
   (0 outside the brain), RAS+ voxel order (``nibabel.as_closest_canonical``), one file per channel
   ``case_XXX_000c.nii.gz``; channel names "T1w-CE", "T1w", "FLAIR", "preop-T1w-CE" (z-score) and
   "noNorm" for the binary pre-operative mask; labels {"background": 0, "residual_tumor": 1}.
3. Plans with the default planner (``-np 1 -npfp 2`` equivalents), then overrides the 3d_fullres
   plan to a tiny PlainConvUNet (4 stages, 8/16/32/64 features, 3×3×3 kernels, patch 64³, batch 2,
   target spacing 1.5 mm isotropic) and preprocesses.
4. Trains fold 0 with ``nnUNetTrainer`` through the API: all training cases in the train split,
   the ``--n-val`` held-out cases as validation split.
5. Copies plans.json and dataset.json and a stripped ``fold_0/checkpoint_final.pth`` (network weights,
   trainer name, init args, mirroring axes only; readable with ``torch.load(weights_only=True)``) into
   ``bids_postop/data/models/demo/<CONFIG>/nnunet/``. Test-time mirroring is restricted to left-right
   (``inference_allowed_mirroring_axes = (2,)``: 2 instead of 8 passes per tile).
6. Chooses the inference patch size written into the shipped plans.json (96³ — fewer, cheaper-per-voxel
   tiles on CPU — unless 64³, the training patch, scores clearly better on the held-out cases) and the
   probability threshold on the held-out cases with the shipped (stripped) model: maximise (mean Dice
   over cases with non-empty truth and prediction + patient-wise recall) / 2 over 0.1…0.9 after
   removing components < 20 voxels; 0.5 when no case gives a meaningful score.
7. Writes the model card ``bids_postop_model.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bids_postop.configurations import CONFIGURATIONS  # noqa: E402
from bids_postop.demo import simulate as sim  # noqa: E402

CHANNEL_NAMES = {
    "postop_t1ce": "T1w-CE",
    "postop_t1": "T1w",
    "postop_flair": "FLAIR",
    "preop_t1ce": "preop-T1w-CE",
    "preop_mask": "noNorm",
}
DATASET_IDS = {"A": 941, "B": 942, "C": 943, "D": 944, "E": 945}
TARGET_SPACING = 1.5
PATCH = [64, 64, 64]
FEATURES = [8, 16, 32, 64]
INFERENCE_PATCHES = ([96, 96, 96], [64, 64, 64])  # shipped plans get the first unless clearly worse
# test-time mirroring only left-right: axis 2 of the (z, y, x) = transpose(2,1,0) of RAS+ arrays
MIRROR_AXES = (2,)
MIN_COMPONENT_VOXELS = 20
GTR_ML = 0.175


def _site_grid(rng: np.random.Generator, case: sim.SimulatedCase, rot: np.ndarray):
    if rng.random() < 0.5:
        spacing, axcodes, tilt = (1.2, 1.2, 1.2), "RAS", np.eye(3)
    else:
        spacing, axcodes = (0.9, 0.9, 2.5), "LPS"
        tilt = sim.rotation_matrix(rng.uniform(-5, 5, size=3))
    return sim.grid_covering(
        case.brain_mask, case.affine, spacing=spacing, axcodes=axcodes, rotation=tilt @ rot, margin_mm=8.0
    )


def make_pool(pool: Path, n: int, seed0: int, rt_fraction: float = 0.7) -> list[dict]:
    """Simulate ``n`` cases (seeds seed0…seed0+n-1) and write all five roles + label as RAS+ NIfTI."""
    import nibabel as nib

    pool.mkdir(parents=True, exist_ok=True)
    meta = []
    for i in range(n):
        seed = seed0 + i
        rng = np.random.default_rng(seed)
        name = sim.CASE_NAMES[int(rng.integers(len(sim.CASE_NAMES)))]
        residual = bool(rng.random() < rt_fraction)
        case = sim.load_case(name)
        s = sim.simulate_postop_case(case, rng, residual=residual)
        flip = rng.random() < 0.5
        rot = sim.rotation_matrix(rng.uniform(-8, 8, size=3))
        shape, aff = _site_grid(rng, s, rot)
        center = np.append(np.argwhere(s.brain_mask).mean(axis=0), 1.0) @ s.affine.T
        misreg = sim.random_rigid(rng, center[:3], degrees=(0.0, 2.0), mm=(0.0, 1.5))
        src_aff = s.affine.copy()  # a flip mirrors the head left-right: axis 0 of the RAS+ arrays
        brain = sim.resample_to_grid(_maybe_flip(s.brain_mask, flip), src_aff, shape, aff, order=0) > 0
        out = {}
        for role, arr in s.role_images().items():
            arr = _maybe_flip(arr, flip)
            motion = misreg if role.startswith("preop") else None
            order = 0 if role == "preop_mask" else 1
            r = sim.resample_to_grid(arr, src_aff, shape, aff, order=order, world_transform=motion)
            out[role] = ((r > 0) & brain).astype(np.uint8) if role == "preop_mask" else sim.to_int16(r * brain)
        label = sim.resample_to_grid(_maybe_flip(s.residual_mask, flip), src_aff, shape, aff, order=0) > 0
        label &= brain
        files = {}
        for role, arr in {**out, "label": label.astype(np.uint8)}.items():
            img = nib.as_closest_canonical(nib.Nifti1Image(arr, aff))
            img = nib.Nifti1Image(np.asarray(img.dataobj).astype(arr.dtype), img.affine)
            img.set_qform(img.affine, code=1)
            img.set_sform(img.affine, code=1)
            f = pool / f"sim{seed:05d}_{role}.nii.gz"
            nib.save(img, str(f))
            files[role] = f.name
        vol = sim.mask_volume_ml(label, aff)
        meta.append({"seed": seed, "source": name, "residual": residual, "flip": flip, "volume_ml": vol,
                     "spacing": list(sim.voxel_sizes(aff)), "files": files})
        print(f"  case seed {seed}: {name} {'RT' if residual else 'GTR'} {vol:.2f} ml grid {shape}", flush=True)
    (pool / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _maybe_flip(arr: np.ndarray, flip: bool) -> np.ndarray:
    return np.ascontiguousarray(arr[::-1]) if flip else arr


def write_raw_dataset(raw_dir: Path, config: str, pool: Path, train: list[dict], val: list[dict]) -> list[str]:
    roles = CONFIGURATIONS[config]
    (raw_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    ids = []
    for m in train + val:
        cid = f"case_{m['seed']:05d}"
        ids.append(cid)
        for c, role in enumerate(roles):
            shutil.copy(pool / m["files"][role], raw_dir / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
        shutil.copy(pool / m["files"]["label"], raw_dir / "labelsTr" / f"{cid}.nii.gz")
    dataset_json = {
        "channel_names": {str(c): CHANNEL_NAMES[r] for c, r in enumerate(roles)},
        "labels": {"background": 0, "residual_tumor": 1},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
        "name": f"bids_postop demo configuration {config}",
        "description": "simulated post-operative cases made from real pre-operative scans (not clinical data)",
    }
    (raw_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return ids


def tiny_plans(plans: dict) -> dict:
    cfg = plans["configurations"]["3d_fullres"]
    cfg["spacing"] = [TARGET_SPACING] * 3
    cfg["patch_size"] = list(PATCH)
    cfg["batch_size"] = 2
    cfg["resampling_fn_data_kwargs"]["order"] = 1  # linear: faster than cubic, fine at 1.2–2.5 mm
    ak = cfg["architecture"]["arch_kwargs"]
    ak["n_stages"] = len(FEATURES)
    ak["features_per_stage"] = list(FEATURES)
    ak["kernel_sizes"] = [[3, 3, 3]] * len(FEATURES)
    ak["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (len(FEATURES) - 1)
    ak["n_conv_per_stage"] = [2] * len(FEATURES)
    ak["n_conv_per_stage_decoder"] = [2] * (len(FEATURES) - 1)
    for k in list(plans["configurations"]):
        if k != "3d_fullres":
            del plans["configurations"][k]
    return plans


def strip_checkpoint(src: Path, dst: Path) -> None:
    """Keep only what inference needs (no optimizer state); loadable with ``weights_only=True``."""
    from bids_postop.training.nnunet import strip_checkpoint as strip

    strip(src, dst, mirror_axes=MIRROR_AXES)


def load_canonical_stack(pool: Path, m: dict, roles) -> tuple[np.ndarray, list[float], np.ndarray, np.ndarray]:
    """nnU-Net input (C, z, y, x) from RAS+ files: array.transpose(2,1,0), spacing reversed."""
    import nibabel as nib

    chans = []
    for role in roles:
        img = nib.load(str(pool / m["files"][role]))
        chans.append(np.asarray(img.dataobj).astype(np.float32).transpose(2, 1, 0))
    lab = nib.load(str(pool / m["files"]["label"]))
    spacing = list(sim.voxel_sizes(img.affine))[::-1]
    return np.stack(chans), spacing, np.asarray(lab.dataobj) > 0, lab.affine


def remove_small(mask: np.ndarray, min_voxels: int = MIN_COMPONENT_VOXELS) -> np.ndarray:
    import cc3d

    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    counts = np.bincount(lab.ravel())
    keep = counts >= min_voxels
    keep[0] = False
    return keep[lab]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else float("nan")


def make_predictor(model_dir: Path, threads: int = 2):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                           perform_everything_on_device=False, device=torch.device("cpu"),
                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model_dir / "nnunet"), use_folds=(0,),
                                              checkpoint_name="checkpoint_final.pth")
    return pred


def predict_prob(pred, stack: np.ndarray, spacing: list[float]) -> np.ndarray:
    """Probability of residual tumour in RAS+ voxel order (x, y, z)."""
    _, probs = pred.predict_single_npy_array(stack, {"spacing": spacing}, None, None, True)
    return np.asarray(probs[1]).transpose(2, 1, 0)


def choose_threshold(probs: list[np.ndarray], truths: list[np.ndarray], affines: list[np.ndarray]) -> dict:
    rows = []
    for t in np.round(np.arange(0.1, 0.91, 0.1), 2):
        dices, tp, pos = [], 0, 0
        for p, g, aff in zip(probs, truths, affines, strict=True):
            m = remove_small(p >= t)
            vg, vp = sim.mask_volume_ml(g, aff), sim.mask_volume_ml(m, aff)
            if g.any() and m.any():
                dices.append(dice(m, g))
            if vg >= GTR_ML:
                pos += 1
                if vp >= GTR_ML and dice(m, g) >= 0.01:
                    tp += 1
        score = (np.mean(dices) + tp / pos) / 2 if dices and pos else float("nan")
        rows.append({"threshold": float(t), "mean_dice": float(np.mean(dices)) if dices else None,
                     "recall": tp / pos if pos else None, "score": None if np.isnan(score) else float(score)})
    valid = [r for r in rows if r["score"] is not None]
    if not valid or max(r["score"] for r in valid) < 0.05:
        return {"threshold": 0.5, "how": "no meaningful score on the validation cases: default 0.5", "table": rows}
    best = max(valid, key=lambda r: (round(r["score"], 6), -abs(r["threshold"] - 0.5)))
    return {"threshold": best["threshold"], "how": "maximised (mean Dice over cases with non-empty truth and "
            "prediction + patient-wise recall) / 2 over 0.1..0.9 on held-out simulated cases, after removing "
            f"components < {MIN_COMPONENT_VOXELS} voxels", "table": rows}


def train_config(config: str, args: argparse.Namespace, pool: Path, meta: list[dict]) -> None:
    import torch

    work = args.workdir
    did = DATASET_IDS[config]
    dname = f"Dataset{did}_DemoPostop{config}"
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[var] = str(work / sub)
    raw_dir = work / "raw" / dname
    for d in (raw_dir, work / "preprocessed" / dname, work / "results" / dname):
        shutil.rmtree(d, ignore_errors=True)
    train, val = meta[: args.n_train], meta[args.n_train :]
    write_raw_dataset(raw_dir, config, pool, train, val)

    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    t0 = time.time()
    extract_fingerprints([did], num_processes=2, check_dataset_integrity=True, verbose=False)
    plan_experiments([did])
    pp = work / "preprocessed" / dname
    plans = tiny_plans(load_json(str(pp / "nnUNetPlans.json")))
    save_json(plans, str(pp / "nnUNetPlans.json"), sort_keys=False)
    preprocess([did], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    save_json([{"train": [f"case_{m['seed']:05d}" for m in train],
                "val": [f"case_{m['seed']:05d}" for m in val]}], str(pp / "splits_final.json"))
    print(f"[{config}] planned and preprocessed in {time.time() - t0:.0f} s", flush=True)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    plans = load_json(str(pp / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(pp / "dataset.json"))
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=device)
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = 2
    trainer.oversample_foreground_percent = 0.5
    trainer.save_every = 10**6
    previous = None
    out = args.models_dir / config
    if args.init_from_shipped:  # fine-tune: start from the weights shipped now (fresh optimiser, LR schedule)
        previous = json.loads((out / "bids_postop_model.json").read_text())["training"]
        previous.setdefault("iterations_total", previous["epochs"] * previous["iterations"])
        trainer.initialize()
        ck = torch.load(out / "nnunet" / "fold_0" / "checkpoint_final.pth", map_location=device, weights_only=True)
        trainer.network.load_state_dict(ck["network_weights"])
        print(f"[{config}] initialised from the shipped weights ({previous['iterations_total']} iterations)",
              flush=True)
    t1 = time.time()
    trainer.run_training()
    train_s = time.time() - t1
    print(f"[{config}] trained in {train_s:.0f} s", flush=True)

    shutil.rmtree(out, ignore_errors=True)
    nn_out = out / "nnunet"
    nn_out.mkdir(parents=True)
    res = work / "results" / dname / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copy(res / "plans.json", nn_out / "plans.json")
    shutil.copy(res / "dataset.json", nn_out / "dataset.json")
    strip_checkpoint(res / "fold_0" / "checkpoint_final.pth", nn_out / "fold_0" / "checkpoint_final.pth")

    # inference patch and threshold on the held-out cases, with the stripped model as shipped
    roles = CONFIGURATIONS[config]
    stacks = [load_canonical_stack(pool, m, roles) for m in val]
    results = []
    for patch in INFERENCE_PATCHES:
        plans_file = nn_out / "plans.json"
        shipped = load_json(str(plans_file))
        shipped["configurations"]["3d_fullres"]["patch_size"] = list(patch)
        save_json(shipped, str(plans_file), sort_keys=False)
        pred = make_predictor(out)
        probs, secs = [], []
        for stack, spacing, _truth, _aff in stacks:
            t2 = time.time()
            probs.append(predict_prob(pred, stack, spacing))
            secs.append(time.time() - t2)
        thr = choose_threshold(probs, [s[2] for s in stacks], [s[3] for s in stacks])
        best = max((r["score"] or 0.0) for r in thr["table"])
        print(f"[{config}] inference patch {patch}: best score {best:.3f} at {thr['threshold']}, "
              f"{np.mean(secs):.1f} s/case", flush=True)
        results.append((patch, thr, secs, best))
    patch, thr, secs, _ = results[0]
    if results[1][3] > results[0][3] + 0.03:
        patch, thr, secs, _ = results[1]
    shipped = load_json(str(nn_out / "plans.json"))
    shipped["configurations"]["3d_fullres"]["patch_size"] = list(patch)
    save_json(shipped, str(nn_out / "plans.json"), sort_keys=False)
    card = {
        "schema_version": 1,
        "name": f"demo-{config}",
        "description": (f"Tiny nnU-Net v2 (3d_fullres PlainConvUNet, {len(FEATURES)} stages, features "
                        f"{FEATURES}, patch {PATCH}, {TARGET_SPACING} mm isotropic) for residual tumour on "
                        f"simulated early post-operative MRI, input configuration {config}."),
        "intended_use": "demo model for simulated data, not for clinical use",
        "architecture": "nnunet",
        "configuration": config,
        "channels": list(roles),
        "threshold": thr["threshold"],
        "inference_patch_size": list(patch),
        "threshold_selection": {"how": thr["how"], "n_validation_cases": len(val),
                                "validation_seeds": [m["seed"] for m in val], "table": thr["table"]},
        "nnunet": {"trained_model_folder": "nnunet", "folds": [0], "checkpoint": "checkpoint_final.pth"},
        "training": {
            "command": "python scripts/train_demo_model.py " + " ".join(sys.argv[1:]),
            "date": _dt.date.today().isoformat(),
            "n_cases": len(train),
            "epochs": args.epochs,
            "iterations": args.iterations,
            "batch_size": 2,
            "training_patch_size": list(PATCH),
            "test_time_mirroring_axes": "left-right only (checkpoint inference_allowed_mirroring_axes = (2,))",
            "training_seconds": round(train_s),
            "device": str(device),
            "iterations_total": args.epochs * args.iterations + (previous["iterations_total"] if previous else 0),
            "initialised_from": previous,
            "seeds": [m["seed"] for m in train],
            "versions": _versions(),
            "data": ("simulated post-operative cases (bids_postop.demo.simulate) from 3 real pre-operative "
                     "scans (TCGA-DU-7294, TCGA-FG-6692, BraTS-MET-00110-000), RT/GTR mixed, left-right "
                     "flips, rotations ±8°, resampled to 1.2 mm isotropic RAS or 0.9×0.9×2.5 mm LPS oblique "
                     "grids; skull-stripped, RAS+ (as_closest_canonical)"),
            "mean_validation_inference_seconds": round(float(np.mean(secs)), 1),
        },
    }
    (out / "bids_postop_model.json").write_text(json.dumps(card, indent=2) + "\n")
    size = (nn_out / "fold_0" / "checkpoint_final.pth").stat().st_size
    print(f"[{config}] threshold {thr['threshold']}; checkpoint {size / 1e6:.2f} MB; "
          f"inference {np.mean(secs):.1f} s/case; table {json.dumps(thr['table'])}", flush=True)


def _versions() -> dict:
    from importlib.metadata import version

    import nnunetv2  # noqa: F401
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
            "numpy": np.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["B", "E", "A"], choices=sorted(CONFIGURATIONS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bids_postop_demo_train"))
    parser.add_argument("--models-dir", type=Path, default=REPO / "bids_postop" / "data" / "models" / "demo")
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1000, help="first simulation seed (demo dataset uses < 1000)")
    parser.add_argument("--init-from-shipped", action="store_true",
                        help="fine-tune: start from the weights in --models-dir/<CONFIG> (recorded in the card)")
    args = parser.parse_args(argv)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    args.workdir.mkdir(parents=True, exist_ok=True)
    pool = args.workdir / "pool"
    n = args.n_train + args.n_val
    meta_file = pool / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else []
    if len(meta) != n or meta[0]["seed"] != args.seed:
        shutil.rmtree(pool, ignore_errors=True)
        t0 = time.time()
        meta = make_pool(pool, n, args.seed)
        print(f"simulated {n} cases in {time.time() - t0:.0f} s", flush=True)
    for config in args.configs:
        train_config(config, args, pool, meta)


if __name__ == "__main__":
    main()
