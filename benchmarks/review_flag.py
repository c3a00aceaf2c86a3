"""Does the review flag pick out the wrong GTR/RT calls? (issue #20, "Done when"): one command, by hand.

    python benchmarks/review_flag.py --workdir /tmp/review_flag [--participants 18] [--sites 3] [--eval 16]
                                     [--eval-seed 500]

1. a simulated training set (``bids_postop-demo --training-set``, seeds >= 1000, ``--sites`` hospitals);
2. ``bids_postop-train`` with the demo recipe (``--tiny --epochs 25 --iterations 12``, configuration B), every
   hospital fold trained (``--folds = --sites``): a multi-fold model whose folds are the review flag's members;
3. held-out simulated cases never trained on (``bids_postop-demo --dataset-only``, ``--eval-seed`` < 1000; another
   seed gives a fresh held-out set for the same model, in its own folder);
4. the participant level on them with that model (``--config B``), then the group level with their simulated
   truth: ``group/review.tsv`` holds the wrong-call rates among flagged and unflagged patients and the AUROC of the
   uncertainty score for a wrong call or Dice < 0.5.

Every step resumes from ``--workdir``. Prints the review table and writes ``<workdir>/review_flag.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True)
    print(f"  ({time.monotonic() - start:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--participants", type=int, default=18, help="training participants (default: 18)")
    parser.add_argument("--sites", type=int, default=3, help="training hospitals = folds (default: 3)")
    parser.add_argument("--eval", type=int, default=16, help="held-out simulated participants (default: 16)")
    parser.add_argument("--eval-seed", type=int, default=500, help="seed of the held-out set (< 1000; default: 500)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args()
    work = args.workdir.resolve()
    train_bids, train_work = work / "train" / "bids", work / "train" / "work"
    if not 0 <= args.eval_seed < 1000:
        parser.error("--eval-seed must be below 1000 (training sets use 1000 and above)")
    suffix = "" if args.eval_seed == 500 else f"_seed{args.eval_seed}"
    eval_root, eval_work = work / f"eval{suffix}", work / f"eval_work{suffix}"
    timings = {}

    start = time.monotonic()
    if not (train_bids / "participants.tsv").is_file():
        run([str(BIN / "bids_postop-demo"), str(train_bids), "--training-set", "--participants",
             str(args.participants), "--sites", str(args.sites), "--seed", "1000"])
    model = train_work / "models" / "B"
    if not (model / "bids_postop_model.json").is_file():
        run([str(BIN / "bids_postop-train"), str(train_bids), str(train_work),
             "--manual", f"manual={train_bids / 'derivatives' / 'manual'}",
             "-d", f"preop={train_bids / 'derivatives' / 'preop_masks'}", "--config", "B", "--tiny",
             "--epochs", str(args.epochs), "--iterations", "12", "--folds", str(args.sites),
             "--inference-patch-size", "96", "96", "96", "--model-name", "review", "--device", "cpu",
             "--nprocs", str(args.nprocs), "--no-paper-tables", "--no-test-scoring"])
    timings["training_s"] = round(time.monotonic() - start)

    start = time.monotonic()
    bids = eval_root / "bids"
    if not (bids / "participants.tsv").is_file():
        run([str(BIN / "bids_postop-demo"), str(eval_root), "--dataset-only", "--participants", str(args.eval),
             "--seed", str(args.eval_seed)])
    out = bids / "derivatives" / "review_flag"
    run([str(BIN / "bids_postop"), str(bids), str(out), "participant", "--model", str(model), "--config", "B",
         "-d", f"preop={bids / 'derivatives' / 'preop_masks'}", "-w", str(eval_work), "--nprocs",
         str(args.nprocs), "--device", "cpu"])
    run([str(BIN / "bids_postop"), str(bids), str(out), "group", "-d", f"manual={bids / 'derivatives' / 'manual'}"])
    timings["evaluation_s"] = round(time.monotonic() - start)

    with (out / "group" / "review.tsv").open() as handle:
        review = list(csv.DictReader(handle, delimiter="\t"))
    card = json.loads((model / "bids_postop_model.json").read_text())
    result = {"model": card["name"], "folds": card["nnunet"]["folds"], "threshold": card["threshold"],
              "held_out_participants": args.eval, "eval_seed": args.eval_seed, "review": review, **timings}
    (work / f"review_flag{suffix}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
