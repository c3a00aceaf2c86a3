"""Benchmark: accuracy of ``--fast`` (first fold, no mirroring, bf16 where the CPU has it) against the default
preset (all folds, mirroring, fp32 with onnxruntime) on simulated post-operative cases (run by hand, not in CI).

    python benchmarks/fast_preset_accuracy.py [--model demo|FOLDER] [--n 8] [--seed0 3000] [--threads 2]

Cases: ``bids_postop.demo.simulate`` (a cavity carved into a real tumour, residual fragments for RT cases,
blood and thin enhancing rims as distractors; 1.5 mm RAS, skull-stripped), half RT half GTR, seeds disjoint
from the demo models' training (1000–1047) and threshold-selection (1048–1055) seeds. Configuration B model
(``--model``, default: the shipped demo model — one fold, left-right mirroring, so there ``--fast`` only drops
mirroring; a 5-fold model shows both effects). Each case: residual-tumour probability with both presets,
post-processing as in the pipeline (the card's threshold, components < 20 voxels removed), then Dice with the
simulated truth (RT cases), residual volume, GTR/RT call, and the agreement between the two presets (Dice,
largest probability difference). Prints a Markdown table and the means; records the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed0", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from bids_postop.core.postprocess import postprocess_probability
    from bids_postop.demo.simulate import CASE_NAMES, load_case, simulate_postop_case
    from bids_postop.segmentation.models import resolve_models
    from bids_postop.segmentation.nnunet import NnUNetOptions, first_fold, predict_probability

    [card] = [c for c in resolve_models(args.model) if c.configuration == "B"]
    presets = {"default": NnUNetOptions(device="cpu", use_mirroring=True, threads=args.threads),
               "fast": NnUNetOptions(device="cpu", use_mirroring=False, folds=first_fold(card), threads=args.threads,
                                     bf16=True)}  # as the CLI's --fast (--precision auto)
    print(f"model {card.name} ({card.folder}); load {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            seed = args.seed0 + i
            rng = np.random.default_rng(seed)
            case = simulate_postop_case(load_case(CASE_NAMES[i % len(CASE_NAMES)]), rng, residual=i % 2 == 0)
            files = []
            for role in ("postop_t1ce", "postop_t1"):
                path = Path(tmp) / f"{seed}_{role}.nii.gz"
                nib.save(nib.Nifti1Image(getattr(case, role), case.affine), path)
                files.append(path)
            truth = case.residual_mask > 0
            row = {"seed": seed, "source": case.source, "truth_ml": round(case.residual_volume_ml, 3)}
            probs = {}
            for name, options in presets.items():
                start = time.monotonic()
                report: dict = {}
                probs[name] = predict_probability(card, files, options=options, report=report)
                row[f"{name}_s"] = round(time.monotonic() - start, 1)
                # forward passes per tile: networks x mirrorings
                row[f"{name}_passes"] = report["n_networks"] * 2 ** len(report["mirror_axes"])
                mask, measures = postprocess_probability(probs[name], case.spacing, threshold=card.threshold)
                row[f"{name}_dice"] = dice(mask > 0, truth)
                row[f"{name}_ml"] = round(measures.residual_volume_ml, 3)
                row[f"{name}_call"] = measures.resection_status
            row["presets_dice"] = dice(probs["default"] > card.threshold, probs["fast"] > card.threshold)
            row["max_prob_diff"] = round(float(np.abs(probs["default"] - probs["fast"]).max()), 3)
            rows.append(row)
            print(row, flush=True)
    print(f"\nload after: {os.getloadavg()}")
    print("\n| seed | truth ml | default Dice | fast Dice | default ml | fast ml | calls (default/fast) | "
          "Dice default vs fast | max prob diff | s default / fast |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def fmt(v):
        return "–" if v is None else f"{v:.3f}"

    for r in rows:
        print(f"| {r['seed']} | {r['truth_ml']} | {fmt(r['default_dice'])} | {fmt(r['fast_dice'])} | "
              f"{r['default_ml']} | {r['fast_ml']} | {r['default_call']}/{r['fast_call']} | {fmt(r['presets_dice'])} | "
              f"{r['max_prob_diff']} | {r['default_s']} / {r['fast_s']} |")
    rt = [r for r in rows if r["truth_ml"] > 0]
    for name in ("default", "fast"):
        scores = [r[f"{name}_dice"] or 0.0 for r in rt]
        errors = [abs(r[f"{name}_ml"] - r["truth_ml"]) for r in rows]
        calls = sum((r[f"{name}_call"] == "RT") == (r["truth_ml"] >= 0.175) for r in rows)
        print(f"{name}: mean Dice (RT cases) {np.mean(scores):.3f}, median |volume error| {np.median(errors):.3f} ml, "
              f"GTR/RT correct {calls}/{len(rows)}, mean time {np.mean([r[f'{name}_s'] for r in rows]):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
