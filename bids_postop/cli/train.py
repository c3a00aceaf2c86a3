"""``bids_postop-train``: train residual-tumour models on a BIDS dataset with manual masks.

parse → discover → hospital folds → data preparation (participant level's registration and brain
extraction, cached) → per configuration: nnU-Net raw dataset, plan/preprocess, train each fold, threshold on
the validation folds, model folder + card → participant level on the held-out test site(s) with the new model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bids_postop import __version__
from bids_postop.cli.parser import BidsAppParser, positive_int
from bids_postop.errors import EXIT_OK, EXIT_PARTICIPANT_FAILED, BidsPostopError, UsageError
from bids_postop.settings import resolve_device

LOG = logging.getLogger("bids_postop.training")

EPILOG = """\
folds: sites come from participants.tsv (column site, institution or hospital). The test site(s) are held
out; the other sites are dealt into --folds folds, largest first, each into the fold with the fewest
participants so far (ties: site name, then lowest fold): no hospital in two folds. Fewer training sites
than folds is refused: lower --folds. Written to WORK_DIR/splits.tsv and nnU-Net's splits_final.json.

outputs (WORK_DIR): models/<CONFIG>/ (bids_postop_model.json + nnunet/), splits.tsv, nnunet/{raw,
preprocessed,results}, prep/ (cached data preparation), logs/, and per model a BIDS derivatives dataset
predictions/<CONFIG>/ (AGU-Net: agunet/predictions/<CONFIG>/) holding every validation participant's
prediction by its own fold's network (the cross-validation set; the fold is in each measures JSON,
provenance.cross_validation) and the test site's predictions by the fold ensemble (participant level), with
the group level of that model in predictions/<CONFIG>/group_report.html. Finally the group level over every
model trained in WORK_DIR (both architectures) writes the paper's tables to validation/ (group/
paper_segmentation.tsv, group/paper_classification.tsv, group_report.html; --no-paper-tables: skip). Rerunning
with the same WORK_DIR resumes: finished data preparation and folds with a checkpoint_final.pth are skipped.

threshold (--threshold-rule): chosen among 0.1 ... 0.9 on the own-fold validation predictions. dice_f1
(default): (mean Dice over all validation participants, two empty masks scoring 1, + patient-wise F1) / 2, the
rule of the study authors' validation code (the paper names none); dice_positive: mean Dice over
reference-positive participants; dice_recall: (mean Dice over detected positives + recall) / 2 (bids_postop
0.1, the demo models); balanced_accuracy: patient-wise (recall + specificity) / 2. The model card records the
rule and, for every candidate threshold, Dice, Dice-P, recall, precision, specificity, balanced accuracy and
every rule's score (threshold_selection.table).

AGU-Net (--architecture agunet; needs the agunet extra: pip install bids_postop[agunet]): the study's
full-volume 3-D U-Net with attention gates, multi-scale inputs and deep supervision (filters 16/32/128/256/256,
input 128x128x144 at 1 mm, z-scored; --tiny: 32x32x32, filters 4/8/8/8/8). Adam lr 1e-3, class-averaged Dice
loss without background, micro-batches of --batch-size (2) accumulated to --effective-batch-size (32), horizontal
and vertical flips, axial rotations +-20 deg and translations <= 10 % each with p = 0.5, early stop after
--patience (30) epochs without validation improvement (--epochs: at most, default 1000; --iterations:
micro-batches per epoch, default all training cases once). --init-model MODEL.keras starts every fold from a
trained AGU-Net (layers matched by name, the input layers adapted to the number of channels). TensorFlow runs in
its own process per fold (python -m bids_postop.agunet.worker; output in WORK_DIR/agunet/<CONFIG>/fold_k/
worker.log), checkpointing after every epoch: a rerun resumes. The fold networks are exported to ONNX and
packaged in the Raidionics format (pre_processing.ini + fold_k/model.onnx + bids_postop_model.json) in
WORK_DIR/agunet/models/<CONFIG>/: the participant level runs it with onnxruntime (--model that folder) and
averages the folds.

exit codes: 0 done; 1 test-set scoring failed for a participant; 64 usage error; 66 no usable input.

