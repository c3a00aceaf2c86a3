"""nnU-Net v2 backend: the only module that imports nnunetv2.

Inputs arrive as NIfTI files on the post-op T1w-CE grid, in the model's channel order. They are handed to
``nnUNetPredictor`` as (C, z, y, x) arrays with a (z, y, x) spacing, in the voxel order and with the spacing
that the model's *input convention* prescribes, and the foreground probability comes back on the grid of the
first channel. Folds found in the model folder are averaged.

Input convention (:func:`reader_convention`): the model card's ``"nnunet": {"input_convention": ...}``.

- ``"RAS"``: the channels are put in RAS+ voxel order (axis flips/permutations of the stored order,
  :mod:`bids_postop.core.images`, no interpolation), spacing from the affine. What models from
  ``bids_postop-train`` expect: their training images were written in RAS+ voxel order
  (:mod:`bids_postop.training.datasets`) and read by nnU-Net's NibabelIO; ``bids_postop-train`` writes
  ``"input_convention": "RAS"`` into its cards, and a bids_postop card *without* the field means ``"RAS"``
  (the convention of every bids_postop model made before the field existed).
- ``"nnUNetv2_predict"``: what ``nnUNetv2_predict`` does with the same files: the image reader named by the model
  folder's ``plans.json`` (``image_reader_writer``, the reader nnUNetv2_predict uses), else its ``dataset.json``
  (``overwrite_image_reader_writer``), else nnU-Net's default for NIfTI, SimpleITKIO. The default for a bare
  nnU-Net trained-model folder (no card).
- a reader's name, to state it in the card: ``"SimpleITKIO"`` and ``"NibabelIO"`` keep the stored voxel order
  (SimpleITKIO's spacing is SimpleITK's, from the header's pixdim; NibabelIO's is ``header.get_zooms()``,
  also pixdim); ``"NibabelIOWithReorient"`` reorients to RAS+ with nibabel's ``as_reoriented`` (spacing
  from the reoriented affine's column norms, or the pixdim when the file is already RAS+);
  ``"SimpleITKIOWithReorient"`` reorients with ``SimpleITK.DICOMOrient(image, "RAS")``.
  Each is reproduced exactly (arrays and spacing equal the reader's ``read_images``: tests), from one read
  of the data with nibabel and the reader's own header logic; the probability is mapped back through the
  inverse axis flips/permutations.

``predict_probability``'s ``report`` records the convention used and where it was read
(``input_convention``, ``input_convention_from``).

Speed (issue #9), with results identical to ``predict_single_npy_array`` on the whole grid: the channels are
cropped to the bounding box of their nonzero voxels *before* they reach nnU-Net. nnU-Net crops to that same
box itself (``crop_to_nonzero``) before resampling, so the network sees the same array; what is saved is
nnU-Net's hole filling on the whole grid, copies of the whole grid per channel, and the two-class
probability map at full size (only the box's foreground probability is pasted into the grid). The
prediction's resampling back runs with the caller's thread count (nnU-Net's default is 8 threads, or
``nnUNet_def_n_proc``, whatever the machine).
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

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from bids_postop.core.images import load_3d, ras_voxel_sizes, same_grid
from bids_postop.errors import InputDataError, ModelError
from bids_postop.segmentation import nnunet_engines
from bids_postop.segmentation.backend import NO_MEMBERS, Members, Prediction
from bids_postop.segmentation.models import CARD_NAME, ModelCard

LOG = logging.getLogger("bids_postop")


@dataclass(frozen=True)
class NnUNetOptions:
    device: str = "cpu"  # "cpu" or "cuda"
    use_mirroring: bool = True
    tile_step_size: float = 0.5
    checkpoint: str | None = None  # None: the model card's choice, else checkpoint_final.pth
    folds: tuple[int | str, ...] | None = None  # None: the card's folds, else every fold_* present
    crop: bool = True  # crop to the channels' nonzero box before nnU-Net (same result, less work)
    threads: int | None = None  # torch threads for the steps nnU-Net runs with its own count; None: torch's
    bf16: bool = False  # CPU: bfloat16 autocast (torch and compiled engines; changes probabilities slightly)
    engine: str = "auto"  # auto | torch | onnxruntime (CPU fp32) | compiled (CPU): nnunet_engines.resolve_engine
    trust_checkpoint: bool = False  # allow checkpoints that need pickle (can run code from the file)
    mirror_scores: bool = False  # each network's mirror score (core.uncertainty.mirror_disagreement), in report


def trained_model_folder(card: ModelCard) -> Path:
    return (card.folder / str(card.details.get("trained_model_folder", "."))).resolve()


def available_folds(folder: Path, checkpoint: str) -> tuple[int | str, ...]:
    folds: list[int | str] = []
    for sub in sorted(folder.glob("fold_*")):
        if (sub / checkpoint).is_file():
            name = sub.name[len("fold_"):]
            folds.append(int(name) if name.isdigit() else name)
    return tuple(folds)


TRUST_FLAG = "--trust-checkpoint"


def _untrusted_message(path: Path, reason: str) -> str:
    return (f"{path}: refused: this nnU-Net checkpoint holds pickled Python objects besides the network weights "
            f"({reason}); loading it would let the file run code. Keep only its weights, on a machine you trust: "
            f"python -c \"from pathlib import Path; from bids_postop.training.nnunet import strip_checkpoint; "
            f"strip_checkpoint(Path('{path}'), Path('{path}.weights'))\" and move {path.name}.weights over "
            f"{path.name}; or, only if you trust where the file comes from, pass {TRUST_FLAG}")


def unsafe_globals(path: Path) -> list[str]:
    """The Python objects (``module.name``) a checkpoint's pickle names beyond what ``weights_only`` loading allows;
    empty when ``torch.load(path, weights_only=True)`` can read it. Reads the pickle without running it."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # a damaged or non-torch file: let the real load report it
        raise ModelError(f"{path}: cannot read the checkpoint ({exc})") from exc
    return sorted(names)


