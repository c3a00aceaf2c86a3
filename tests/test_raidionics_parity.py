"""The Raidionics backend gives the official library's result: raidionicsseg 1.5.2 (installed by the test extra)
and bids_postop run side by side on real scans with Raidionics packages built here, every probability compared on
the scan's own grid.

The packages' networks are tiny closed-form ONNX graphs (onnx helper API): a weighted sum of the input channels
(a different weight per channel) times a ramp along the three network axes (different slopes), through a
sigmoid. A swapped channel, a flip or a one-voxel shift of any axis changes the output: the last test shows that
each makes the comparison fail. raidionicsseg runs in one subprocess for all packages (it sets
``CUDA_VISIBLE_DEVICES`` in its process), driven as its own tests drive it: a config.ini naming the inputs folder
(``input0.nii.gz`` …), the model folder and the output folder, then ``raidionicsseg.fit.run_model``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL
from raidionics_onnx import make_onnx

from bids_postop.configurations import CONFIGURATIONS
from bids_postop.segmentation import raidionics as R
from bids_postop.segmentation.models import resolve_models
from bids_postop.segmentation.raidionics_model import card_for_raidionics_folder

pytestmark = pytest.mark.slow  # about a minute on 2 cores

NATIVE = REAL / "tcga-fg-6692" / "native"  # 256×224×26, 0.9×0.9×5.5 mm, LAS, with skull
DU = REAL / "tcga-du-7294"  # 240×240×155, 1 mm, LPS, skull-stripped, with a tumour mask
MET = REAL / "brats-met-00110-000"  # 240×240×155, 1 mm, RAS, skull-stripped
MAX_DP, MIN_DICE = 1e-3, 0.999


# ------------------------------------------------------------------------------------------------
# real scans, derived as the cases need


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _rotated(affine: np.ndarray, degrees: float = 17.0) -> np.ndarray:
    """The affine turned by ``degrees`` about an oblique axis through the world origin (the data unchanged)."""
    axis = np.array([1.0, 0.6, 0.35]) / np.linalg.norm([1.0, 0.6, 0.35])
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(4)
    rot[:3, :3] = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    return rot @ affine


def _half(src: Path, dst: Path, *, binary: bool = False) -> Path:
    """Every second voxel of a 1 mm scan (2 mm; the real anatomy, a quarter of the voxels for speed)."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)[::2, ::2, ::2]
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    return _save((data > 0).astype(np.uint8) if binary else data, affine, dst)


def scans(root: Path) -> dict[str, Path]:
    out = {"native_t1c": NATIVE / "TCGA-FG-6692_t1c.nii.gz", "native_t1": NATIVE / "TCGA-FG-6692_t1.nii.gz",
           "native_brain": NATIVE / "TCGA-FG-6692_t1c_brainmask_hdbet.nii.gz"}
    for key in ("t1c", "t1", "brain"):  # the native scan made oblique: its affine turned by 17°
        img = nib.load(str(out[f"native_{key}"]))
        out[f"oblique_{key}"] = _save(np.asarray(img.dataobj), _rotated(img.affine), root / f"oblique_{key}.nii.gz")
    for key, name in (("t1c", "t1c_bet"), ("t1", "t1_bet"), ("flair", "fla_bet"), ("t2", "t2_bet"),
                      ("brain", "brainmask")):
        out[f"du_{key}"] = _half(DU / f"TCGA-DU-7294_{name}.nii.gz", root / f"du_{key}.nii.gz")
    out["du_tumour"] = _half(DU / "TCGA-DU-7294_tumor_fusion_mav.nii.gz", root / "du_tumour.nii.gz", binary=True)
    for key in ("t1c", "t1", "flair"):
        out[f"met_{key}"] = _half(MET / f"{key}.nii.gz", root / f"met_{key}.nii.gz")
    met = nib.load(str(out["met_t1c"]))
    out["met_brain"] = _save((np.asarray(met.dataobj) > 0).astype(np.uint8), met.affine, root / "met_brain.nii.gz")
    return out


