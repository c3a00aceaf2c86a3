"""nnU-Net v2 training through its Python API: the only training-side module that imports nnunetv2.

Plan → (optional tiny-network override) → preprocess → train each fold with ``nnUNetTrainer`` → export the
model folder the participant level reads (``<model>/nnunet/{dataset.json, plans.json, fold_k/
checkpoint_final.pth}``) with checkpoints stripped to network weights (``torch.load(weights_only=True)``).

nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` from the environment:
:func:`set_nnunet_paths` sets them (to folders of the work directory) before anything else runs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bids_postop.settings import resolve_device

LOG = logging.getLogger("bids_postop.training")

TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
# How the participant level must read inputs for these models (bids_postop.segmentation.nnunet.reader_convention):
# the raw datasets hold RAS+ voxel order (bids_postop.training.datasets.write_raw_dataset), read by NibabelIO.
INPUT_CONVENTION = "RAS"


@dataclass(frozen=True)
class TinyNetwork:
    """The demo's tiny PlainConvUNet (CPU-trainable in minutes; for demos and tests, not for real data)."""

    target_spacing: float = 1.5
    patch_size: tuple[int, int, int] = (64, 64, 64)
    features: tuple[int, ...] = (8, 16, 32, 64)
    batch_size: int = 2
    mirror_axes: tuple[int, ...] = (2,)  # test-time mirroring left-right only (axis 2 of (z, y, x))
    oversample_foreground: float = 0.5  # share of patches centred on tumour (nnU-Net default 0.33)


@dataclass(frozen=True)
class TrainingOptions:
    device: str = "auto"  # auto | cpu | cuda
    epochs: int | None = None  # None: nnU-Net's default (1000)
    iterations: int | None = None  # None: nnU-Net's default (250 per epoch)
    tiny: TinyNetwork | None = None
    num_processes: int = 1


def set_nnunet_paths(root: Path) -> dict[str, Path]:
    """Point nnU-Net's three folders into ``root`` (created) and keep it to few worker processes."""
    paths = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "preprocessed",
             "nnUNet_results": root / "results"}
    for var, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    return paths