def check_checkpoints(card: ModelCard, *, trust_checkpoint: bool = False) -> None:
    """Refuse a model whose checkpoints need pickle unless ``trust_checkpoint`` (before any participant runs)."""
    folder = trained_model_folder(card)
    checkpoint = str(card.details.get("checkpoint", "checkpoint_final.pth"))
    folds = tuple(card.details.get("folds", ())) or available_folds(folder, checkpoint)
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            continue  # predict_probability names missing folds
        names = unsafe_globals(path)
        if names and not trust_checkpoint:
            raise ModelError(_untrusted_message(path, "it names " + ", ".join(names[:5])
                                                + (" …" if len(names) > 5 else "")))
        if names:
            LOG.warning("%s: loading a checkpoint with pickled objects (%s) because of %s", path,
                        ", ".join(names[:5]), TRUST_FLAG)


def load_checkpoint(path: Path, *, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Load an nnU-Net checkpoint with ``weights_only=True`` (no code execution from the file).

    A checkpoint that needs pickle (full nnU-Net checkpoints hold optimizer and logging state) is refused with
    a :class:`ModelError` naming the file, the reason, the fix
    (:func:`bids_postop.training.nnunet.strip_checkpoint`) and ``--trust-checkpoint``; with
    ``trust_checkpoint=True`` it is loaded in full, with a warning.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_checkpoint:
            import re

            text = str(exc).strip()
            found = re.search(r"GLOBAL (\S+)", text)
            reason = (f"weights-only loading stops at the object {found.group(1)}" if found
                      else f"weights-only loading failed: {text.splitlines()[0] if text else repr(exc)}")
            raise ModelError(_untrusted_message(path, reason)) from None
        LOG.warning("%s holds more than weights (optimizer or logging state); loading it in full because of %s",
                    path, TRUST_FLAG)
        return torch.load(path, map_location="cpu", weights_only=False)


# plans.json names the network class and, for some of its arguments, classes that nnU-Net imports with
# pydoc.locate (any importable module): only these installed packages may provide them.
NETWORK_PACKAGES = ("dynamic_network_architectures",)
NETWORK_ARGUMENT_PACKAGES = ("torch",)


def _installed_origin(dotted: str, packages: Sequence[str]) -> bool:
    """Whether ``dotted`` (``pkg.module.Class``) lies in one of ``packages`` as installed (not shadowed by a
    folder of the same name elsewhere on ``sys.path``), found without importing the module."""
    import importlib.util

    top = dotted.split(".", 1)[0]
    if top not in packages:
        return False
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return False
    site = [Path(p).resolve() for p in spec.submodule_search_locations]
    return all("site-packages" in p.parts or "dist-packages" in p.parts for p in site)


def check_network_classes(folder: Path, configuration_manager: Any) -> None:
    """Refuse plans whose network class (or class-valued arguments) come from outside the installed
    ``dynamic_network_architectures`` / ``torch`` packages (nnU-Net would import whatever plans.json names)."""
    name = str(configuration_manager.network_arch_class_name)
    if not _installed_origin(name, NETWORK_PACKAGES):
        raise ModelError(f"{folder / 'plans.json'}: network class {name!r} is not from the installed "
                         f"{', '.join(NETWORK_PACKAGES)}; refusing to import it")
    kwargs = configuration_manager.network_arch_init_kwargs
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        value = kwargs.get(key)
        if value is not None and not _installed_origin(str(value), NETWORK_ARGUMENT_PACKAGES):
            raise ModelError(f"{folder / 'plans.json'}: network argument {key} = {value!r} is not from the "
                             f"installed {', '.join(NETWORK_ARGUMENT_PACKAGES)}; refusing to import it")


@lru_cache(maxsize=4)
def build_predictor(folder: Path, folds: tuple[int | str, ...], checkpoint: str, device: str,
                    use_mirroring: bool, tile_step_size: float, trust_checkpoint: bool = False) -> Any:
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
        ckpt = load_checkpoint(folder / f"fold_{fold}" / checkpoint, trust_checkpoint=trust_checkpoint)
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
    check_network_classes(folder, configuration_manager)
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


# --- the input convention: which voxel order and spacing nnU-Net is fed --------------------------------------

CONVENTION_KEY = "input_convention"  # in the model card's "nnunet" section
RAS = "RAS"  # bids_postop-train's convention: RAS+ voxel order, spacing from the affine
FOLLOW_MODEL = "nnUNetv2_predict"  # the reader the model folder names, as nnUNetv2_predict uses it
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "SimpleITKIOWithReorient")
NNUNET_DEFAULT_READER = "SimpleITKIO"  # nnU-Net's first reader for .nii.gz when none is named
CONVENTIONS = (RAS, FOLLOW_MODEL, *READERS)