# ------------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    name: str
    inputs: tuple[str, ...]  # keys of scans(), in the network's order
    brain: str | None
    preprocessing: dict[str, str]
    training: dict[str, str] = field(default_factory=dict)
    weights: tuple[float, ...] = (1.0,)
    folds: int = 1
    runtime: dict[str, str] = field(default_factory=dict)  # raidionicsseg's [Runtime]
    channels_first: bool = False
    output: str = "softmax"
    decoy: bool = True
    centre: float = 1.0
    pipeline: tuple[tuple[int, str, str | None], ...] | None = None  # (timestamp, sequence, labels) per input

    @property
    def n_channels(self) -> int:
        pairs = self.preprocessing.get("diffloader_pairs")
        return len(self.inputs) + (len(pairs.split(";")) if pairs else 0)


ZM = {"normalization_method": "zeromean"}
FULL = {"new_axial_size": "64, 64, 48"}
CASES = [
    Case("native 1 in, no crop, zeromean, last", ("native_t1c",), None, {"output_spacing": "1.0, 1.0, 1.0", **FULL,
                                                                          **ZM}),
    Case("native 1 in, minimum, min-max, first, Torch logits", ("native_t1c",), None,
         {"background_cropping": "minimum", "normalization_method": "default", **FULL,
          "intensity_clipping_range": "0.0, 99.5"},
         {"activation_layer_included": "false"}, channels_first=True, output="logits", centre=0.3),
    Case("native 2 in, brain_mask, zeromean_nonzero, last", ("native_t1c", "native_t1"), "native_brain",
         {"output_spacing": "1.5, 1.5, 2.0", "background_cropping": "brain_mask",
          "normalization_method": "zeromean_nonzero", **FULL}, weights=(1.0, -0.6)),
    Case("oblique 1 in, brain_clip, zeromean, last, default spacing", ("oblique_t1c",), "oblique_brain",
         {"background_cropping": "brain_clip", **ZM, **FULL}),  # no output_spacing: the smallest voxel size
    Case("oblique 2 in, minimum, min-max, first, 2 folds average", ("oblique_t1c", "oblique_t1"), None,
         {"background_cropping": "minimum", "normalization_method": "default", "new_axial_size": "72, 64, 40"},
         weights=(1.0, 0.5), folds=2, runtime={"folds_ensembling": "True", "ensembling_strategy": "average"},
         channels_first=True, centre=0.9),
    Case("1 mm LPS 3 in (pipeline.json order), minimum, clipping values, min-max", ("du_t1c", "du_flair", "du_t1"),
         None, {"output_spacing": "1.5, 1.5, 1.5", "background_cropping": "minimum",
                "intensity_clipping_values": "50, 600", "normalization_method": "default", **FULL},
         weights=(1.0, -0.8, 0.45), centre=0.25,
         pipeline=((1, "T1-CE", None), (1, "FLAIR", None), (1, "T1-w", None))),
    Case("1 mm LPS 5 in incl. label, brain_clip, zeromean, first, 2 folds maximum",
         ("du_t1c", "du_t1", "du_flair", "du_t2", "du_tumour"), "du_brain",
         {"output_spacing": "2.0, 2.0, 2.0", "background_cropping": "brain_clip", **ZM, **FULL},
         weights=(1.0, -0.4, 0.3, 0.2, 1.5), folds=2,
         runtime={"folds_ensembling": "True", "ensembling_strategy": "maximum"}, channels_first=True),
    Case("1 mm RAS 3 in, brain_mask, zeromean_nonzero, 2 folds first only", ("met_t1c", "met_t1", "met_flair"),
         "met_brain", {"output_spacing": "2.0, 2.0, 2.0", "background_cropping": "brain_mask",
                       "normalization_method": "zeromean_nonzero", **FULL},
         weights=(1.0, 0.3, -0.5), folds=2),
    Case("native patch-wise, minimum, zeromean, patch offset", ("native_t1c",), None,
         {"output_spacing": "2.0, 2.0, 2.0", "background_cropping": "minimum", **ZM},
         {"patch_size": "48, 40, 24", "patch_offset": "16, 8, 4"}),
    Case("oblique patch-wise, overlapping_ratio, sigmoid logits (Torch)", ("oblique_t1c",), "oblique_brain",
         {"output_spacing": "2.0, 2.0, 2.0", "background_cropping": "brain_clip", **ZM},
         {"nb_classes": "1", "classes": "tumor", "patch_size": "40, 48, 24", "activation_layer_included": "false",
          "activation_layer_type": "sigmoid", "optimal_thresholds": "0.5"},
         runtime={"overlapping_ratio": "0.25"}, output="sigmoid_logit", channels_first=True),
    Case("native slab-wise (axial), brain_clip, zeromean", ("native_t1c",), "native_brain",
         {"output_spacing": "1.0, 1.0, 1.0", "background_cropping": "brain_clip", **ZM,
          "new_axial_size": "64, 60", "slicing_plane": "axial"}, {"slab_size": "SLAB"},
         # raidionicsseg 1.5.2 cannot write slab-mode probabilities (float64, its writer wants float32): masks
         runtime={"reconstruction_method": "thresholding"}),
    Case("native 2 in, swap_training_input, diffloader pair, minimum", ("native_t1c", "native_t1"), None,
         {"output_spacing": "1.0, 1.0, 1.0", "background_cropping": "minimum", **ZM, **FULL,
          "swap_training_input": "true", "diffloader_pairs": "0, 1"}, weights=(1.0, -0.5, 0.7)),
    Case("native thresholded on the network grid (resample_second)", ("native_t1c",), "native_brain",
         {"output_spacing": "1.0, 1.0, 1.0", "background_cropping": "brain_clip", **ZM, **FULL},
         runtime={"reconstruction_method": "thresholding", "reconstruction_order": "resample_second"}),
]


