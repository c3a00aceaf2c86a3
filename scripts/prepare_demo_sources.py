"""Build the small real-data samples shipped in ``bids_postop/data/real/`` for the embedded demo.

Usage::

    python scripts/prepare_demo_sources.py [--src /work/shared/data/real] [--dst bids_postop/data/real]

For the three public pre-operative cases that have a tumour mask (TCGA-DU-7294, TCGA-FG-6692 in
SRI24 space, BraTS-MET-00110-000) it writes, per case folder:

- ``t1ce.nii.gz``, ``t1.nii.gz``, ``flair.nii.gz`` (int16, 0 outside the brain, negatives clipped),
- ``tumor_mask.nii.gz`` (uint8, 1 where any tumour label > 0, inside the brain),
- ``tumor_core_mask.nii.gz`` (uint8, labels other than oedema: the simulator's cavity source),
- ``brain_mask.nii.gz`` (uint8; TCGA: the given mask; BraTS-MET: non-zero T1w-CE, holes filled),

reoriented to RAS+, cropped to the brain bounding box plus a margin and resampled to 1.5 mm
isotropic (order 1 after a light anti-alias filter for images, order 1 + threshold 0.5 for masks),
with affines that keep every voxel at its original world position. It also writes ``SOURCES.md``
and copies the BrainLesion repository licence.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SPACING = 1.5
MARGIN_MM = 6.0
OEDEMA_LABEL = 2  # BraTS-2020 fusion (1 necrosis, 2 oedema, 4 enhancing) and AURORA (1 core, 2 oedema)

CASES: dict[str, dict[str, str]] = {
    "tcga-du-7294": {
        "t1ce": "tcga-du-7294/TCGA-DU-7294_t1c_bet.nii.gz",
        "t1": "tcga-du-7294/TCGA-DU-7294_t1_bet.nii.gz",
        "flair": "tcga-du-7294/TCGA-DU-7294_fla_bet.nii.gz",
        "tumor": "tcga-du-7294/TCGA-DU-7294_tumor_fusion_mav.nii.gz",
        "brain": "tcga-du-7294/TCGA-DU-7294_brainmask.nii.gz",
    },
    "tcga-fg-6692": {
        "t1ce": "tcga-fg-6692/sri24/TCGA-FG-6692_t1c_bet.nii.gz",
        "t1": "tcga-fg-6692/sri24/TCGA-FG-6692_t1_bet.nii.gz",
        "flair": "tcga-fg-6692/sri24/TCGA-FG-6692_fla_bet.nii.gz",
        "tumor": "tcga-fg-6692/sri24/TCGA-FG-6692_tumor_fusion_mav.nii.gz",
        "brain": "tcga-fg-6692/sri24/TCGA-FG-6692_brainmask.nii.gz",
    },
    "brats-met-00110-000": {
        "t1ce": "brats-met-00110-000/t1c.nii.gz",
        "t1": "brats-met-00110-000/t1.nii.gz",
        "flair": "brats-met-00110-000/flair.nii.gz",
        "tumor": "brats-met-00110-000/tumor_aurora_prediction.nii.gz",
    },
}

SOURCES_MD = """# Real pre-operative MRI samples shipped for the demo

These are small, derived copies of three public **pre-operative** brain-tumour scans. The demo
(`bids_postop-demo`) turns them into *simulated* post-operative cases (`bids_postop.demo.simulate`):
they are not post-operative scans and nothing here is clinical data.

- `tcga-du-7294/`: TCGA-LGG patient TCGA-DU-7294, skull-stripped, SRI24 space; tumour mask = majority
  vote of five BraTS-2020 algorithms. From github.com/BrainLesion/tutorials,
  BraTS-Toolkit/data/TCGA-DU-7294/. Terms: TCIA TCGA-LGG collection, CC BY 3.0 — cite TCIA (Clark et
  al., J Digit Imaging 2013) and TCGA; repository Apache-2.0 (LICENSE-BrainLesion-Apache-2.0).
- `tcga-fg-6692/`: TCGA-LGG patient TCGA-FG-6692 co-registered to SRI24, skull-stripped; fused tumour
  mask. From github.com/BrainLesion/tutorials, BraTS-Toolkit/data/OtherEXampleFromTCIA/. Terms: as above.
- `brats-met-00110-000/`: BraTS 2023 MET case 00110-000 (brain metastasis); tumour mask predicted by the
  AURORA model. From github.com/BrainLesion/tutorials, AURORA/. Terms: BraTS-MET data-use terms (cite
  the BraTS 2023 metastasis challenge papers); repository Apache-2.0.

## What was done (scripts/prepare_demo_sources.py)
- Kept T1w-CE, T1w (no contrast) and FLAIR; dropped T2w.
- Tumour mask: binary, 1 where any label > 0 (all sub-regions fused), restricted to the brain mask.
- Tumour core mask: labels other than 2 (oedema) — necrosis and enhancing tumour (BraTS-2020
  labels 1 and 4; AURORA label 1). The simulator carves the resection cavity from it.
- Brain mask: the given one for the TCGA cases; for BraTS-MET the non-zero voxels of the T1w-CE,
  holes filled slice-wise and in 3-D.