def model_reader(folder: Path) -> tuple[str, str]:
    """The image reader ``nnUNetv2_predict`` reads inputs with for the trained-model ``folder``, and where it
    is named: ``plans.json``'s ``image_reader_writer`` (what nnUNetv2_predict's preprocessor instantiates), else
    ``dataset.json``'s ``overwrite_image_reader_writer``, else nnU-Net's default for NIfTI (SimpleITKIO)."""
    import json

    def read(name: str) -> dict:
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder / name}: cannot read ({exc})") from exc

    planned = read("plans.json").get("image_reader_writer")
    overwrite = read("dataset.json").get("overwrite_image_reader_writer")
    overwrite = None if overwrite in (None, "None") else str(overwrite)
    if planned:
        if overwrite and overwrite != planned:
            LOG.warning("%s: dataset.json names the reader %s but plans.json %s; nnUNetv2_predict uses plans.json's",
                        folder, overwrite, planned)
        return str(planned), "plans.json"
    if overwrite:
        return overwrite, "dataset.json"
    return NNUNET_DEFAULT_READER, "nnU-Net default"


def input_convention(card: ModelCard) -> tuple[str, str]:
    """:func:`reader_convention` and where it comes from (``bids_postop_model.json``, ``plans.json``,
    ``dataset.json``, ``nnU-Net default``, or ``bids_postop_model.json (default)`` for a card without the
    field)."""
    value = card.details.get(CONVENTION_KEY)
    if value is None:
        if (card.folder / CARD_NAME).is_file():  # a bids_postop card from before the field: its historic convention
            return RAS, f"{CARD_NAME} (default)"
        value = FOLLOW_MODEL  # a bare nnU-Net folder: as nnUNetv2_predict
    if value == FOLLOW_MODEL:
        reader, source = model_reader(trained_model_folder(card))
    else:
        reader, source = str(value), CARD_NAME
    if reader not in (RAS, *READERS):
        where = card.folder / CARD_NAME if source == CARD_NAME else trained_model_folder(card) / source
        raise ModelError(f"{where}: input convention / image reader {reader!r} is not supported for NIfTI inputs; "
                         f"use one of {', '.join(CONVENTIONS)} (nnunet.{CONVENTION_KEY} in {CARD_NAME})")
    return reader, source