def _ini(case: Case) -> str:
    training = {"nb_classes": "2", "classes": "background, tumor", "optimal_thresholds": "0.4, 0.5",
                "deep_supervision": "true", **case.training}
    backend = "Torch" if case.output in ("logits", "sigmoid_logit") else "TF"
    lines = ["[Default]", "imaging_modality = MRI", f"training_backend = {backend}", "task = segmentation",
             "[PreProcessing]", f"number_inputs = {len(case.inputs)}",
             f"channels_order = {'channels_first' if case.channels_first else 'channels_last'}",
             *(f"{k} = {v}" for k, v in case.preprocessing.items()), "[Training]",
             *(f"{k} = {v}" for k, v in training.items())]
    return "\n".join(lines) + "\n"


def _pipeline(case: Case, name: str) -> dict:
    inputs = {str(i): {"timestamp": t, "sequence": s, "labels": lab, "space": {"timestamp": 1, "sequence": "T1-CE"}}
              for i, (t, s, lab) in enumerate(case.pipeline or ())}
    return {"1": {"task": "Segmentation", "inputs": {"0": inputs["0"]}, "target": ["Brain"], "model": "MRI_Brain"},
            "2": {"task": "Segmentation", "inputs": inputs, "target": ["Tumor"], "model": name,
                  "description": "residual tumour segmentation"}}


# one session per real case: its T2w stands in for the pre-op T1w-CE, its tumour mask for the pre-op mask
ROLES_BY_KEY = {"t1c": "postop_t1ce", "t1": "postop_t1", "flair": "postop_flair", "t2": "preop_t1ce",
                "tumour": "preop_mask"}


def _slab_size(case: Case, files: dict[str, Path], config) -> int:
    """A slab size dividing the resized depth (raidionicsseg 1.5.2 crashes otherwise; see the backend's docstring)."""
    first = nib.load(str(files[case.inputs[0]]))
    brain = nib.load(str(files[case.brain])).get_fdata() > 0 if case.brain else None
    depth = R.preprocess([first.get_fdata(dtype=np.float32)], first.affine, config, brain_mask=brain).data.shape[2]
    return next(s for s in (16, 12, 10, 9, 8, 7, 6, 5, 4, 3, 2) if depth % s == 0)


