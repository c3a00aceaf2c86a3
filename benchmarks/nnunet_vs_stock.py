"""Benchmark: bids_postop's nnU-Net segmentation step against the stock ``nnUNetv2_predict`` CLI (by hand).

    python benchmarks/nnunet_vs_stock.py --workdir /tmp/bench_stock [--case study|large] [--folds 1] [--tta]
        [--quick] [--threads 2] [--device cpu|cuda] [--also-no-crop] [--also-torch] [--bf16] [--compiled]
        [--skip-stock]

Same model (benchmarks/make_study_models.py: the study's nnU-Net, random weights; ``--quick``: the ~8× cheaper
variant), same skull-stripped two-channel input (benchmarks/study_cases.py, T1w-CE and T1w zeroed outside the
HD-BET brain mask, stored in RAS+ voxel order so that nnU-Net's SimpleITK reader and bids_postop's nibabel
path give the network the very same array), same folds and mirroring setting. Each side runs in a fresh
process and is timed from start to its written outputs:

- **stock**: ``nnUNetv2_predict -i IN -o OUT -d 990 -c 3d_fullres -f 0 … -npp 1 -nps 1 -device cpu
  --save_probabilities [--disable_tta]`` (writes the segmentation, the ``.npz`` probabilities and a ``.pkl``);
- **ours**: ``bids_postop.segmentation.nnunet.predict_probability`` + writing the probability NIfTI, as the
  pipeline's segment step does, with the default engine (onnxruntime on the CPU; ``--also-torch``: once more
  with the torch engine; ``--also-no-crop``: once more with ``crop=False``, i.e. nnU-Net's
  ``predict_single_npy_array`` on the whole grid; ``--bf16``: once more with bfloat16 autocast, the
  ``--fast`` preset's precision, which runs with torch; ``--compiled``: once more with ``engine="compiled"``,
  torch.compile with frozen weights, and with ``--bf16`` also in bf16; the compile is timed too: a cold
  inductor cache costs more than a warm one, see the run's order).

Reported: wall time, peak RSS (process tree), time ratio ours/stock, and agreement with stock: Dice of the
foreground (ours > 0.5 vs stock's argmax) and the largest absolute probability difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_cases import CASES, machine, make_case, run_measured, skull_stripped_channels  # noqa: E402

DATASET = "Dataset990_StudySizeB"


def ours_command(model: Path, inputs: list[Path], out: Path, *, folds: int, tta: bool, threads: int, device: str,
                 crop: bool = True, bf16: bool = False, engine: str = "auto") -> list[str]:
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads({threads})
        from bids_postop.core.images import write_like
        from bids_postop.segmentation.models import resolve_models
        from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability
        import nibabel as nib
        [card] = resolve_models({str(model)!r})
        files = {[str(p) for p in inputs]!r}
        report = {{}}
        prob = predict_probability(card, files, report=report, options=NnUNetOptions(
            device={device!r}, use_mirroring={tta!r}, folds=tuple(range({folds})), threads={threads}, crop={crop!r},
            bf16={bf16!r}, engine={engine!r}))
        write_like(prob, nib.load(files[0]), {str(out)!r})
        print("REPORT", report)
    """)
    return [sys.executable, "-c", code]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=None, help="model folder (default: WORKDIR/models)")
    parser.add_argument("--case", default="study", choices=sorted(CASES))
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (both sides)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--also-no-crop", action="store_true", help="also time ours without the pre-crop")
    parser.add_argument("--also-torch", action="store_true", help="also time ours with the torch engine (fp32)")
    parser.add_argument("--bf16", action="store_true", help="also time ours with bfloat16 autocast (CPU)")
    parser.add_argument("--compiled", action="store_true",
                        help="also time ours with --nnunet-engine compiled, in fp32 and (with --bf16) in bf16")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--skip-ours", action="store_true",
                        help="reuse the default run's output of an earlier run (agreement only, no timing)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    models = (args.models or workdir / "models").resolve()
    import make_study_models as msm

    model = models / ("nnunet_B_quick" if args.quick else "nnunet_B")
    if len(list((model / "nnunet").glob("fold_*/checkpoint_final.pth"))) < args.folds:
        msm.build_nnunet_model(models, folds=max(5, args.folds), quick=args.quick)
    files = make_case(args.case, workdir / "cases" / args.case)
    inputs = skull_stripped_channels(files, workdir / "inputs" / args.case)
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    tag = f"{args.case}_f{args.folds}{'_tta' if args.tta else ''}{'_quick' if args.quick else ''}"
    runs: dict[str, dict] = {}

    def ours(name: str, **kw) -> None:
        out = workdir / "ours" / tag / f"{name}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        load = machine()["load_average"]
        result = run_measured(ours_command(model, inputs, out, folds=args.folds, tta=args.tta, threads=args.threads,
                                           device=args.device, **kw))
        if result["returncode"] != 0:
            sys.exit(f"{name} failed:\n{result['output'][-3000:]}")
        runs[name] = {**{k: v for k, v in result.items() if k != "output"}, "load_before": load, "file": str(out)}
        print(f"{name}: {result['wall_s']} s wall, {result['cpu_s']} s CPU, "
              f"peak RSS {result['peak_tree_rss_gib']} GiB (load {load})", flush=True)

    previous = workdir / "ours" / tag / "ours.nii.gz"
    if args.skip_ours and previous.is_file():  # the reference for the other runs' agreement, from an earlier run
        runs["ours"] = {"file": str(previous), "reused": True}
    else:
        ours("ours")
    if not args.skip_stock:
        results = workdir / "nnUNet_results"
        target = results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to((model / "nnunet").resolve())
        env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(workdir / "nnUNet_raw"),
               "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed")}
        out_dir = workdir / "stock" / tag
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.iterdir():
            old.unlink()
        exe = Path(sys.executable).with_name("nnUNetv2_predict")
        command = [str(exe), "-i", str(inputs[0].parent), "-o", str(out_dir), "-d", "990", "-c", "3d_fullres",
                   "-f", *[str(f) for f in range(args.folds)], "-npp", "1", "-nps", "1", "-device", args.device,
                   "--save_probabilities", *([] if args.tta else ["--disable_tta"])]
        load = machine()["load_average"]
        print("stock:", " ".join(command), flush=True)
        result = run_measured(command, env=env)
        if result["returncode"] != 0:
            sys.exit(f"stock failed:\n{result['output'][-3000:]}")
        runs["stock"] = {**{k: v for k, v in result.items() if k != "output"}, "load_before": load}
        print(f"stock: {result['wall_s']} s wall, {result['cpu_s']} s CPU, "
              f"peak RSS {result['peak_tree_rss_gib']} GiB (load {load})", flush=True)
    if args.also_no_crop:
        ours("ours_no_crop", crop=False)
    if args.also_torch:
        ours("ours_torch", engine="torch")
    if args.bf16:
        ours("ours_bf16", bf16=True)
    if args.compiled:
        ours("ours_compiled", engine="compiled")
        if args.bf16:
            ours("ours_bf16_compiled", bf16=True, engine="compiled")

    ref = np.asarray(nib.load(runs["ours"]["file"]).dataobj, dtype=np.float32)
    summary = {"case": args.case, "folds": args.folds, "tta": args.tta, "quick": args.quick, "threads": args.threads,
               "device": args.device, "machine": info, "runs": runs}
    if "stock" in runs:
        stock = np.load(workdir / "stock" / tag / "case.npz")["probabilities"][1].transpose(2, 1, 0)
        stock_seg = np.asarray(nib.load(workdir / "stock" / tag / "case.nii.gz").dataobj) == 1
        summary["vs_stock"] = {}
        for name, run in runs.items():
            if name == "stock" or run.get("reused"):
                continue
            prob = np.asarray(nib.load(run["file"]).dataobj, dtype=np.float32)
            summary["vs_stock"][name] = {
                "time_ratio": round(run["wall_s"] / runs["stock"]["wall_s"], 3),
                "cpu_ratio": round(run["cpu_s"] / runs["stock"]["cpu_s"], 3),
                "dice": round(dice(prob > 0.5, stock_seg), 5),
                "max_abs_prob_diff": float(np.abs(prob - stock).max()),
                "stock_foreground_voxels": int(stock_seg.sum())}
    summary["vs_ours"] = {}
    for name in ("ours_bf16", "ours_compiled", "ours_bf16_compiled"):
        if name in runs:
            prob = np.asarray(nib.load(runs[name]["file"]).dataobj, dtype=np.float32)
            summary["vs_ours"][name] = {"dice": round(dice(prob > 0.5, ref > 0.5), 5),
                                        "max_abs_prob_diff": float(np.abs(prob - ref).max())}
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1))
    out = workdir / f"summary_{tag}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
