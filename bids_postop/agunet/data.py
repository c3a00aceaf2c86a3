"""AGU-Net training arrays, made with the very pre-processing the participant level applies at inference
(:func:`bids_postop.segmentation.raidionics.preprocess` with the package's ``pre_processing.ini``): 1 mm
RAS+ resampling, crop to the brain box, resize to the network shape, z-score. No TensorFlow here.

Per participant, in ``data_dir``: ``sub-X_input.npy`` (x, y, z, C) float32 and ``sub-X_label.npy`` (x, y, z)
float32, the manual mask carried through the same geometry with linear interpolation (a soft tumour
fraction in [0, 1]: small residuals survive the downsampling). ``sub-X.json`` records the sources (path,
size, mtime) and the ini text: an unchanged participant is not prepared again.

The brain box comes from the skull-stripped post-op T1w-CE (its non-zero voxels): the prepared channels
are zero outside the brain mask the participant level passes at inference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bids_postop.configurations import CONFIGURATIONS
from bids_postop.training.datasets import PreparedCase, hash_files, load_label

LOG = logging.getLogger("bids_postop.training")


def _signature(files: Sequence[Path], ini_text: str) -> dict:
    return {"ini": ini_text, "sources": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def brain_from_stripped(t1ce: np.ndarray) -> np.ndarray:
    """The brain mask implied by a skull-stripped image: its non-zero voxels."""
    return np.asarray(t1ce) != 0


def prepare_case(case: PreparedCase, config_name: str, ini_path: Path, data_dir: Path) -> tuple[Path, Path]:
    """Write (or reuse) the input and label arrays of one participant; returns their paths."""
    from bids_postop.core.images import load_3d
    from bids_postop.segmentation import raidionics as R

    roles = CONFIGURATIONS[config_name]  # type: ignore[index]
    files = [Path(case.channels[r]) for r in roles]
    ini_text = Path(ini_path).read_text()
    data_dir.mkdir(parents=True, exist_ok=True)
    inp, lab, meta = (data_dir / f"{case.participant_id}{s}" for s in ("_input.npy", "_label.npy", ".json"))
    signature = _signature([*files, Path(case.label)], ini_text)
    if inp.is_file() and lab.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()) == signature:
                return inp, lab
        except ValueError:
            pass
    config = R.read_preprocessing_ini(ini_path)
    images = [load_3d(f, what=f"prepared {r}") for f, r in zip(files, roles, strict=True)]
    arrays = [img.get_fdata(dtype=np.float32) for img in images]
    affine = images[0].affine
    brain = brain_from_stripped(arrays[0])
    prepared = R.preprocess(arrays, affine, config, label_channels=[r == "preop_mask" for r in roles],
                            brain_mask=brain)
    truth = load_label(case.label, files[0]).astype(np.float32)
    label = R.to_network_grid(truth, prepared, config, order=1)  # the inputs' geometry: crop, resample, resize
    np.save(inp, prepared.data.astype(np.float32))
    np.save(lab, np.clip(label, 0.0, 1.0).astype(np.float32))
    meta.write_text(json.dumps(signature) + "\n")
    return inp, lab


def prepare_arrays(cases: Sequence[PreparedCase], config_name: str, ini_path: Path, data_dir: Path, *,
                   progress: Callable[[str], None] = LOG.info) -> str:
    """Prepare every case's arrays; return the data hash (sha256 over the ini and all arrays, in name order)."""
    written: list[Path] = []
    for i, case in enumerate(cases, 1):
        written.extend(prepare_case(case, config_name, ini_path, data_dir))
        progress(f"[{config_name}] AGU-Net arrays {i}/{len(cases)}: {case.participant_id}")
    return hash_files([Path(ini_path), *sorted(written)], root=Path(ini_path).parent)