def build(case: Case, root: Path, files: dict[str, Path]) -> dict:
    """The package, raidionicsseg's inputs and config.ini for one case."""
    name = f"MRI_GBM_Postop_FV_{len(case.inputs)}p"
    package = root / "models" / name
    package.mkdir(parents=True)
    ini = _ini(case)
    if "SLAB" in ini:
        ini = ini.replace("SLAB", str(_slab_size(case, files, R.read_preprocessing_ini(_probe_ini(case, root)))))
    (package / "pre_processing.ini").write_text(ini)
    if case.pipeline:
        (package / "pipeline.json").write_text(json.dumps(_pipeline(case, name), indent=1))
    for fold in range(case.folds):
        weights = np.asarray(case.weights) * (1.0 if fold == 0 else -0.7)  # fold 1: another network
        make_onnx(package / f"fold{fold}" / "model.onnx", case.n_channels, weights=weights,
                  channels_first=case.channels_first, centre=case.centre if fold == 0 else -case.centre,
                  output=case.output, decoy=case.decoy)
    inputs = root / "inputs"
    inputs.mkdir()
    for i, key in enumerate(case.inputs):
        shutil.copy(files[key], inputs / f"input{i}.nii.gz")
    runtime = {"reconstruction_method": "probabilities", "reconstruction_order": "resample_first", **case.runtime}
    lines = ["[System]", "gpu_id = -1", f"inputs_folder = {inputs}", f"output_folder = {root / 'official'}",
             f"model_folder = {package}", "[Runtime]", *(f"{k} = {v}" for k, v in runtime.items())]
    if case.brain:
        lines += ["[Neuro]", f"brain_segmentation_filename = {files[case.brain]}"]
    (root / "config.ini").write_text("\n".join(lines) + "\n")
    return {"package": package, "config": root / "config.ini", "official": root / "official", "runtime": runtime}


def _probe_ini(case: Case, root: Path) -> Path:
    path = root / "probe" / "pre_processing.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_ini(case).replace("SLAB", "1"))
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Every case built, and raidionicsseg run on all of them (one process)."""
    import raidionicsseg  # noqa: F401 - installed by the test extra: a missing library fails here

    assert NATIVE.is_dir() and DU.is_dir() and MET.is_dir(), f"real scans not found under {REAL}"
    root = tmp_path_factory.mktemp("parity")
    files = scans(root / "scans")
    built = {case.name: build(case, root / f"case{i:02d}", files) for i, case in enumerate(CASES)}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", "import sys\nfrom raidionicsseg.fit import run_model\n"
                          "for c in sys.argv[1:]:\n    run_model(c)\n", *(str(b["config"]) for b in built.values())],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    print(f"\nraidionicsseg 1.5.2: {len(CASES)} packages in {time.monotonic() - start:.1f} s")
    return files, built


def _official_map(case: Case, built: dict) -> np.ndarray:
    thresholded = built["runtime"]["reconstruction_method"] == "thresholding"
    name = ("labels_" if thresholded else "pred_") + "tumor.nii.gz"
    return nib.load(str(built["official"] / name)).get_fdata(dtype=np.float32)


def _card(case: Case, built: dict):
    card = card_for_raidionics_folder(built["package"])
    runtime = {k: v for k, v in {
        "folds_ensembling": built["runtime"].get("folds_ensembling", "False").lower() == "true",
        "ensembling_strategy": built["runtime"].get("ensembling_strategy"),
        "overlapping_ratio": float(built["runtime"]["overlapping_ratio"]) if "overlapping_ratio" in built["runtime"]
        else None, "reconstruction_order": built["runtime"]["reconstruction_order"]}.items() if v is not None}
    return dataclasses.replace(card, details={**card.details, "runtime": runtime})


def ours(case: Case, files: dict[str, Path], built: dict, *, swap: tuple[str, str] | None = None,
         report: dict | None = None) -> np.ndarray:
    """bids_postop's probability: channel files given in the card's (configuration) order, as the workflow does;
    ``swap`` gives two scans each other's role."""
    card = _card(case, built)
    files = dict(files)
    if swap:
        files[swap[0]], files[swap[1]] = files[swap[1]], files[swap[0]]
    by_role = {ROLES_BY_KEY[key.split("_", 1)[1]]: files[key] for key in case.inputs}
    channel_files = [by_role[role] for role in card.channels]
    return R.predict_probability(card, channel_files, brain_mask=files[case.brain] if case.brain else None,
                                 report=report)


