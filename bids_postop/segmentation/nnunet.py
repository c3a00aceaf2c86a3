"""nnU-Net v2 backend: the only module that imports nnunetv2.

Inputs arrive as NIfTI files on the post-op T1w-CE grid, in the model's channel order. They are put in
RAS+ voxel order (lossless, :mod:`bids_postop.core.images`), handed to ``nnUNetPredictor`` as
(C, z, y, x) arrays with reversed spacing (what nnU-Net's own NIfTI readers produce), and the
foreground probability comes back on the original grid. Folds found in the model folder are averaged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bids_postop.core.images import from_ras, load_3d, ras_voxel_sizes, same_grid, to_ras
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation.models import ModelCard

LOG = logging.getLogger("bids_postop")


@dataclass(frozen=True)
class NnUNetOptions:
    device: str = "cpu"  # "cpu" or "cuda"
    use_mirroring: bool = True
    tile_step_size: float = 0.5
    checkpoint: str | None = None  # None: the model card's choice, else checkpoint_final.pth
    folds: tuple[int | str, ...] | None = None  # None: the card's folds, else every fold_* present


def trained_model_folder(card: ModelCard) -> Path:
    return (card.folder / str(card.details.get("trained_model_folder", "."))).resolve()


def available_folds(folder: Path, checkpoint: str) -> tuple[int | str, ...]:
    folds: list[int | str] = []
    for sub in sorted(folder.glob("fold_*")):
        if (sub / checkpoint).is_file():
            name = sub.name[len("fold_"):]
            folds.append(int(name) if name.isdigit() else name)
    return tuple(folds)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code execution from the file) when the file allows it."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        LOG.warning("%s holds more than weights (optimizer or logging state); loading it in full — only "
                    "do this with checkpoints you trust", path)
        return torch.load(path, map_location="cpu", weights_only=False)


@lru_cache(maxsize=4)
def build_predictor(folder: Path, folds: tuple[int | str, ...], checkpoint: str, device: str,
                    use_mirroring: bool, tile_step_size: float) -> Any:
    """Build an ``nnUNetPredictor`` once per process and model (it is reused by every participant)."""
    import nnunetv2
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = load_json(str(folder / "dataset.json"))
    plans_manager = PlansManager(load_json(str(folder / "plans.json")))
    parameters, trainer_name, configuration, mirror_axes = [], None, None, None
    for fold in folds:
        ckpt = _load_checkpoint(folder / f"fold_{fold}" / checkpoint)
        if trainer_name is None:
            trainer_name = ckpt["trainer_name"]
            configuration = ckpt["init_args"]["configuration"]
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
        parameters.append(ckpt["network_weights"])
    configuration_manager = plans_manager.get_configuration(configuration)
    # Trainer classes are looked up only inside the installed nnunetv2 package, never in the model folder.
    trainer_class = recursive_find_python_class(
        os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), trainer_name,
        "nnunetv2.training.nnUNetTrainer")
    if trainer_class is None:
        raise ModelError(f"{folder}: trainer class {trainer_name!r} is not part of the installed nnunetv2")
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                       enable_deep_supervision=False)
    torch_device = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a CUDA notice on every CPU predictor
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    trainer_name, mirror_axes)
    return predictor


def predict_probability(card: ModelCard, channel_files: Sequence[str | Path], *,
                        options: NnUNetOptions = NnUNetOptions()) -> np.ndarray:
    """Residual-tumour probability, float32, shape and voxel order of the first channel's grid.

    ``channel_files`` are NIfTI files in the order of ``card.channels``, all on one grid (the post-op
    T1w-CE grid, after registration and skull stripping).
    """
    if len(channel_files) != len(card.channels):
        raise ModelError(f"model {card.name} takes {len(card.channels)} channels ({', '.join(card.channels)}); "
                         f"got {len(channel_files)} files")
    folder = trained_model_folder(card)
    checkpoint = options.checkpoint or str(card.details.get("checkpoint", "checkpoint_final.pth"))
    folds = options.folds or tuple(card.details.get("folds", ())) or available_folds(folder, checkpoint)
    if not folds:
        raise ModelError(f"{folder}: no fold_*/{checkpoint} found")
    missing = [f for f in folds if not (folder / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise ModelError(f"{folder}: fold(s) {missing} have no {checkpoint}")

    images = [load_3d(f, what=f"{role} channel") for f, role in zip(channel_files, card.channels, strict=True)]
    reference = images[0]
    for img, path in zip(images[1:], channel_files[1:], strict=True):
        if not same_grid(reference, img):
            raise InputDataError(f"channel is not on the grid of {channel_files[0]}; register it first", path)
    stacked = np.stack([to_ras(np.asarray(img.dataobj, dtype=np.float32), reference.affine).transpose(2, 1, 0)
                        for img in images])
    spacing = list(ras_voxel_sizes(reference.affine))[::-1]
    predictor = build_predictor(folder, tuple(folds), checkpoint, options.device, options.use_mirroring,
                                options.tile_step_size)
    _, probabilities = predictor.predict_single_npy_array(stacked, {"spacing": spacing}, None, None, True)
    foreground = np.asarray(probabilities[1], dtype=np.float32).transpose(2, 1, 0)
    return from_ras(foreground, reference.affine).astype(np.float32)