example (short CPU run with the demo's tiny network):
  bids_postop-train /data/bids /scratch/train --manual manual=/data/bids/derivatives/manual \\
      --config B --test-site oslo --folds 5 --tiny --epochs 5 --iterations 20

the shipped demo models (bids_postop/data/models/demo) are rebuilt with bids_postop-demo --training-set and
this command (--tiny --train-folds 0 --inference-patch-size 96 96 96 --model-name demo): docs/training.md.
"""


def _derivative(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        path, name = value, Path(value).name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = BidsAppParser(prog="bids_postop-train", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train residual-tumour segmentation models (nnU-Net v2 or AGU-Net) on a BIDS "
                                 "dataset with manual residual masks, with hospital-stratified folds and a held-out "
                                 "test site.")
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (never modified)")
    parser.add_argument("work_dir", type=Path, help="where everything is written; reusing it resumes")
    parser.add_argument("--version", action="version", version=f"bids_postop {__version__}")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0)
    g = parser.add_argument_group("data")
    g.add_argument("--manual", type=_derivative, required=True, metavar="NAME=PATH",
                   help="derivatives dataset of manual residual masks (sub-X/ses-<postop>/anat/"
                        "sub-X_ses-<postop>[_desc-*]_label-tumor_mask.nii.gz on the post-op T1w-CE grid)")
    g.add_argument("-d", "--derivatives", nargs="+", type=_derivative, default=[], metavar="NAME=PATH",
                   help="derivatives datasets, e.g. preop=PATH with pre-operative tumour masks (D, E)")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL")
    g.add_argument("--postop-session", default="postop", metavar="LABEL")
    g.add_argument("--preop-session", default="preop", metavar="LABEL")
    g.add_argument("--skip-bids-validation", action="store_true",
                   help="do not validate the dataset (pybids indexing only) here and in the test-set scoring")
    g = parser.add_argument_group("model")
    g.add_argument("--config", nargs="+", default=["B"], choices=["A", "B", "C", "D", "E"],
                   help="input configuration(s) to train, one model each (default: B)")
    g.add_argument("--architecture", default="nnunet", choices=["nnunet", "agunet"],
                   help="nnunet (default) or agunet (the study's full-volume AGU-Net, TensorFlow; see below)")
    g.add_argument("--test-site", nargs="+", default=[], metavar="SITE",
                   help="held-out hospital(s): in no fold, scored with the fold ensemble at the end")
    g.add_argument("--folds", type=positive_int, default=5, help="number of hospital folds (default: 5)")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs per fold (default: nnU-Net's 1000; agunet: at most, default 1000, early stopping "
                        "decides)")
    g.add_argument("--iterations", type=positive_int, default=None,
                   help="iterations per epoch (default: nnU-Net's 250; agunet: micro-batches, default all cases "
                        "once)")
    g.add_argument("--tiny", action="store_true",
                   help="the demo's tiny network (4 stages, 8–64 features, patch 64³, 1.5 mm, test-time mirroring "
                        "left-right only): demos and tests; with agunet: input 32³, filters 4/8/8/8/8")
    g.add_argument("--train-folds", nargs="+", type=int, default=None, metavar="K",
                   help="train only these folds (0-based; default: all --folds): the model ensembles them and its "
                        "threshold is chosen on their validation participants (the demo models: one fold, 0)")
    g.add_argument("--inference-patch-size", nargs=3, type=positive_int, default=None, metavar="N",
                   help="sliding-window patch of the exported model's inference (default: the training patch); "
                        "sides must be multiples of the network's total stride (the demo models: 96 96 96)")
    g.add_argument("--model-name", default="bids_postop-train", metavar="NAME",
                   help="the model card's name is NAME-<CONFIG> (default: bids_postop-train; the demo models: demo)")
    g.add_argument("--export-to", type=Path, default=None, metavar="DIR",
                   help="copy each finished model folder to DIR/<CONFIG>, replacing it (e.g. "
                        "bids_postop/data/models/demo to rebuild the shipped demo models)")
    g.add_argument("--init-model", type=Path, default=None, metavar="MODEL.keras",
                   help="agunet: initialise every fold from this Keras AGU-Net (input layers adapted), as the study "
                        "did from its pre-operative model")
    g.add_argument("--patience", type=positive_int, default=30,
                   help="agunet: stop after N epochs without validation improvement (default: 30, the study's)")
    g.add_argument("--batch-size", type=positive_int, default=2, help="agunet: micro-batch size (default: 2)")
    g.add_argument("--effective-batch-size", type=positive_int, default=32,
                   help="agunet: gradients accumulated over this many samples per update (default: 32)")
    g.add_argument("--brain-method", default="deepbet", choices=["deepbet", "hdbet", "raidionics"])
    g.add_argument("--brain-model", default=None, metavar="NAME|FOLDER",
                   help="Raidionics brain model for --brain-method raidionics (default: MRI_Brain)")
    g.add_argument("--threshold-rule", default="dice_f1",
                   choices=["dice_f1", "dice_positive", "dice_recall", "balanced_accuracy"],
                   help="how the probability threshold is chosen on the validation folds (default: dice_f1, the "
                        "study authors' validation code; see below)")
    g.add_argument("--no-test-scoring", dest="test_scoring", action="store_false",
                   help="do not run the participant and group levels on the test site(s)")
    g.add_argument("--no-paper-tables", dest="paper_tables", action="store_false",
                   help="do not run the group level over every model of WORK_DIR at the end (WORK_DIR/validation)")
    g = parser.add_argument_group("resources")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where networks run (default: auto = cuda when available)")
    g.add_argument("--nprocs", "--n-cpus", type=positive_int, default=min(os.cpu_count() or 1, 8), metavar="N",
                   help="processes for nnU-Net preprocessing and the test-set scoring (default: CPU count, ≤ 8)")
    g.add_argument("--omp-nthreads", type=positive_int, default=None, metavar="N",
                   help="threads per process (default: nprocs)")
    return parser


def setup_logging(work_dir: Path, verbosity: int) -> Path:
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"bids_postop-train_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.log"
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    LOG.setLevel(logging.DEBUG)
    LOG.handlers[:] = [console, to_file]
    LOG.propagate = False
    return log_file


def _configure_nipype(work_dir: Path, verbosity: int) -> None:
    from nipype import config
    from nipype import logging as nlogging

    (work_dir / "crashes").mkdir(parents=True, exist_ok=True)
    config.update_config({
        "logging": {"workflow_level": "INFO" if verbosity > 0 else "WARNING", "interface_level": "WARNING",
                    "utils_level": "WARNING", "log_to_file": False},
        "execution": {"crashdump_dir": str(work_dir / "crashes"), "crashfile_format": "txt",
                      "stop_on_first_crash": True, "hash_method": "timestamp", "remove_unnecessary_outputs": False,
                      "create_report": False, "parameterize_dirs": False},
        "monitoring": {"enabled": False},
    })
    nlogging.update_logging(config)


def _eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def validation_cases(model_dir: Path, plan, cases, *, device: str, folds: Sequence[int] | None = None,
                     progress=LOG.info) -> list:
    """Every validation participant of ``folds`` (default: all) predicted with its own fold's network."""
    from bids_postop.core.images import load_3d
    from bids_postop.segmentation.models import read_card
    from bids_postop.segmentation.nnunet import NnUNetOptions, predict_probability
    from bids_postop.training.datasets import load_label
    from bids_postop.training.threshold import ValidationCase

    card = read_card(model_dir)
    by_id = {c.participant_id: c for c in cases}
    val_cases = []
    for fold in range(plan.n_folds) if folds is None else folds:
        for pid in plan.validation(fold):
            if pid not in by_id:
                continue
            case = by_id[pid]
            files = [case.channels[r] for r in card.channels]
            prob = predict_probability(card, files, options=NnUNetOptions(device=device, folds=(fold,),
                                                                          mirror_scores=True), report=(ran := {}))
            truth = load_label(case.label, case.channels["postop_t1ce"])
            ref = load_3d(case.channels["postop_t1ce"])
            val_cases.append(ValidationCase(prob, truth, ref.affine, pid, fold, segmentation=ran))
            progress(f"validation prediction: {pid} (fold {fold})")
    return val_cases


def validation_threshold(val_cases, *, rule: str) -> dict:
    """The threshold chosen under ``rule`` on the own-fold predictions, with the table of every candidate."""
    from bids_postop.training.threshold import choose_threshold

    result = choose_threshold(val_cases, rule=rule)
    result["validation_participants"] = [c.participant_id for c in val_cases]
    return result


def write_cv_predictions(args, config: str, model_dir: Path, val_cases, *, threshold: float, participants,
                         cases) -> list[Path]:
    """The own-fold validation predictions as BIDS derivatives in the model's predictions dataset."""
    from bids_postop.training.predictions import predictions_dir, write_validation_predictions

    return write_validation_predictions(
        predictions_dir(args.work_dir, args.architecture, config), args.bids_dir, val_cases,
        participants=participants, prepared={c.participant_id: c for c in cases}, model_dir=model_dir,
        config=config, threshold=threshold, splits_tsv=args.work_dir / "splits.tsv",
        provenance={"bids_postop_version": __version__, "command_line": getattr(args, "command", ""),
                    "threshold_rule": args.threshold_rule,
                    "brain_extraction": {"method": args.brain_method,
                                         **({"model": args.brain_model} if args.brain_model else {})}})


def cv_predictions_complete(args, config: str, model_dir: Path, plan, folds: Sequence[int], ids) -> bool:
    """True when the predictions dataset holds, for this very model card, every fold's validation participants."""
    from bids_postop.segmentation.models import read_card
    from bids_postop.training.predictions import CV_KEY, predictions_dir

    card = read_card(model_dir)
    found = {}
    for path in predictions_dir(args.work_dir, args.architecture, config).glob("sub-*/**/*_measures.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cv = (data.get("provenance") or {}).get(CV_KEY) or {}
        if (data.get("model") or {}).get("name") == card.name and (data.get("model") or {}).get(
                "threshold") == card.threshold:
            found[data.get("participant_id")] = cv.get("fold")
    return all(found.get(p) == k for k in folds for p in plan.validation(k) if p in ids)


def write_card(model_dir: Path, *, config: str, threshold: float, folds: Sequence[int], extra: dict,
               name: str = "bids_postop-train") -> Path:
    from bids_postop.configurations import CONFIGURATIONS
    from bids_postop.segmentation.models import CARD_NAME
    from bids_postop.training.datasets import trained_on
    from bids_postop.training.nnunet import card_section

    card = {
        "schema_version": 1,
        "name": f"{name}-{config}",
        "description": f"nnU-Net v2 3d_fullres for residual glioblastoma on early post-operative MRI, input "
                       f"configuration {config}, trained with bids_postop-train {__version__}"
                       f"{trained_on(extra.get('training', {}).get('dataset_name'))}.",
        "intended_use": "research; trained with bids_postop-train, not validated for clinical use",
        "not_for_clinical_use": True,
        "architecture": "nnunet",
        "configuration": config,
        "channels": list(CONFIGURATIONS[config]),  # type: ignore[index]
        "threshold": threshold,
        "nnunet": card_section(folds),
        **extra,
    }
    path = model_dir / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def _model_up_to_date(model_dir: Path, data_hash: str, folds: list[int], expect: dict | None = None) -> bool:
    from bids_postop.segmentation.models import CARD_NAME

    try:
        card = json.loads((model_dir / CARD_NAME).read_text())
    except (OSError, ValueError):
        return False
    if any(card.get(k) != v for k, v in (expect or {}).items()):
        return False
    from bids_postop.training.review import SECTION_VERSION

    if (card.get("uncertainty") or {}).get("version") != SECTION_VERSION:  # cards from before the review section
        return False
    return (card.get("training", {}).get("data_hash") == data_hash and card["nnunet"]["folds"] == folds
            and all((model_dir / "nnunet" / f"fold_{k}" / "checkpoint_final.pth").is_file() for k in folds))


def train_configuration(config: str, args, cases, plan, command: str, participants=None) -> Path:
    """Raw dataset → plan/preprocess → folds → export → own-fold validation predictions (written as BIDS
    derivatives) → threshold → card. Returns the model folder."""
    from bids_postop.bids.inputs import bids_dataset_name
    from bids_postop.training import nnunet as nn
    from bids_postop.training.datasets import DATASET_IDS, dataset_name, write_raw_dataset

    work = args.work_dir
    usable = [c for c in cases if c.has(config) and c.participant_id not in plan.test]
    ids = {c.participant_id for c in usable}
    dropped = [a.participant_id for a in plan.assignments if a.fold is not None and a.participant_id not in ids]
    if dropped:
        LOG.warning("[%s] not in the training data (inputs or manual mask missing): %s", config, ", ".join(dropped))
    folds = sorted(set(args.train_folds)) if args.train_folds else list(range(plan.n_folds))
    for fold in folds:
        if not any(p in ids for p in plan.validation(fold)):
            raise UsageError(f"configuration {config}: fold {fold} has no participant with the inputs and a manual "
                             f"mask; lower --folds or choose another configuration")
    did = DATASET_IDS[config]
    raw_dir = work / "nnunet" / "raw" / dataset_name(config)
    data_hash = write_raw_dataset(raw_dir, config, usable)
    LOG.info("[%s] nnU-Net raw dataset: %d cases, data hash %s", config, len(usable), data_hash[:12])
    tiny = nn.TinyNetwork() if args.tiny else None
    pp = nn.plan_and_preprocess(did, data_hash=data_hash, tiny=tiny, num_processes=min(args.nprocs, 2))
    splits = [{"train": [p for p in s["train"] if p in ids], "val": [p for p in s["val"] if p in ids]}
              for s in plan.nnunet_splits()]
    (pp / "splits_final.json").write_text(json.dumps(splits, indent=1) + "\n")
    nn.reset_results_if_stale(did, {"data_hash": data_hash, "splits": splits, "tiny": bool(tiny),
                                    "epochs": args.epochs, "iterations": args.iterations})
    options = nn.TrainingOptions(device=args.device, epochs=args.epochs, iterations=args.iterations, tiny=tiny)
    start = time.monotonic()
    fold_seconds: list[float] = []
    for step, fold in enumerate(folds):
        final = nn.results_folder(did) / f"fold_{fold}" / "checkpoint_final.pth"
        if final.is_file():
            LOG.info("[%s] fold %d/%d: already trained (%s): skipped", config, fold + 1, plan.n_folds, final)
            continue
        LOG.info("[%s] fold %d/%d: training on %d, validating on %d participants", config, fold + 1, plan.n_folds,
                 len(splits[fold]["train"]), len(splits[fold]["val"]))
        fold_start = time.monotonic()
        left = len(folds) - step - 1

        def progress(done: int, total: int, per_epoch: float, fold=fold, left=left) -> None:
            if done == total or done % max(1, total // 50) == 0:
                eta_fold = per_epoch * (total - done)
                eta_all = eta_fold + left * per_epoch * total
                LOG.info("[%s] fold %d/%d: epoch %d/%d, %.1f s/epoch, ETA fold %s, all folds %s", config, fold + 1,
                         plan.n_folds, done, total, per_epoch, _eta(eta_fold), _eta(eta_all))

        nn.train_fold(did, fold, options=options, progress=progress)
        fold_seconds.append(time.monotonic() - fold_start)
        LOG.info("[%s] fold %d/%d: trained in %s", config, fold + 1, plan.n_folds, _eta(fold_seconds[-1]))
    model_dir = work / "models" / config
    name = args.model_name
    patch = list(args.inference_patch_size) if args.inference_patch_size else None
    if not fold_seconds and _model_up_to_date(model_dir, data_hash, folds, {
            "name": f"{name}-{config}", **({"inference_patch_size": patch} if patch else {})}) and json.loads(
            (model_dir / "bids_postop_model.json").read_text()).get("threshold_selection", {}).get(
            "rule") == args.threshold_rule:
        LOG.info("[%s] model %s is up to date (same data, folds trained before): reused", config, model_dir)
        if participants is not None and not cv_predictions_complete(args, config, model_dir, plan, folds, ids):
            from bids_postop.segmentation.models import read_card

            LOG.info("[%s] writing the cross-validation predictions (missing)", config)
            val_cases = validation_cases(model_dir, plan, usable, device=resolve_device(args.device), folds=folds)
            write_cv_predictions(args, config, model_dir, val_cases, threshold=read_card(model_dir).threshold,
                                 participants=participants, cases=usable)
        return export_model_dir(model_dir, args.export_to, config)
    nn.export_model(did, model_dir, folds, mirror_axes=tiny.mirror_axes if tiny else "keep")
    training_patch = json.loads((model_dir / "nnunet" / "plans.json").read_text())["configurations"][
        nn.CONFIGURATION]["patch_size"]
    if patch:
        try:
            nn.set_inference_patch_size(model_dir, patch)
        except ValueError as exc:
            raise UsageError(f"--inference-patch-size: {exc}") from exc
    device = resolve_device(args.device)
    write_card(model_dir, config=config, threshold=0.5, folds=folds, extra={},  # provisional: read by predictions
               name=name)
    val_cases = validation_cases(model_dir, plan, usable, device=device, folds=folds)
    thr = validation_threshold(val_cases, rule=args.threshold_rule)
    LOG.info("[%s] threshold %.2f (%s)", config, thr["threshold"], thr["how"])
    from bids_postop.training.review import review_card_section

    uncertainty = review_card_section(config, val_cases, threshold=thr["threshold"], rule=args.threshold_rule)
    write_card(model_dir, config=config, threshold=thr["threshold"], folds=folds, name=name, extra={
        "inference_patch_size": patch or training_patch,
        "threshold_selection": thr,
        "uncertainty": uncertainty,
        "training": {
            "command": command, "date": _dt.date.today().isoformat(), "bids_dir": str(args.bids_dir),
            "dataset_name": bids_dataset_name(args.bids_dir), "data_hash": data_hash, "n_cases": len(usable),
            "tiny_network": tiny.__dict__ if tiny else None,
            "epochs": args.epochs or "nnU-Net default (1000)", "iterations": args.iterations or
            "nnU-Net default (250)", "device": device, "training_patch_size": training_patch,
            "test_time_mirroring_axes": list(tiny.mirror_axes) if tiny else "nnU-Net's (all axes)",
            "folds": [{"fold": k, "sites": sorted(s for s, f in plan.site_folds.items() if f == k),
                       "validation": splits[k]["val"]} for k in folds],
            "test_sites": list(plan.test_sites), "test_participants": plan.test,
            "training_seconds_this_run": round(time.monotonic() - start), "versions": nn.versions(),
            "bids_postop_version": __version__,
        },
    })
    LOG.info("[%s] model written: %s", config, model_dir)
    if participants is not None:
        write_cv_predictions(args, config, model_dir, val_cases, threshold=thr["threshold"],
                             participants=participants, cases=usable)
    return export_model_dir(model_dir, args.export_to, config)


def export_model_dir(model_dir: Path, export_to: Path | None, config: str) -> Path:
    """``--export-to``: copy the model folder to ``export_to/<CONFIG>`` (replacing it); return the model folder."""
    import shutil

    if export_to is not None:
        dest = export_to / config
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(model_dir, dest)
        LOG.info("[%s] model copied to %s", config, dest)
    return model_dir


def _raidionics_brain_model(args) -> str | None:
    """The Raidionics brain model folder for --brain-method raidionics (ModelError when not installed)."""
    if args.brain_method != "raidionics":
        return None
    from bids_postop.segmentation.raidionics_brain import BRAIN_MODEL, resolve_brain_model

    return str(resolve_brain_model(args.brain_model or BRAIN_MODEL))


def scoring_root(work_dir: Path, architecture: str) -> Path:
    """Where a model's predictions are written (predictions/<CONFIG>): beside the architecture's models, so that
    an nnU-Net and an AGU-Net model of the same configuration trained in one WORK_DIR do not overwrite each
    other's predictions. (The participant level's work directory, WORK_DIR/test_work, is shared: the test
    participants' registration and brain extraction are reused across models and architectures.)"""
    return work_dir / "agunet" if architecture == "agunet" else work_dir


def _manual_name(args) -> str:
    name = args.manual[0]
    return name if name.startswith("manual") else f"manual_{name}"  # the group level's naming rule


def score_test_set(args, config: str, model_dir: Path, plan) -> int:
    """Participant level (new model, fold ensemble) on the held-out participants, into the model's predictions
    dataset beside its cross-validation predictions; then the group level on that dataset (validation and test
    columns of this one model)."""
    from bids_postop.cli.run import main as run_main
    from bids_postop.training.predictions import predictions_dir

    out = predictions_dir(args.work_dir, args.architecture, config)
    common = ["--skip-bids-validation"] if args.skip_bids_validation else []
    derivs = [f"{n}={p}" for n, p in args.derivatives]
    argv = [str(args.bids_dir), str(out), "participant", "--participant-label", *plan.test, "--model",
            str(model_dir), "--config", config, "-w", str(args.work_dir / "test_work"), "--device", args.device,
            "--postop-session", args.postop_session, "--preop-session", args.preop_session,
            "--nprocs", str(args.nprocs), "--brain-method", args.brain_method,
            *(["--brain-model", args.brain_model] if args.brain_method == "raidionics" and args.brain_model else []),
            *common,
            *(["-d", *derivs] if derivs else [])]
    LOG.info("[%s] test set (%s): bids_postop %s", config, ", ".join(plan.test_sites), shlex.join(argv))
    code = run_main(argv)
    group = run_main([str(args.bids_dir), str(out), "group", "-d", f"{_manual_name(args)}={args.manual[1]}",
                      "--folds", str(args.work_dir / "splits.tsv"), *common])
    LOG.info("[%s] test set: participant level exit %d, group level exit %d (%s)", config, code, group, out)
    return code or group


def _check_agunet_args(args) -> None:
    """Fail now (not after data preparation) when AGU-Net training cannot run here."""
    import importlib.util

    missing = [m for m in ("tensorflow", "keras", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--architecture agunet needs {', '.join(missing)}: pip install 'bids_postop[agunet]'")
    if args.init_model is not None:
        args.init_model = args.init_model.expanduser().resolve()
        if not args.init_model.is_file():
            raise UsageError(f"--init-model {args.init_model}: file not found (a Keras .keras model)")
    if args.effective_batch_size < args.batch_size:
        raise UsageError(f"--effective-batch-size {args.effective_batch_size} is smaller than --batch-size "
                         f"{args.batch_size}")


def train_agunet(config: str, args, cases, plan, command: str, participants=None) -> Path:
    from bids_postop.training import agunet

    options = agunet.AgunetOptions(
        tiny=args.tiny, max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
        effective_batch_size=args.effective_batch_size, iterations=args.iterations, init_model=args.init_model,
        threads=args.omp_nthreads, device=args.device, threshold_rule=args.threshold_rule)
    folds = getattr(args, "train_folds", None)
    usable = [c for c in cases if c.has(config) and c.participant_id not in plan.test]
    ids = {c.participant_id for c in usable}
    folds_done = sorted(set(folds)) if folds else list(range(plan.n_folds))

    def write(model_dir: Path, val_cases, threshold: float) -> None:
        write_cv_predictions(args, config, model_dir, val_cases, threshold=threshold, participants=participants,
                             cases=usable)

    def complete(model_dir: Path) -> bool:
        return cv_predictions_complete(args, config, model_dir, plan, folds_done, ids)

    return agunet.train_configuration(config, args, cases, plan, command, options=options, folds=folds,
                                      name=f"{getattr(args, 'model_name', 'bids_postop-train')}-agunet",
                                      cv_writer=write if participants is not None else None, cv_complete=complete)


def model_predictions(work_dir: Path) -> dict[str, Path]:
    """Every model's predictions dataset in WORK_DIR, named ``<architecture>-<CONFIG>``."""
    found = {}
    for architecture in ("nnunet", "agunet"):
        root = scoring_root(work_dir, architecture) / "predictions"
        for folder in sorted(root.glob("*")) if root.is_dir() else []:
            if folder.is_dir() and any(folder.glob("sub-*/**/*_measures.tsv")):
                found[f"{architecture}-{folder.name}"] = folder
    return found


def group_command(args) -> list[str]:
    """``bids_postop`` arguments of the group level over every model trained in WORK_DIR: the paper's tables
    (validation = own-fold predictions, test = fold ensemble on the held-out site) in WORK_DIR/validation."""
    datasets = model_predictions(args.work_dir)
    return [str(args.bids_dir), str(args.work_dir / "validation"), "group",
            "-d", f"{_manual_name(args)}={args.manual[1]}", "--folds", str(args.work_dir / "splits.tsv"),
            *(["--skip-bids-validation"] if args.skip_bids_validation else []),
            *(["--compare", *(f"{k}={v}" for k, v in datasets.items())] if datasets else [])]


def run_paper_tables(args) -> int:
    """The group level over every model's predictions in WORK_DIR (both architectures): WORK_DIR/validation."""
    from bids_postop.cli.run import main as run_main

    argv = group_command(args)
    if "--compare" not in argv:
        LOG.warning("no predictions dataset in %s: no tables", args.work_dir)
        return EXIT_OK
    LOG.info("paper tables of every model in %s: bids_postop %s", args.work_dir, shlex.join(argv))
    return run_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.bids_dir = args.bids_dir.expanduser().resolve()
    args.work_dir = args.work_dir.expanduser().resolve()
    args.manual = (args.manual[0], args.manual[1].expanduser().resolve())
    args.omp_nthreads = args.omp_nthreads or args.nprocs
    command = shlex.join(["bids_postop-train", *(argv if argv is not None else sys.argv[1:])])
    try:
        if args.architecture == "agunet":
            _check_agunet_args(args)
        elif args.init_model is not None:
            raise UsageError("--init-model is for --architecture agunet (nnU-Net trains from scratch here)")
        if not args.manual[1].is_dir():
            raise UsageError(f"--manual {args.manual[1]}: not a directory")
        bad_folds = [k for k in args.train_folds or [] if not 0 <= k < args.folds]
        if bad_folds:
            raise UsageError(f"--train-folds {' '.join(map(str, bad_folds))}: folds are numbered 0 to {args.folds - 1} "
                             f"(--folds {args.folds})")
        if args.export_to is not None:
            args.export_to = args.export_to.expanduser().resolve()
        return run(args, command)
    except BidsPostopError as exc:
        print(f"bids_postop-train: error: {exc}", file=sys.stderr)
        if LOG.handlers:
            LOG.error("%s", exc)
        return exc.exit_code


def run(args, command: str) -> int:
    from bids_postop.bids.inputs import discover
    from bids_postop.training.datasets import prepare_cases
    from bids_postop.training.nnunet import set_nnunet_paths
    from bids_postop.training.splits import make_splits, write_splits
    from bids_postop.workflows.preflight import check_participant_inputs

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    log_file = setup_logging(work, args.verbosity)
    LOG.info("%s (log: %s)", command, log_file)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.omp_nthreads)
    os.environ["OMP_NUM_THREADS"] = str(args.omp_nthreads)
    set_nnunet_paths(work / "nnunet")
    participants = discover(args.bids_dir, participant_labels=args.participant_label,
                            postop_session=args.postop_session, preop_session=args.preop_session,
                            derivatives=dict(args.derivatives), validate=not args.skip_bids_validation)
    participants = [check_participant_inputs(p) for p in participants]
    for p in participants:
        for note in p.notes:
            LOG.warning("%s: %s", p.participant_id, note)
    plan = make_splits({p.participant_id: p.site for p in participants}, n_folds=args.folds,
                       test_sites=args.test_site)
    write_splits(plan, tsv=work / "splits.tsv")
    LOG.info("hospital folds (%s):\n%s", work / "splits.tsv", plan.describe())
    if not args.test_site:
        LOG.warning("no --test-site: every site is in the folds and nothing is held out for testing")
    _configure_nipype(work, args.verbosity)
    training = [p for p in participants if p.participant_id not in set(plan.test)]
    cases = prepare_cases(training, configs=args.config, manual_root=args.manual[1], work_dir=work / "prep",
                          brain_method=args.brain_method, device=args.device, omp_nthreads=args.omp_nthreads,
                          brain_model=_raidionics_brain_model(args))
    trainer = train_agunet if args.architecture == "agunet" else train_configuration
    by_id = {p.participant_id: p for p in participants}
    args.command = command
    models = {config: trainer(config, args, cases, plan, command, by_id) for config in args.config}
    LOG.info("models: %s (use: bids_postop BIDS_DIR OUT participant --model %s)",
             ", ".join(str(m) for m in models.values()), next(iter(models.values())).parent)
    code = EXIT_OK
    if args.test_scoring and plan.test:
        for config, model_dir in models.items():
            code = score_test_set(args, config, model_dir, plan) or code
    if args.paper_tables:
        code = run_paper_tables(args) or code
    return EXIT_OK if code == EXIT_OK else EXIT_PARTICIPANT_FAILED


if __name__ == "__main__":
    sys.exit(main())