def compare(official_map: np.ndarray, mine: np.ndarray, threshold: float) -> tuple[float, float]:
    a, b = official_map >= threshold, mine >= threshold
    dice = 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))
    return float(np.abs(official_map - mine).max()), dice


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_probability_as_raidionicsseg(official, case):
    files, built = official
    expected = _official_map(case, built[case.name])
    report: dict = {}
    start = time.monotonic()
    mine = ours(case, files, built[case.name], report=report)
    seconds = time.monotonic() - start
    assert mine.shape == expected.shape == nib.load(str(files[case.inputs[0]])).shape
    threshold = 0.5
    if built[case.name]["runtime"]["reconstruction_method"] == "thresholding":  # the official map is a 0/1 mask
        mine = (mine >= threshold).astype(np.float32)
    dp, dice = compare(expected, mine, threshold)
    fraction = float((expected >= threshold).mean())
    print(f"\n{case.name}: max |Δp| {dp:.2e}, Dice {dice:.6f}, mask {fraction:.1%} of the scan, {seconds:.1f} s")
    assert 0.002 < fraction < 0.8, "the case must give a mask that is neither empty nor everything"
    assert dp <= MAX_DP and dice >= MIN_DICE
    assert report["channel_order_source"] == ("pipeline.json" if case.pipeline else "built-in table")
    assert report["n_networks"] == (case.folds if case.runtime.get("folds_ensembling") else 1)


def test_channel_swap_flip_and_shift_each_fail_the_comparison(official):
    """The networks make channel order, flips and shifts visible: each breaks max |Δp| ≤ 1e-3 or Dice ≥ 0.999."""
    files, built = official
    case = next(c for c in CASES if c.pipeline)  # three channels, order from pipeline.json
    expected = _official_map(case, built[case.name])
    swapped = ours(case, files, built[case.name], swap=("du_t1", "du_flair"))  # T1w given as FLAIR and back
    results = {"channel swap": compare(expected, swapped, 0.5)}
    mine = ours(case, files, built[case.name])
    for axis in range(3):
        results[f"flip axis {axis}"] = compare(expected, np.flip(mine, axis), 0.5)
        results[f"shift axis {axis}"] = compare(expected, np.roll(mine, 1, axis), 0.5)
    for what, (dp, dice) in results.items():
        print(f"\n{what}: max |Δp| {dp:.3f}, Dice {dice:.4f}")
        assert dp > MAX_DP and dice < MIN_DICE, what
    assert compare(expected, mine, 0.5)[0] <= MAX_DP  # unchanged, it agrees


def test_a_model_card_sets_the_runtime_options(official, tmp_path):
    """A bids_postop_model.json (architecture raidionics) naming the runtime options is run as its card says."""
    files, built = official
    case = next(c for c in CASES if c.runtime.get("ensembling_strategy") == "maximum")
    package = tmp_path / "E"
    shutil.copytree(built[case.name]["package"], package)
    (package / "bids_postop_model.json").write_text(json.dumps({
        "name": "E-max", "architecture": "raidionics", "configuration": "E", "channels": list(CONFIGURATIONS["E"]),
        "threshold": 0.5, "raidionics": {"model_folder": ".", "foreground_class": 1, "input_images": "registered",
                                         "runtime": {"folds_ensembling": True, "ensembling_strategy": "maximum"}}}))
    (card,) = resolve_models(package)
    by_role = {ROLES_BY_KEY[key.split("_", 1)[1]]: files[key] for key in case.inputs}
    mine = R.predict_probability(card, [by_role[r] for r in card.channels], brain_mask=files[case.brain])
    dp, dice = compare(_official_map(case, built[case.name]), mine, 0.5)
    assert dp <= MAX_DP and dice >= MIN_DICE