- Reoriented to RAS+ (nibabel `as_closest_canonical`), cropped to the brain bounding box plus a
  6 mm margin, resampled to 1.5 mm isotropic (images: Gaussian anti-alias sigma 0.35 voxel, then
  linear interpolation; masks: linear interpolation thresholded at 0.5). Affines keep world
  positions. Images are int16 with negative values (interpolation artefacts of the sources)
  clipped to 0 and 0 outside the brain; masks are uint8.

Files per folder: `t1ce.nii.gz`, `t1.nii.gz`, `flair.nii.gz`, `tumor_mask.nii.gz`,
`tumor_core_mask.nii.gz`, `brain_mask.nii.gz`.
"""


def _load_canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj).astype(np.float32), img.affine.copy()


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    out = ndimage.binary_fill_holes(mask)
    for axis in range(3):
        for i in range(out.shape[axis]):
            sl = [slice(None)] * 3
            sl[axis] = i
            out[tuple(sl)] = ndimage.binary_fill_holes(out[tuple(sl)])
    return out


def _resample(
    data: np.ndarray, affine: np.ndarray, lo: np.ndarray, shape: tuple[int, ...], *, is_mask: bool
) -> tuple[np.ndarray, np.ndarray]:
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    step = SPACING / zooms  # input voxels per output voxel
    if not is_mask:
        data = ndimage.gaussian_filter(data, sigma=0.35 * step)
    out = ndimage.affine_transform(
        data, np.diag(step), offset=lo, output_shape=shape, order=1, mode="constant", cval=0.0
    )
    new_aff = affine.copy()
    new_aff[:3, :3] = affine[:3, :3] @ np.diag(step)
    new_aff[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return out, new_aff


def prepare_case(src: Path, dst: Path, files: dict[str, str]) -> None:
    """Write one shipped case folder from the source files named in ``files``."""
    t1ce, aff = _load_canonical(src / files["t1ce"])
    if "brain" in files:
        brain = _load_canonical(src / files["brain"])[0] > 0
    else:
        brain = _fill_holes(t1ce > 0)
        lab, n = ndimage.label(brain)
        if n > 1:
            sizes = ndimage.sum(brain, lab, range(1, n + 1))
            brain = lab == (int(np.argmax(sizes)) + 1)
    coords = np.argwhere(brain)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    margin = MARGIN_MM / zooms
    lo = np.maximum(coords.min(axis=0) - margin, 0)
    hi = np.minimum(coords.max(axis=0) + margin, np.array(brain.shape) - 1)
    shape = tuple(int(np.floor((hi[i] - lo[i]) * zooms[i] / SPACING)) + 1 for i in range(3))
    dst.mkdir(parents=True, exist_ok=True)
    brain_r, new_aff = _resample(brain.astype(np.float32), aff, lo, shape, is_mask=True)
    brain_r = brain_r >= 0.5
    for role in ("t1ce", "t1", "flair"):
        data = t1ce if role == "t1ce" else _load_canonical(src / files[role])[0]
        data = np.clip(data, 0, None) * brain
        out, _ = _resample(data, aff, lo, shape, is_mask=False)
        out = np.clip(np.rint(out), 0, 32767).astype(np.int16) * brain_r
        img = nib.Nifti1Image(out.astype(np.int16), new_aff)
        img.set_qform(new_aff, code=1)
        img.set_sform(new_aff, code=1)
        nib.save(img, str(dst / f"{role}.nii.gz"))
    labels = _load_canonical(src / files["tumor"])[0]
    tumor = (labels > 0) & brain
    core = (labels > 0) & (labels != OEDEMA_LABEL) & brain
    tumor_r, _ = _resample(tumor.astype(np.float32), aff, lo, shape, is_mask=True)
    core_r, _ = _resample(core.astype(np.float32), aff, lo, shape, is_mask=True)
    masks = (
        ("tumor_mask", (tumor_r >= 0.5) & brain_r),
        ("tumor_core_mask", (core_r >= 0.5) & brain_r),
        ("brain_mask", brain_r),
    )
    for name, m in masks:
        img = nib.Nifti1Image(m.astype(np.uint8), new_aff)
        img.set_qform(new_aff, code=1)
        img.set_sform(new_aff, code=1)
        nib.save(img, str(dst / f"{name}.nii.gz"))
    vol = float((tumor_r >= 0.5).sum() * SPACING**3 / 1000)
    vcore = float((core_r >= 0.5).sum() * SPACING**3 / 1000)
    print(f"{dst.name}: shape {shape}, tumour {vol:.1f} ml, core {vcore:.1f} ml")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path("/work/shared/data/real"))
    parser.add_argument(
        "--dst", type=Path, default=Path(__file__).resolve().parents[1] / "bids_postop" / "data" / "real"
    )
    args = parser.parse_args(argv)
    for case, files in CASES.items():
        prepare_case(args.src, args.dst / case, files)
    (args.dst / "SOURCES.md").write_text(SOURCES_MD)
    shutil.copy(args.src / "LICENSE-BrainLesion-Apache-2.0", args.dst / "LICENSE-BrainLesion-Apache-2.0")
    total = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    print(f"total size of {args.dst}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