def tiny_plans(plans: dict, tiny: TinyNetwork = TinyNetwork()) -> dict:
    """Override the 3d_fullres plan with the tiny network (in place; other configurations dropped)."""
    cfg = plans["configurations"][CONFIGURATION]
    cfg["spacing"] = [tiny.target_spacing] * 3
    cfg["patch_size"] = list(tiny.patch_size)
    cfg["batch_size"] = tiny.batch_size
    cfg["resampling_fn_data_kwargs"]["order"] = 1  # linear: faster than cubic, fine at 1.2–2.5 mm
    ak = cfg["architecture"]["arch_kwargs"]
    n = len(tiny.features)
    ak["n_stages"] = n
    ak["features_per_stage"] = list(tiny.features)
    ak["kernel_sizes"] = [[3, 3, 3]] * n
    ak["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    ak["n_conv_per_stage"] = [2] * n
    ak["n_conv_per_stage_decoder"] = [2] * (n - 1)
    for k in list(plans["configurations"]):
        if k != CONFIGURATION:
            del plans["configurations"][k]
    return plans


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    file = folder / "bids_postop_stamp.json"
    return file.is_file() and json.loads(file.read_text()) == json.loads(json.dumps(stamp))  # tuples → lists


def _write_stamp(folder: Path, stamp: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bids_postop_stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")


def plan_and_preprocess(dataset_id: int, *, data_hash: str, tiny: TinyNetwork | None,
                        num_processes: int = 1) -> Path:
    """Fingerprint, plan (tiny override if asked) and preprocess 3d_fullres; skipped when already done for
    the same data and plan. Returns the preprocessed dataset folder."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    name = convert_id_to_dataset_name(dataset_id)
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    stamp = {"data_hash": data_hash, "tiny": tiny.__dict__ if tiny else None}
    if _stamp_matches(folder, stamp) and (folder / f"{PLANS}.json").is_file():
        LOG.info("%s: planned and preprocessed before for the same data: reused", name)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.monotonic()
    extract_fingerprints([dataset_id], num_processes=max(num_processes, 1), check_dataset_integrity=True,
                         verbose=False)
    plan_experiments([dataset_id])
    if tiny is not None:
        plans = tiny_plans(load_json(str(folder / f"{PLANS}.json")), tiny)
        save_json(plans, str(folder / f"{PLANS}.json"), sort_keys=False)
    preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(max(num_processes, 1),),
               verbose=False)
    _write_stamp(folder, stamp)
    LOG.info("%s: planned and preprocessed in %.0f s", name, time.monotonic() - start)
    return folder


def results_folder(dataset_id: int) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    return (Path(os.environ["nnUNet_results"]) / convert_id_to_dataset_name(dataset_id)
            / f"{TRAINER}__{PLANS}__{CONFIGURATION}")


def reset_results_if_stale(dataset_id: int, stamp: dict) -> Path:
    """Remove trained folds made for other data, splits or settings; return the results folder."""
    folder = results_folder(dataset_id)
    if folder.exists() and not _stamp_matches(folder, stamp):
        LOG.warning("%s: trained with other data, splits or settings: its folds are removed and retrained", folder)
        shutil.rmtree(folder)
    _write_stamp(folder, stamp)
    return folder


def train_fold(dataset_id: int, fold: int, *, options: TrainingOptions,
               progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Train one fold (resuming from ``checkpoint_latest.pth`` if a previous run stopped); return its
    ``checkpoint_final.pth``. ``progress(epochs_done, epochs_total, seconds_per_epoch)`` after each epoch."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    out = results_folder(dataset_id) / f"fold_{fold}"
    final = out / "checkpoint_final.pth"
    if final.is_file():
        return final
    pp = Path(os.environ["nnUNet_preprocessed"]) / results_folder(dataset_id).parent.name
    plans = load_json(str(pp / f"{PLANS}.json"))
    latest = out / "checkpoint_latest.pth"
    plans["continue_training"] = latest.is_file()
    dataset_json = load_json(str(pp / "dataset.json"))
    trainer = nnUNetTrainer(plans, CONFIGURATION, fold, dataset_json,
                            device=torch.device(resolve_device(options.device)))
    if options.epochs is not None:
        trainer.num_epochs = options.epochs
    if options.iterations is not None:
        trainer.num_iterations_per_epoch = options.iterations
        trainer.num_val_iterations_per_epoch = max(1, min(50, options.iterations // 5))
    if options.tiny is not None:
        trainer.oversample_foreground_percent = options.tiny.oversample_foreground
    if latest.is_file():
        LOG.info("fold %d: resuming from %s", fold, latest)
        trainer.load_checkpoint(str(latest))
    first_epoch = trainer.current_epoch
    start = time.monotonic()
    on_epoch_end = trainer.on_epoch_end

    def on_epoch_end_with_progress() -> None:
        on_epoch_end()
        if progress is not None:
            done = trainer.current_epoch
            progress(done, trainer.num_epochs, (time.monotonic() - start) / max(done - first_epoch, 1))

    trainer.on_epoch_end = on_epoch_end_with_progress  # type: ignore[method-assign]
    trainer.run_training()
    if not final.is_file():
        raise RuntimeError(f"nnU-Net finished fold {fold} without writing {final}")
    return final


def strip_checkpoint(src: Path, dst: Path, *, mirror_axes: Sequence[int] | None | str = "keep") -> None:
    """Copy a checkpoint keeping only network weights, trainer name, init args (configuration, fold), test-time
    mirroring axes and epoch: loadable with ``torch.load(weights_only=True)``. ``mirror_axes="keep"`` keeps
    the trainer's axes."""
    import torch

    ck = torch.load(src, map_location="cpu", weights_only=False)
    # no clone(): the decoder shares the encoder's tensors, torch.save stores shared storage once
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v.detach()
               for k, v in ck["network_weights"].items()}
    axes = ck.get("inference_allowed_mirroring_axes") if isinstance(mirror_axes, str) else mirror_axes
    out = {
        "network_weights": weights,
        "trainer_name": TRAINER,
        "init_args": {"configuration": ck["init_args"]["configuration"], "fold": ck["init_args"]["fold"]},
        "inference_allowed_mirroring_axes": tuple(int(a) for a in axes) if axes is not None else None,
        "current_epoch": int(ck.get("current_epoch", 0)),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    torch.load(dst, map_location="cpu", weights_only=True)  # must be readable without pickled objects


def export_model(dataset_id: int, model_dir: Path, folds: Sequence[int], *,
                 mirror_axes: Sequence[int] | None | str = "keep") -> Path:
    """Write ``model_dir/nnunet/{plans.json, dataset.json, fold_k/checkpoint_final.pth}`` (stripped)."""
    res = results_folder(dataset_id)
    nn_out = model_dir / "nnunet"
    shutil.rmtree(nn_out, ignore_errors=True)
    nn_out.mkdir(parents=True)
    shutil.copy(res / "plans.json", nn_out / "plans.json")
    shutil.copy(res / "dataset.json", nn_out / "dataset.json")
    for fold in folds:
        strip_checkpoint(res / f"fold_{fold}" / "checkpoint_final.pth",
                         nn_out / f"fold_{fold}" / "checkpoint_final.pth", mirror_axes=mirror_axes)
    return nn_out


def card_section(folds: Sequence[int]) -> dict:
    """The ``"nnunet"`` section of the model card of an exported model (:func:`export_model`): where the trained
    model lies, its folds and checkpoint, and the input convention its training data followed
    (``input_convention``: :data:`INPUT_CONVENTION`; without it the participant level would also assume RAS,
    but the card states it)."""
    return {"trained_model_folder": "nnunet", "folds": [int(f) for f in folds], "checkpoint": "checkpoint_final.pth",
            "input_convention": INPUT_CONVENTION}


def set_inference_patch_size(model_dir: Path, patch_size: Sequence[int]) -> list[int]:
    """Write the sliding-window patch of inference into ``model_dir/nnunet/plans.json`` (3d_fullres).

    Training used the planned patch; the network is fully convolutional, so any patch whose sides are
    multiples of the network's total stride works (larger patches: fewer tiles). ``patch_size`` is in
    nnU-Net's axis order. Returns the previous patch. Raises ``ValueError`` for a side that is no multiple.
    """
    plans_file = model_dir / "nnunet" / "plans.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][CONFIGURATION]
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    total = [1, 1, 1]
    for stride in strides:  # per stage: one stride per axis, or one for all
        per_axis = stride if isinstance(stride, list) else [stride] * 3
        total = [t * s for t, s in zip(total, per_axis, strict=True)]
    bad = [(v, t) for v, t in zip(patch_size, total, strict=True) if v % t]
    if bad:
        raise ValueError(f"inference patch {list(patch_size)}: each side must be a multiple of the network's total "
                         f"stride {total}")
    previous = list(cfg["patch_size"])
    cfg["patch_size"] = [int(v) for v in patch_size]
    plans_file.write_text(json.dumps(plans, indent=4) + "\n")
    return previous


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import numpy as np
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
            "numpy": np.__version__}
