"""Benchmark: the whole participant level on realistic grids, per step, for study-size models (by hand, not CI).

    python benchmarks/participant_speed.py --workdir /tmp/bench_speed \\
        [--cases study large] [--variants nnunet-f1 nnunet-f1-tta nnunet-f5 nnunet-f5-tta agunet] \\
        [--quick] [--nprocs 2] [--device cpu|cuda] [--code DIR]

For each case (see benchmarks/study_cases.py: ``study`` = 430×461×180 at 0.67×0.64×1.96 mm, ``large`` =
512×512×200 at 0.5×0.5×1 mm; a real head with skull, configuration B: T1w-CE + T1w) and each model variant,
runs ``bids_postop BIDS OUT participant`` in a fresh process with a fresh work directory and records:

- the wall time of the whole run and of every step (the run log's ``sub-X: <node> done N s`` lines);
- the peak resident memory of the run's process tree (summed over processes, sampled every 0.25 s) and of
  its largest process.

Variants: ``nnunet-f<K>[-tta]`` the study-size nnU-Net (benchmarks/make_study_models.py, random weights)
with K folds averaged, with/without mirroring test-time augmentation; ``nnunet-fast`` the same model with
``--fast`` (first fold, no mirroring, bf16 where the CPU has it), ``nnunet-fast-compiled`` with
``--nnunet-engine compiled`` too (torch.compile, frozen weights); a ``-torch`` suffix runs the networks with
torch instead of the CPU default onnxruntime (``--nnunet-engine torch``); ``agunet`` the AGU-Net-size
full-volume ONNX model (Raidionics format); ``agunet-E`` the same network with configuration E's five channels, on
the case with all of E's inputs (study_cases.make_preop: FLAIR, a pre-op T1w-CE of the same size made from the same
real head by a known warp, and its tumour mask), so the run registers two rigid series and one SyN (issue 18's
whole-participant target: ≤ 90 s, ≤ 6 GiB on 2 idle cores). ``--code DIR`` runs the bids_postop package found in
DIR (e.g. ``git archive <commit> bids_postop | tar -x -C DIR``) instead of the installed one, for before/after
rows measured back to back. ``--quick`` uses the
``nnunet_B_quick`` model (same network, 2× coarser spacing, half patch: ~8× less network work) to check the
script in minutes; its numbers are not the study model's.

Results go to ``<workdir>/results.json`` (appended per run) and a Markdown table on stdout. The machine
should be otherwise idle. On a GPU: ``--device cuda`` (the GPU target is 5-fold + TTA ≤ 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_cases import CASES, machine, make_case, make_preop, run_measured, write_bids  # noqa: E402

VARIANTS = ("nnunet-f1", "nnunet-f1-tta", "nnunet-f5", "nnunet-f5-tta", "nnunet-fast", "nnunet-fast-compiled", "agunet",
            "nnunet-f1-torch", "nnunet-f1-tta-torch", "nnunet-f5-tta-torch", "agunet-E")


def model_for(variant: str, models: Path, *, quick: bool) -> tuple[Path, list[str]]:
    """The --model folder and extra CLI options of a variant (building the models when missing)."""
    import make_study_models as msm

    if variant in ("agunet", "agunet-E"):
        configuration = "E" if variant == "agunet-E" else "B"
        folder = models / f"agunet_{configuration}" / f"MRI_GBM_Postop_FV_{'ABCDE'.index(configuration) + 1}p"
        if not (folder / "model.onnx").is_file():
            msm.build_agunet_model(models, configuration=configuration)
        return folder, ["--config", configuration]
    base = models / ("nnunet_B_quick" if quick else "nnunet_B")
    if len(list((base / "nnunet").glob("fold_*/checkpoint_final.pth"))) < 5:
        msm.build_nnunet_model(models, folds=5, quick=quick)
    if variant == "nnunet-fast":
        return base, ["--fast"]
    if variant == "nnunet-fast-compiled":
        return base, ["--fast", "--nnunet-engine", "compiled"]
    match = re.fullmatch(r"nnunet-f(\d)(-tta)?(-torch)?", variant)
    if not match:
        raise SystemExit(f"unknown variant {variant}; choose from {VARIANTS}")
    folds, tta = int(match.group(1)), bool(match.group(2))
    engine = ["--nnunet-engine", "torch"] if match.group(3) else []
    view = models / "variants" / f"{base.name}_f{folds}"
    if not (view / "bids_postop_model.json").is_file():  # a card that lists the folds, sharing the weights
        view.mkdir(parents=True, exist_ok=True)
        card = json.loads((base / "bids_postop_model.json").read_text())
        card["name"] = view.name
        card["nnunet"]["folds"] = list(range(folds))
        (view / "bids_postop_model.json").write_text(json.dumps(card, indent=2))
        (view / "nnunet").symlink_to((base / "nnunet").resolve())
    return view, ([] if tta else ["--no-tta"]) + engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=None, help="model folder (default: WORKDIR/models)")
    parser.add_argument("--cases", nargs="+", default=["study"], choices=sorted(CASES))
    parser.add_argument("--variants", nargs="+", default=["agunet", "nnunet-f1"], choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="the ~8x cheaper nnunet_B_quick model")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--keep", action="store_true", help="keep each run's work directory")
    parser.add_argument("--code", type=Path, default=None,
                        help="folder holding the bids_postop package to run (default: the installed one)")
    parser.add_argument("--tag", default="", help="suffix of the run names (e.g. before / after)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    models = (args.models or workdir / "models").resolve()
    results_file = workdir / "results.json"
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    rows = []
    env = None
    if args.code is not None:
        env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    import subprocess

    package = subprocess.run([sys.executable, "-c", "import bids_postop.core.registration as m; print(m.__file__)"],
                             capture_output=True, text=True, env=env, check=True,
                             cwd=args.code.resolve() if args.code is not None else None).stdout.strip()
    print(f"bids_postop used: {package}", flush=True)
    for case in args.cases:
        files = make_case(case, workdir / "cases" / case)
        for variant in args.variants:
            preop = make_preop(case, workdir / "cases" / case) if variant == "agunet-E" else None
            bids = workdir / (f"bids_{case}_E" if preop else f"bids_{case}")
            label = write_bids(case, files, bids, preop=preop)
            model, extra = model_for(variant, models, quick=args.quick)
            if preop:
                extra = [*extra, "-d", f"preop={bids / 'derivatives' / 'preop_masks'}"]
            tag = f"{case}_{variant}{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}"
            out, work = workdir / "out" / tag, workdir / "work" / tag
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            command = [sys.executable, "-m", "bids_postop.cli.run", str(bids), str(out), "participant",
                       "--participant-label", label, "-w", str(work), "--nprocs", str(args.nprocs),
                       "--device", args.device, "--skip-bids-validation", "--model", str(model), *extra]
            load_before = machine()["load_average"]
            print(f"\n[{tag}] {' '.join(command)}  (load {load_before})", flush=True)
            # `python -m` puts the working directory first on sys.path: run from --code's folder so that its package,
            # not a checkout in the current directory, is the one imported (the workers inherit the parent's path)
            result = run_measured(command, log=workdir / f"{tag}.log", env=env,
                                  cwd=args.code.resolve() if args.code is not None else None)
            steps = {name: float(sec) for name, _, sec in
                     re.findall(rf"sub-{label}: (\S+)\s+(done  |FAILED)\s+([\d.]+) s", result["output"])}
            row = {"case": case, "variant": variant, "tag": args.tag, "code": str(args.code or "installed"),
                   "quick": args.quick, "device": args.device,
                   "nprocs": args.nprocs, "wall_s": result["wall_s"], "cpu_s": result["cpu_s"],
                   "peak_tree_rss_gib": result["peak_tree_rss_gib"],
                   "peak_process_rss_gib": result["peak_process_rss_gib"], "returncode": result["returncode"],
                   "steps_s": steps, "load_before": load_before, "load_after": machine()["load_average"],
                   "package": package,
                   "machine": {k: v for k, v in info.items() if k != "load_average"}}
            rows.append(row)
            for name, sec in steps.items():
                print(f"  {name:<28}{sec:8.1f} s")
            print(f"  total {row['wall_s']} s wall, {row['cpu_s']} s CPU, peak RSS {row['peak_tree_rss_gib']} GiB "
                  f"(tree) / {row['peak_process_rss_gib']} GiB (largest process), exit {row['returncode']}", flush=True)
            if result["returncode"] != 0:
                print(result["output"][-3000:], file=sys.stderr)
            previous = json.loads(results_file.read_text()) if results_file.exists() else []
            results_file.write_text(json.dumps(previous + [row], indent=1))
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print("\n| case | variant | total s (wall / CPU) | brain extraction s | registration s | segment s | "
          "postprocess s | peak RSS GiB (tree / process) | load before → after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["steps_s"]
        reg = sum(v for k, v in s.items() if k.startswith("register_"))
        print(f"| {r['case']} | {r['variant']}{' (quick)' if r['quick'] else ''} | {r['wall_s']} / {r['cpu_s']} | "
              f"{s.get('brain_extraction', float('nan')):.1f} | {reg:.1f} | {s.get('segment', float('nan')):.1f} | "
              f"{s.get('postprocess', float('nan')):.1f} | {r['peak_tree_rss_gib']} / {r['peak_process_rss_gib']} | "
              f"{r['load_before'][0]} → {r['load_after'][0]} |")
    print("\nEach step's share of the participant (wall seconds from the run log; steps overlap with --nprocs > 1, so "
          "shares are of the summed step time):")
    for r in rows:
        total = sum(r["steps_s"].values()) or float("nan")
        shares = ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f} %)"
                           for k, v in sorted(r["steps_s"].items(), key=lambda kv: -kv[1]))
        print(f"- {r['case']} {r['variant']} {r['tag']}: {shares}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
