"""``bids_postop-train --architecture agunet``: the study's AGU-Net, one per hospital fold, exported as one
Raidionics-format model whose fold networks the participant level averages.

Per configuration, in ``WORK_DIR/agunet/<CONFIG>/``:

1. ``pre_processing.ini`` of the package (:mod:`bids_postop.agunet.export`), and the training arrays made
   with that very pre-processing (``data/``, :mod:`bids_postop.agunet.data`);
2. for each fold, ``fold_k/job.json`` and a TensorFlow worker process (``python -m bids_postop.agunet.worker
   train``) that trains, checkpoints after every epoch (a rerun resumes) and exports ``fold_k/model.onnx``;
   ``fold_k/done.json`` marks a finished fold (a rerun with the same job skips it);
3. the model folder ``WORK_DIR/agunet/models/<CONFIG>/`` (``pre_processing.ini``, ``fold_k/model.onnx``,
   ``bids_postop_model.json``), whose threshold is chosen on the validation folds
   (:mod:`bids_postop.training.threshold`), each validation participant predicted by its own fold's network
   with onnxruntime — the code path of the participant level.

This process never imports TensorFlow.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_postop import __version__
from bids_postop.agunet.architecture import STUDY_FILTERS, STUDY_SHAPE, TINY_SPEC, NetworkSpec
from bids_postop.agunet.training import PROGRESS_PREFIX, FoldJob
from bids_postop.bids.inputs import bids_dataset_name
from bids_postop.configurations import CONFIGURATIONS
from bids_postop.errors import BidsPostopError, UsageError
from bids_postop.training.datasets import trained_on
from bids_postop.training.review import SECTION_VERSION

LOG = logging.getLogger("bids_postop.training")
STUDY_MAX_EPOCHS = 1000  # an upper bound: the study's AGU-Net stops early (30 epochs without improvement)


class TrainingError(BidsPostopError):
    """A training worker failed."""


@dataclass(frozen=True)
class AgunetOptions:
    tiny: bool = False
    max_epochs: int | None = None
    patience: int = 30
    batch_size: int = 2
    effective_batch_size: int = 32
    iterations: int | None = None
    learning_rate: float = 1e-3
    augment: bool = True
    init_model: Path | None = None
    threads: int = 1
    device: str = "cpu"
    threshold_rule: str = "dice_f1"  # bids_postop.training.threshold.RULES


def network_spec(config: str, *, tiny: bool) -> NetworkSpec:
    n_inputs = len(CONFIGURATIONS[config])  # type: ignore[index]
    base = TINY_SPEC if tiny else NetworkSpec(shape=STUDY_SHAPE, filters=STUDY_FILTERS)
    return NetworkSpec(shape=base.shape, n_inputs=n_inputs, filters=base.filters)


def _eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run_worker(argv: Sequence[str], *, log_file: Path, threads: int,
               on_progress: Callable[[dict], None] = lambda event: None) -> None:
    """Run ``python -m bids_postop.agunet.worker ARGV`` (TensorFlow's own process); stream its progress.

    stdout lines prefixed ``AGUNET_PROGRESS`` go to ``on_progress``; everything else (TensorFlow's chatter)
    to ``log_file``. Raises :class:`TrainingError` with the end of that log when the worker fails.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=25)
    command = [sys.executable, "-m", "bids_postop.agunet.worker", *argv]
    with log_file.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    on_progress(json.loads(line[len(PROGRESS_PREFIX):]))
                else:
                    log.write(line)
                    tail.append(line.rstrip())
            code = proc.wait()
    if code != 0:
        raise TrainingError(f"the AGU-Net worker failed (exit {code}; full output in {log_file}):\n"
                            + "\n".join(tail))


def _progress_logger(config: str, fold: int, n_folds: int, folds_left: int) -> Callable[[dict], None]:
    def log(event: dict) -> None:
        kind = event.get("event")
        if kind == "epoch":
            per = float(event["seconds"])
            left_max = event["max_epochs"] - event["epoch"]
            left_min = min(left_max, event["patience"] - event["since_best"])
            LOG.info("[%s] fold %d/%d: epoch %d/%d, loss %.4f, validation loss %.4f (best %.4f at epoch %d, %d/%d "
                     "without improvement), %.1f s/epoch, ETA fold %s (at most %s), all folds at most %s", config,
                     fold + 1, n_folds, event["epoch"], event["max_epochs"], event["loss"], event["val_loss"],
                     event["best_loss"], event["best_epoch"], event["since_best"], event["patience"], per,
                     _eta(left_min * per), _eta(left_max * per),
                     _eta(left_max * per + folds_left * event["max_epochs"] * per))
        elif kind == "resumed":
            LOG.info("[%s] fold %d/%d: resumed after epoch %d (checkpoint)", config, fold + 1, n_folds,
                     event["epoch"])
        elif kind == "done":
            LOG.info("[%s] fold %d/%d: %s after epoch %d; best epoch %d (validation loss %.4f)", config, fold + 1,
                     n_folds, event["reason"], event["epoch"], event["best_epoch"], event["best_loss"])
    return log


def _validation_cases(model_dir: Path, config: str, plan, cases, folds: Sequence[int], *, device: str,
                      threads: int) -> list:
    """Each validation participant predicted by its own fold's network, on its post-op T1w-CE grid."""
    from bids_postop.agunet.data import brain_from_stripped
    from bids_postop.core.images import load_3d
    from bids_postop.segmentation import raidionics as R
    from bids_postop.training.datasets import load_label
    from bids_postop.training.threshold import ValidationCase

    roles = CONFIGURATIONS[config]  # type: ignore[index]
    ini = R.read_preprocessing_ini(model_dir)
    by_id = {c.participant_id: c for c in cases}
    out = []
    for fold in folds:
        for pid in plan.validation(fold):
            if pid not in by_id:
                continue
            case = by_id[pid]
            images = [load_3d(case.channels[r], what=f"prepared {r}") for r in roles]
            arrays = [img.get_fdata(dtype=np.float32) for img in images]
            prepared = R.preprocess(arrays, images[0].affine, ini, label_channels=[r == "preop_mask" for r in roles],
                                    brain_mask=brain_from_stripped(arrays[0]))
            probabilities = R.run_folds([model_dir / f"fold_{fold}" / "model.onnx"], prepared.data, ini,
                                        device=device, threads=threads)
            probability = R.to_reference_grid(probabilities[..., ini.foreground_class], prepared)
            truth = load_label(case.label, case.channels["postop_t1ce"])
            out.append(ValidationCase(probability, truth, images[0].affine, pid, fold, segmentation={
                "backend": "raidionics", "engine": "onnxruntime", "folds": [fold], "n_networks": 1,
                "use_mirroring": False}))
            LOG.info("[%s] validation prediction: %s (fold %d)", config, pid, fold)
    return out


def _up_to_date(model_dir: Path, data_hash: str, jobs: dict, rule: str) -> bool:
    try:
        card = json.loads((model_dir / "bids_postop_model.json").read_text())
    except (OSError, ValueError):
        return False
    training = card.get("training", {})
    return (training.get("data_hash") == data_hash and training.get("jobs") == jobs
            and card.get("threshold_selection", {}).get("rule") == rule
            and (card.get("uncertainty") or {}).get("version") == SECTION_VERSION
            and all((model_dir / f"fold_{k}" / "model.onnx").is_file() for k in jobs))


def train_configuration(config: str, args, cases, plan, command: str, *, options: AgunetOptions,
                        folds: Sequence[int] | None = None, name: str = "bids_postop-train-agunet",
                        cv_writer: Callable[[Path, list, float], object] | None = None,
                        cv_complete: Callable[[Path], bool] | None = None) -> Path:
    """Arrays → one AGU-Net per fold (worker processes) → package → own-fold validation predictions → threshold
    → card. Returns the model folder. ``cv_writer(model_dir, validation_cases, threshold)`` receives the
    own-fold predictions (written as BIDS derivatives by the caller); on a rerun with an up-to-date model it is
    called only when ``cv_complete(model_dir)`` is false."""
    from bids_postop.agunet.data import prepare_arrays
    from bids_postop.agunet.export import write_model_card, write_preprocessing_ini
    from bids_postop.training.review import review_card_section
    from bids_postop.training.threshold import choose_threshold

    folds = list(range(plan.n_folds)) if folds is None else sorted(set(folds))
    usable = [c for c in cases if c.has(config) and c.participant_id not in plan.test]
    ids = {c.participant_id for c in usable}
    dropped = [a.participant_id for a in plan.assignments if a.fold is not None and a.participant_id not in ids]
    if dropped:
        LOG.warning("[%s] not in the training data (inputs or manual mask missing): %s", config, ", ".join(dropped))
    for fold in folds:
        if not any(p in ids for p in plan.validation(fold)):
            raise UsageError(f"configuration {config}: fold {fold} has no participant with the inputs and a manual "
                             f"mask; lower --folds or choose another configuration")
        if not any(p in ids for p in plan.training(fold)):
            raise UsageError(f"configuration {config}: fold {fold} has no training participant")
    root = args.work_dir / "agunet" / config
    spec = network_spec(config, tiny=options.tiny)
    ini = write_preprocessing_ini(root, spec)
    data_hash = prepare_arrays(usable, config, ini, root / "data")
    LOG.info("[%s] AGU-Net %s×%s inputs, filters %s: %d cases, data hash %s", config,
             "×".join(map(str, spec.shape)), spec.n_inputs, "/".join(map(str, spec.filters)), len(usable),
             data_hash[:12])
    jobs: dict[int, dict] = {}
    start = time.monotonic()
    trained = 0
    for step, fold in enumerate(folds):
        fold_dir = root / f"fold_{fold}"
        job = FoldJob(spec=spec, data_dir=str(root / "data"), train=tuple(p for p in plan.training(fold) if p in ids),
                      val=tuple(p for p in plan.validation(fold) if p in ids), fold_dir=str(fold_dir),
                      max_epochs=options.max_epochs or STUDY_MAX_EPOCHS, patience=options.patience,
                      batch_size=options.batch_size, effective_batch_size=options.effective_batch_size,
                      iterations=options.iterations, learning_rate=options.learning_rate, augment=options.augment,
                      seed=fold, init_model=str(options.init_model) if options.init_model else None,
                      threads=options.threads, extra={"data_hash": data_hash})
        jobs[fold] = job.to_json()
        done = fold_dir / "done.json"
        if done.is_file() and (fold_dir / "model.onnx").is_file() and json.loads(done.read_text()) == jobs[fold]:
            LOG.info("[%s] fold %d/%d: already trained (%s): skipped", config, fold + 1, plan.n_folds, fold_dir)
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        (fold_dir / "job.json").write_text(json.dumps(jobs[fold], indent=1) + "\n")
        LOG.info("[%s] fold %d/%d: training on %d, validating on %d participants (TensorFlow worker; log %s)", config,
                 fold + 1, plan.n_folds, len(job.train), len(job.val), fold_dir / "worker.log")
        fold_start = time.monotonic()
        run_worker(["train", str(fold_dir / "job.json"), "--onnx", str(fold_dir / "model.onnx")],
                   log_file=fold_dir / "worker.log", threads=options.threads,
                   on_progress=_progress_logger(config, fold, plan.n_folds, len(folds) - step - 1))
        done.write_text(json.dumps(jobs[fold], indent=1) + "\n")
        trained += 1
        LOG.info("[%s] fold %d/%d: trained in %s", config, fold + 1, plan.n_folds,
                 _eta(time.monotonic() - fold_start))
    model_dir = args.work_dir / "agunet" / "models" / config
    jobs_key = {str(k): v for k, v in jobs.items()}
    if not trained and _up_to_date(model_dir, data_hash, jobs_key, options.threshold_rule):
        LOG.info("[%s] model %s is up to date (same data, folds trained before): reused", config, model_dir)
        if cv_writer is not None and not (cv_complete is not None and cv_complete(model_dir)):
            from bids_postop.segmentation.models import read_card
            from bids_postop.settings import resolve_device

            LOG.info("[%s] writing the cross-validation predictions (missing)", config)
            cv_writer(model_dir, _validation_cases(model_dir, config, plan, usable, folds,
                                                   device=resolve_device(options.device), threads=options.threads),
                      read_card(model_dir).threshold)
        return model_dir
    shutil.rmtree(model_dir, ignore_errors=True)
    for fold in folds:
        (model_dir / f"fold_{fold}").mkdir(parents=True)
        shutil.copy2(root / f"fold_{fold}" / "model.onnx", model_dir / f"fold_{fold}" / "model.onnx")
    write_preprocessing_ini(model_dir, spec)
    from bids_postop.settings import resolve_device

    device = resolve_device(options.device)
    val_cases = _validation_cases(model_dir, config, plan, usable, folds, device=device, threads=options.threads)
    thr = choose_threshold(val_cases, rule=options.threshold_rule)
    thr["validation_participants"] = [c.participant_id for c in val_cases]
    LOG.info("[%s] threshold %.2f (%s)", config, thr["threshold"], thr["how"])
    write_preprocessing_ini(model_dir, spec, threshold=thr["threshold"])
    training_set = bids_dataset_name(args.bids_dir)
    write_model_card(model_dir, configuration=config, threshold=thr["threshold"], name=f"{name}-{config}",
                     description=f"AGU-Net (full volume, {'×'.join(map(str, spec.shape))}, filters "
                                 f"{'/'.join(map(str, spec.filters))}) for residual glioblastoma on early "
                                 f"post-operative MRI, input configuration {config}, {len(folds)} fold network(s) "
                                 f"averaged; trained with bids_postop-train {__version__}"
                                 f"{trained_on(training_set)}.",
                     extra={"agunet": {"network": spec.to_json(), "folds": folds},
                            "threshold_selection": thr,
                            "uncertainty": review_card_section(config, val_cases, threshold=thr["threshold"],
                                                        rule=options.threshold_rule),
                            "training": {
                                "command": command, "date": _dt.date.today().isoformat(),
                                "bids_dir": str(args.bids_dir), "dataset_name": training_set,
                                "data_hash": data_hash, "n_cases": len(usable),
                                "jobs": jobs_key,
                                "folds": [{"fold": k, "sites": sorted(s for s, f in plan.site_folds.items() if f == k),
                                           "validation": list(jobs[k]["val"])} for k in folds],
                                "test_sites": list(plan.test_sites), "test_participants": plan.test,
                                "training_seconds_this_run": round(time.monotonic() - start),
                                "versions": _versions(), "bids_postop_version": __version__}})
    LOG.info("[%s] model written: %s", config, model_dir)
    if cv_writer is not None:
        cv_writer(model_dir, val_cases, thr["threshold"])
    return model_dir


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