def reader_convention(card: ModelCard) -> str:
    """How the model's inputs are read: ``"RAS"`` (bids_postop-train models: RAS+ voxel order, spacing from the
    affine) or the nnU-Net reader whose arrays and spacing are reproduced (``"SimpleITKIO"``, ``"NibabelIO"``,
    ``"NibabelIOWithReorient"``, ``"SimpleITKIOWithReorient"``). From the card's ``nnunet.input_convention``;
    a bids_postop card without it: ``"RAS"``; a bare nnU-Net folder (or ``"nnUNetv2_predict"``): the reader
    ``nnUNetv2_predict`` would use (:func:`model_reader`). Raises :class:`ModelError` for other readers."""
    return input_convention(card)[0]


IDENTITY = np.array([[0, 1], [1, 1], [2, 1]])


@dataclass(frozen=True)
class ReaderView:
    """How one reader sees a grid: the axis flips/permutations from the stored (x, y, z) voxel order to the
    reader's (a nibabel orientation transform, applied before nnU-Net's (z, y, x) transposition) and the
    reader's (z, y, x) spacing."""

    ornt: np.ndarray
    spacing: tuple[float, float, float]

    def to_reader(self, array: np.ndarray) -> np.ndarray:
        """Stored (x, y, z) array → the reader's (z, y, x) array (a view)."""
        return nio.apply_orientation(array, self.ornt).transpose(2, 1, 0)

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_reader`."""
        inverse = np.empty_like(self.ornt)
        for axis, (new, flip) in enumerate(self.ornt):
            inverse[int(new)] = (axis, flip)
        return nio.apply_orientation(array.transpose(2, 1, 0), inverse)


def _floats(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (abs(float(v)) for v in values)
    return a, b, c


def reader_view(convention: str, path: str | Path) -> ReaderView:
    """The :class:`ReaderView` of the NIfTI file ``path`` under ``convention`` (reads the header only)."""
    path = Path(path)
    img = nib.load(str(path))
    if convention == RAS:
        return ReaderView(nio.io_orientation(img.affine), _floats(ras_voxel_sizes(img.affine)[::-1]))
    if convention == "NibabelIO":
        return ReaderView(IDENTITY, _floats(img.header.get_zooms()[:3][::-1]))
    if convention == "NibabelIOWithReorient":
        # NibabelIOWithReorient: nib_image.as_reoriented(io_orientation(affine)), spacing from its header; the
        # same call on a stand-in without data (as_reoriented rewrites the header from the new affine)
        ornt = nio.io_orientation(img.affine)
        stand_in = img.__class__(np.broadcast_to(np.float32(0), img.shape[:3]), img.affine, img.header)
        return ReaderView(ornt, _floats(stand_in.as_reoriented(ornt).header.get_zooms()[:3][::-1]))
    if convention in ("SimpleITKIO", "SimpleITKIOWithReorient"):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputDataError(f"SimpleITK (this nnU-Net model's reader, {convention}) cannot read it: "
                                 f"{str(exc).strip().splitlines()[-1]}", path) from exc
        spacing, direction = reader.GetSpacing()[:3], reader.GetDirection()
        if convention == "SimpleITKIO":
            return ReaderView(IDENTITY, _floats(spacing[::-1]))
        if len(direction) != 9:
            raise InputDataError(f"{convention} needs a 3-D image (SimpleITK reads {reader.GetDimension()}-D)", path)
        # SimpleITKIOWithReorient: DICOMOrient(image, "RAS"); its flips/permutations read off an indexed 2×2×2
        # image with the same direction and spacing (they depend on these only)
        probe = sitk.GetImageFromArray(np.arange(8, dtype=np.uint8).reshape(2, 2, 2))  # value = x + 2y + 4z
        probe.SetSpacing(spacing)
        probe.SetDirection(direction)
        oriented = sitk.DICOMOrient(probe, "RAS")
        values = sitk.GetArrayFromImage(oriented).transpose(2, 1, 0).astype(int)  # (x, y, z) after orienting
        ornt = np.empty((3, 2), dtype=int)
        for new_axis, step in enumerate(((1, 0, 0), (0, 1, 0), (0, 0, 1))):
            delta = int(values[step]) - int(values[0, 0, 0])
            ornt[int(np.log2(abs(delta)))] = (new_axis, 1 if delta > 0 else -1)
        return ReaderView(ornt, _floats(oriented.GetSpacing()[::-1]))
    raise ModelError(f"input convention {convention!r} is not one of {', '.join((RAS, *READERS))}")


def reader_arrays(convention: str, channel_files: Sequence[str | Path],
                  images: Sequence[nib.Nifti1Image] | None = None) -> tuple[list[np.ndarray], ReaderView]:
    """The (z, y, x) float32 arrays (views until cropped) nnU-Net is fed under ``convention``, and the view of
    the first file's grid (also how to map a prediction back). ``images``: the files already loaded."""
    if images is None:
        images = [load_3d(f) for f in channel_files]
    view = reader_view(convention, channel_files[0])
    return [view.to_reader(np.asarray(img.dataobj, dtype=np.float32)) for img in images], view


def predict_probability(card: ModelCard, channel_files: Sequence[str | Path], *,
                        options: NnUNetOptions = NnUNetOptions(), report: dict[str, Any] | None = None) -> np.ndarray:
    """Residual-tumour probability, float32, shape and voxel order of the first channel's grid.

    ``channel_files`` are NIfTI files in the order of ``card.channels``, all on one grid (the post-op
    T1w-CE grid, after registration and skull stripping). ``report``, when given, receives what was run:
    folds, number of networks, test-time mirroring axes, tile step, cropped box.
    """
    return predict(card, channel_files, options=options, report=report).probability


def predict(card: ModelCard, channel_files: Sequence[str | Path], *, options: NnUNetOptions = NnUNetOptions(),
            keep_members: bool = False, report: dict[str, Any] | None = None) -> Prediction:
    """:func:`predict_probability` and, with ``keep_members``, the ensemble's members
    (:class:`bids_postop.segmentation.backend.Members`): each fold when several run, else each mirrored pass when
    test-time mirroring runs, else none. Members are kept as logits at the network's resolution (float16, what
    nnU-Net accumulates) and each is brought to the first channel's grid on demand by the ensemble's own export
    (nnU-Net's resampling of the logits, softmax, uncropping, the convention's voxel order). The ensemble
    probability is the same with or without members (the fold loop's operations are nnU-Net's; mirrored passes
    ride along as extra channels of nnU-Net's own sliding window).
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
    convention, convention_from = input_convention(card)
    # (z, y, x) views in the convention's voxel order: no copy of the whole grid until the crop
    arrays, view = reader_arrays(convention, channel_files, images)
    spacing = list(view.spacing)
    predictor = build_predictor(folder, tuple(folds), checkpoint, options.device, options.use_mirroring,
                                options.tile_step_size, options.trust_checkpoint)
    box = nonzero_box(arrays) if options.crop else None
    bf16 = options.bf16 and predictor.device.type == "cpu" and nnunet_engines.cpu_computes_bf16()
    if options.bf16 and predictor.device.type == "cpu" and not bf16:
        LOG.info("bf16 requested but this CPU has no bf16 instructions (AVX512-BF16/AMX): running fp32")
    engine = nnunet_engines.resolve_engine(options.engine, predictor.device.type, bf16) if box else "torch"
    if report is not None:
        report.update(backend="nnunet", input_convention=convention, input_convention_from=convention_from,
                      folds=list(folds), n_networks=len(predictor.list_of_parameters),
                      use_mirroring=bool(predictor.use_mirroring),
                      mirror_axes=list(predictor.allowed_mirroring_axes or ()) if predictor.use_mirroring else [],
                      tile_step_size=float(predictor.tile_step_size),
                      cropped_box=None if box is None else [[s.start, s.stop] for s in box])
    keep_members = keep_members and nnunet_engines.members_kind(
        len(predictor.list_of_parameters), bool(predictor.use_mirroring), predictor.allowed_mirroring_axes) != "none"
    if box is None and keep_members:  # members come from the box path: the whole grid as the box (same result)
        box = tuple(slice(0, n) for n in arrays[0].shape)
    members, mirror_scores = NO_MEMBERS, None
    if box is None:  # the stock path on the whole grid (also when every voxel is 0)
        _, probabilities = predictor.predict_single_npy_array(np.stack(arrays), {"spacing": spacing}, None, None,
                                                              True)
        foreground = np.asarray(probabilities[1], dtype=np.float32)
    else:
        foreground = np.zeros(arrays[0].shape, dtype=np.float32)
        foreground[box], engine, member_logits, export = _predict_box(
            predictor, np.stack([a[box] for a in arrays]), spacing, options.threads, bf16=bf16, engine=engine,
            keep_members=keep_members, mirror_scores=options.mirror_scores)
        mirror_scores = member_logits.mirror_scores
        if member_logits.kind != "none":
            members = _grid_members(member_logits, export, box, arrays[0].shape, view, folds)
    if report is not None:  # the engine that ran (onnxruntime may have fallen back to torch)
        report.update(engine=engine, precision="bf16" if bf16 and engine in ("torch", "compiled")
                      else "fp32" if predictor.device.type == "cpu" else "fp16 autocast (nnU-Net)")
        if options.mirror_scores:
            report["mirror_scores"] = mirror_scores
    return Prediction(np.ascontiguousarray(view.to_stored(foreground), dtype=np.float32), members,
                      tuple(mirror_scores) if mirror_scores is not None else None)


def _grid_members(member_logits: nnunet_engines.MemberLogits, export: Any, box: tuple[slice, ...],
                  shape: tuple[int, ...], view: ReaderView, folds: Sequence[int | str]) -> Members:
    """Members whose probabilities are computed on demand: ``export`` (the ensemble's, for the reader-order ``box``
    of a reader-order grid of ``shape``) of one member's logits, in the stored voxel order; they cover the stored
    grid's box that ``box`` maps to (the ensemble is 0 outside it)."""

    def probability(index: int) -> np.ndarray:  # a view in the stored order: no copy of the box
        return view.to_stored(export(member_logits.logits[index].float()))

    names = member_logits.names
    if member_logits.kind == "folds":
        names = tuple(f"fold_{fold}" for fold in folds)
    kind = "folds" if member_logits.kind == "folds" else "mirrored passes"
    return Members(kind, names, probability, stored_box(view, shape, box))


def stored_box(view: ReaderView, reader_shape: Sequence[int], box: Sequence[slice]) -> tuple[slice, ...]:
    """The stored-order slices of the grid region that the reader-order ``box`` (of a reader array of
    ``reader_shape``) covers: stored axis ``i`` is reader axis ``2 − ornt[i, 0]`` (nnU-Net's (z, y, x)), reversed
    where ``ornt[i, 1]`` is −1."""
    out = []
    for new_axis, flip in view.ornt:
        axis = 2 - int(new_axis)
        lo, hi, n = int(box[axis].start or 0), int(box[axis].stop), int(reader_shape[axis])
        out.append(slice(n - hi, n - lo) if flip < 0 else slice(lo, hi))
    return tuple(out)


def nonzero_box(arrays: Sequence[np.ndarray]) -> tuple[slice, ...] | None:
    """Bounding box (slices) of the voxels that are nonzero in any of the same-shape ``arrays``; ``None``
    when all are zero."""
    nonzero = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        nonzero |= array != 0
    box = []
    for axis in range(nonzero.ndim):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _predict_box(predictor: Any, data: np.ndarray, spacing: list[float], threads: int | None, *,
                 bf16: bool = False, engine: str = "torch", keep_members: bool = False, mirror_scores: bool = False
                 ) -> tuple[np.ndarray, str, nnunet_engines.MemberLogits, Any]:
    """Foreground probability of a (C, z, y, x) box: nnU-Net's preprocessing, sliding window and resampling
    back, i.e. ``predict_single_npy_array`` without its whole-grid work; the engine that ran; the members' logits
    (``keep_members``, :func:`nnunet_engines.predict_logits_and_members`) and the export that turns logits into the
    box's foreground probability. ``engine`` "onnxruntime" or "compiled" answers the network calls with that
    engine's fold networks (:mod:`bids_postop.segmentation.nnunet_engines`), falling back to torch if that fails."""
    import torch

    data, properties = _preprocess_for_inference(predictor, data, spacing)
    tensor = torch.from_numpy(data)
    logits, members = None, nnunet_engines.MemberLogits("none")
    if engine != "torch":
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and engine == "compiled"):
                logits, members = nnunet_engines.predict_logits_and_members(
                    predictor, tensor, threads or torch.get_num_threads(), engine, keep_members=keep_members,
                    mirror_scores=mirror_scores)
        except Exception as exc:  # torch.onnx / onnxruntime / inductor raise many types; torch gives the same result
            LOG.warning("%s could not run this nnU-Net network (%s: %s); running it with torch",
                        engine, type(exc).__name__, str(exc)[:500])
            engine = "torch"
    if logits is None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # bf16: CPU only (caller)
            if keep_members or mirror_scores:
                logits, members = nnunet_engines.predict_logits_and_members(
                    predictor, tensor, threads or torch.get_num_threads(), "torch", keep_members=keep_members,
                    mirror_scores=mirror_scores)
            else:  # nnU-Net's own fold loop
                logits = predictor.predict_logits_from_preprocessed_data(tensor)
    logits = logits.cpu().float()
    del data, tensor

    def export(box_logits: Any) -> np.ndarray:
        if _lean_export_applies(predictor, box_logits):
            return _foreground_probability(predictor, box_logits, properties)
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            box_logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
            properties, return_probabilities=True, num_threads_torch=threads or torch.get_num_threads())
        return np.asarray(probabilities[1], dtype=np.float32)

    return export(logits), engine, members, export


def _preprocess_for_inference(predictor: Any, data: np.ndarray, spacing: list[float]) -> tuple[np.ndarray, dict]:
    """nnU-Net's ``DefaultPreprocessor.run_case_npy`` for inference (no segmentation given), step for step,
    without resampling the nonzero-mask "segmentation" it builds while cropping: that mask serves the
    normalisation (before resampling) and its resampled copy is discarded at inference, but resampling it
    (as float64, on the whole cropped grid) was the memory peak of a 896×896×512 run. Other preprocessor
    classes run unchanged."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    if type(preprocessor) is not DefaultPreprocessor:
        data, _, properties = preprocessor.run_case_npy(data, None, {"spacing": spacing}, plans_manager,
                                                        configuration_manager, predictor.dataset_json)
        return data, properties
    data = np.asarray(data, dtype=np.float32).transpose([0, *[i + 1 for i in plans_manager.transpose_forward]])
    original_spacing = [spacing[i] for i in plans_manager.transpose_forward]
    properties: dict = {"spacing": spacing, "shape_before_cropping": data.shape[1:]}
    data, nonzero, bbox = crop_to_nonzero(data, None)
    properties["bbox_used_for_cropping"] = bbox
    properties["shape_after_cropping_and_before_resampling"] = data.shape[1:]
    target_spacing = list(configuration_manager.spacing)
    if len(target_spacing) < len(data.shape[1:]):
        target_spacing = [original_spacing[0], *target_spacing]
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
    data = preprocessor._normalize(data, nonzero, configuration_manager,
                                   plans_manager.foreground_intensity_properties_per_channel)
    del nonzero
    data = configuration_manager.resampling_fn_data(data, new_shape, original_spacing, target_spacing)
    return data, properties


def _lean_export_applies(predictor: Any, logits: Any) -> bool:
    """Two-class softmax model whose probabilities nnU-Net resamples with a linear interpolation (order ≤ 1)."""
    kwargs = predictor.configuration_manager.configuration.get("resampling_fn_probabilities_kwargs", {})
    return (int(logits.shape[0]) == 2 and not predictor.label_manager.has_regions
            and int(kwargs.get("order", 3)) <= 1 and int(kwargs.get("order_z", 0)) <= 1)


def _foreground_probability(predictor: Any, logits: Any, properties: dict) -> np.ndarray:
    """nnU-Net's export of the foreground probability with one resampled channel instead of two.

    nnU-Net resamples both logits to the box grid, then takes the softmax: its class 1 is
    ``sigmoid(l1 − l0)``, and a linear interpolation commutes with the difference, so resampling ``l1 − l0``
    alone (with nnU-Net's own resampling function and arguments) gives the same probability with half the
    resampling work and memory (the box of a 896×896×512 grid holds hundreds of millions of voxels). Outside
    nnU-Net's crop the probability is 0, as in its ``revert_cropping_on_probabilities``.
    """
    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    difference = (logits[1] - logits[0])[None].float().numpy()
    probability = _resample_linear_float32(configuration_manager, difference, shape, current_spacing,
                                           spacing_transposed)
    if probability is None:  # another resampling: nnU-Net's function
        resampled = configuration_manager.resampling_fn_probabilities(difference, shape, current_spacing,
                                                                       spacing_transposed)
        probability = np.asarray(resampled[0], dtype=np.float32)
        del resampled
    del difference
    with np.errstate(over="ignore"):  # sigmoid in place: exp(−d) may overflow to inf → probability 0
        np.negative(probability, out=probability)
        np.exp(probability, out=probability)
        probability += 1.0
        np.reciprocal(probability, out=probability)
    if tuple(probability.shape) == tuple(properties["shape_before_cropping"]):
        full = probability  # nnU-Net's crop is the whole box (the channels were cropped to their nonzero box)
    else:
        full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
        box = tuple(slice(int(lo), int(hi)) for lo, hi in properties["bbox_used_for_cropping"])
        full[box] = probability
        del probability
    return np.ascontiguousarray(full.transpose(plans_manager.transpose_backward))


def _resample_linear_float32(configuration_manager: Any, data: np.ndarray, shape: Sequence[int],
                             current_spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray | None:
    """nnU-Net's default probability resampling of a one-channel float32 ``data`` (1, *s) to ``shape``, written
    straight into a float32 array; ``None`` when the configuration resamples otherwise.

    nnU-Net's ``resample_data_or_seg_to_shape`` with order 1 and no separate z runs
    ``skimage.transform.resize(data.astype(float64), shape, order=1, mode="edge", anti_aliasing=False)``, i.e.
    ``scipy.ndimage.zoom(…, order=1, mode="nearest", grid_mode=True)`` clipped to the input's range, in float64,
    then copies it into a float32 array. The same zoom with a float32 output array computes each value in double
    and rounds it once, exactly as that copy does (test: bit for bit), without the float64 array of the whole
    box (2 GiB of transient memory for a 258-million-voxel box)."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        determine_do_sep_z_and_axis,
        resample_data_or_seg_to_shape,
    )
    from scipy import ndimage

    function = configuration_manager.resampling_fn_probabilities
    kwargs = dict(getattr(function, "keywords", {}) or {})
    if getattr(function, "func", None) is not resample_data_or_seg_to_shape or kwargs.get("is_seg", False) \
            or int(kwargs.get("order", 3)) != 1 or data.ndim != 4 or data.shape[0] != 1 or data.dtype != np.float32:
        return None
    separate_z, _ = determine_do_sep_z_and_axis(kwargs.get("force_separate_z", False), current_spacing,
                                                new_spacing, kwargs.get("separate_z_anisotropy_threshold", 3))
    if separate_z:
        return None
    shape = tuple(int(n) for n in shape)
    if tuple(data.shape[1:]) == shape:
        return np.array(data[0], dtype=np.float32)
    source = data[0].astype(np.float64)
    zoom = [1 / f for f in np.divide(source.shape, shape)]  # skimage.transform.resize's factors
    out = np.empty(shape, dtype=np.float32)
    ndimage.zoom(source, zoom, output=out, order=1, mode="nearest", grid_mode=True)
    np.clip(out, source.min(), source.max(), out=out)  # resize's clip to the input range (bounds exact in float32)
    return out


def first_fold(card: ModelCard) -> tuple[int | str, ...]:
    """The first fold of the model (the card's list, else the first ``fold_*`` present): what ``--fast`` runs."""
    folder = trained_model_folder(card)
    checkpoint = str(card.details.get("checkpoint", "checkpoint_final.pth"))
    folds = tuple(card.details.get("folds", ())) or available_folds(folder, checkpoint)
    if not folds:
        raise ModelError(f"{folder}: no fold_*/{checkpoint} found")
    return folds[:1]
