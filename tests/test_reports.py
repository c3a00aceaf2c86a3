"""Per-participant report: figure functions on awkward grids, the HTML, and the page in headless Chromium.

The report test builds a demo participant from the embedded simulated dataset (sub-01: post-op T1w-CE,
T1w, FLAIR, pre-op T1w-CE and tumour mask), uses the simulated ground truth as a stand-in for the
prediction, writes the measures JSON with ``write_session_outputs`` itself, renders the report and opens
it with Debian's Chromium (``apt-get install -y chromium``): every figure must load and the summary must
show the volumes and GTR/RT. Set ``BIDS_POSTOP_UPDATE_DOCS=1`` to copy its screenshots to ``docs/``.
"""

from __future__ import annotations

import html as htmllib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, affine_for, write_nifti

from bids_postop.bids.derivatives import bids_uri, write_session_outputs
from bids_postop.core.postprocess import postprocess_probability, volume_ml
from bids_postop.reports import figures as F
from bids_postop.reports.html import (
    FIGURES,
    existing_figures,
    figure_filename,
    rebuild_reports,
    render_participant_report,
    session_prefix,
)

CHROMIUM = Path(os.environ.get("BIDS_POSTOP_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000")
def _chromium_path() -> Path:
    """Debian's headless Chromium (.ci/run installs it); its absence fails the browser tests."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set BIDS_POSTOP_CHROMIUM)")
    return CHROMIUM


needs_chromium = pytest.mark.usefixtures("chromium")


@pytest.fixture
def chromium() -> Path:
    return _chromium_path()


# --- synthetic images -----------------------------------------------------------------------------

def _phantom(shape, affine):
    """A head-like ellipsoid, a bright 'tumour' blob off-centre, and masks, in world coordinates."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = (np.c_[ijk, np.ones(len(ijk))] @ affine.T)[:, :3]
    centre = (np.c_[np.array(shape)[None] / 2 - 0.5, 1.0] @ affine.T)[0, :3]
    rel = xyz - centre
    head = ((rel / np.array([30.0, 36.0, 26.0])) ** 2).sum(1) <= 1
    blob = ((rel - np.array([10.0, 8.0, 5.0])) ** 2).sum(1) <= 6.0 ** 2
    image = np.where(head, 300.0 + 50 * np.sin(rel[:, 0] / 4), 0.0) + 400.0 * blob
    probability = np.clip(1.2 - np.sqrt(((rel - np.array([10.0, 8.0, 5.0])) ** 2).sum(1)) / 8, 0, 1)
    return (image.reshape(shape).astype(np.float32), blob.reshape(shape).astype(np.uint8),
            head.reshape(shape).astype(np.uint8), probability.reshape(shape).astype(np.float32))


GRIDS = {  # name: (axis codes, spacing, obliquity)
    "ras-iso": ("RAS", (2.0, 2.0, 2.0), 0.0),
    "lps-aniso-oblique": ("LPS", (0.9 * 2, 0.9 * 2, 2.5 * 2), 8.0),
    "pli": ("PLI", (1.5, 2.0, 3.0), 0.0),
}


@pytest.fixture(params=sorted(GRIDS))
def phantom(request, tmp_path):
    codes, spacing, oblique = GRIDS[request.param]
    affine = affine_for(codes, spacing, oblique_deg=oblique)
    shape = tuple(int(round(80 / s)) for s in spacing)
    image, blob, head, prob = _phantom(shape, affine)
    paths = {name: write_nifti(tmp_path / f"{name}.nii.gz", arr, affine)
             for name, arr in (("t1ce", image), ("residual", blob), ("brain", head), ("prob", prob))}
    moved = np.roll(image, 2, axis=0)
    paths["moving"] = write_nifti(tmp_path / "moving.nii.gz", moved, affine)
    return request.param, paths, affine


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _has_colour(rgb: np.ndarray, hex_colour: str, tol: int = 40) -> bool:
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(rgb.astype(int) - target).max(axis=-1) <= tol).any())


# --- figure functions -----------------------------------------------------------------------------

def test_residual_mosaic_on_any_grid(phantom, tmp_path):
    """RAS, LPS oblique anisotropic and PLI grids all give a mosaic with the residual and brain contours."""
    _, p, _ = phantom
    out = F.residual_mosaic(p["t1ce"], p["residual"], p["prob"], p["brain"], tmp_path / "m.png")
    assert out.stat().st_size < 300_000
    rgb = _png(out)
    assert _has_colour(rgb, F.RESIDUAL_COLOUR) and _has_colour(rgb, F.BRAIN_COLOUR)


def test_mosaic_keeps_the_anatomy_proportions(tmp_path):
    """Anisotropic voxels (1 × 1 × 4 mm) of a sphere must still draw a round residual in every plane."""
    affine = affine_for("LPS", (1.0, 1.0, 4.0))
    shape = (64, 64, 16)
    ijk = np.indices(shape).astype(float)
    mm = [(ijk[a] - (shape[a] - 1) / 2) * s for a, s in enumerate((1.0, 1.0, 4.0))]
    sphere = (mm[0] ** 2 + mm[1] ** 2 + mm[2] ** 2) <= 20.0 ** 2
    image = np.where(sphere, 500.0, 100.0).astype(np.float32)
    paths = [write_nifti(tmp_path / f"{n}.nii.gz", a, affine)
             for n, a in (("img", image), ("mask", sphere.astype(np.uint8)))]
    rows = F._through_target(("mask",), 1, 1)({"mask": sphere.astype(float)})
    assert [[c.axis for c in row] for row in rows] == [[2], [1, 0]]  # one axial, then coronal and sagittal
    out = F.residual_mosaic(paths[0], paths[1], None, None, tmp_path / "m.png", n_slices=1)
    rgb = _png(out)
    red = (np.abs(rgb.astype(int) - [255, 42, 42]).max(axis=-1) <= 60)
    # one red circle per panel: each must be as high as it is wide (a 4 mm slice drawn 1 px high would
    # squash the coronal and sagittal ones fourfold)
    from scipy import ndimage

    labels, n = ndimage.label(ndimage.binary_dilation(red, iterations=3))
    assert n >= 3
    for i in range(1, n + 1):
        rows, cols = np.nonzero(labels == i)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        if height > 20:  # skip specks
            assert 0.85 < height / width < 1.18, (height, width)


def test_empty_residual_cuts_through_the_probability_peak(tmp_path):
    affine = affine_for("RAS", (2.0, 2.0, 2.0))
    shape = (40, 40, 40)
    image, _, head, _ = _phantom(shape, affine)
    prob = np.zeros(shape, np.float32)
    prob[30:33, 8:11, 33:36] = 0.4
    data = {"residual_mask": np.zeros(shape), "probseg": prob}
    rows = F._through_target(("residual_mask",), 6, 3, probability="probseg")(data)
    axial = [c.index for c in rows[0]]
    assert min(axial) >= 30 and max(axial) <= 38  # contiguous around z 33–35, kept inside the image
    coronal = [c.index for c in rows[-1] if c.axis == 1]
    assert all(7 <= i <= 11 for i in coronal)
    # no probability either: middle of the field of view
    rows = F._through_target(("residual_mask",), 6, 3, probability="probseg")(
        {"residual_mask": np.zeros(shape), "probseg": np.zeros(shape)})
    assert 8 <= min(c.index for c in rows[0]) and max(c.index for c in rows[0]) <= 31
    paths = [write_nifti(tmp_path / f"{n}.nii.gz", a, affine)
             for n, a in (("t1ce", image), ("res", np.zeros(shape, np.uint8)), ("p", prob), ("b", head))]
    assert F.residual_mosaic(*paths, tmp_path / "m.svg").read_text().startswith("<svg")


def test_slices_are_shown_in_ras_neurological_order(phantom):
    """The blob lies right, anterior and superior of the centre in world space, whatever the voxel order."""
    name, p, _ = phantom
    volumes = F._load_on_one_grid("test", {"t1ce": p["t1ce"], "residual": p["residual"]})
    blob = volumes["residual"].data > 0.5
    centre = np.argwhere(blob).mean(axis=0)
    shape = np.array(blob.shape)
    assert (centre > (shape - 1) / 2).all(), (name, centre, shape)
    axial = F._plane(blob.astype(float), F._Cut(2, int(round(centre[2]))))
    rows, cols = np.nonzero(axial)  # rows go up (anterior, origin lower), columns go right
    assert rows.mean() > (axial.shape[0] - 1) / 2 and cols.mean() > (axial.shape[1] - 1) / 2
    width_mm, height_mm = F._extent(axial.shape, volumes["t1ce"].zooms, 2)
    assert width_mm == pytest.approx(height_mm, rel=0.15)  # the 80 mm field of view, whatever the voxel size


@pytest.mark.parametrize(("lo", "hi", "n", "size", "expected"), [
    (10, 21, 4, 40, [11, 14, 17, 20]),       # wide extent: centres of equal bins
    (5, 5, 3, 40, [4, 5, 6]),                # one slice: contiguous around it
    (0, 1, 4, 40, [0, 1, 2, 3]),             # at the edge: shifted inside
    (38, 39, 4, 40, [36, 37, 38, 39]),
    (0, 2, 6, 3, [0, 1, 2]),                 # fewer slices than asked
])
def test_spread_slices(lo, hi, n, size, expected):
    assert F.spread_slices(lo, hi, n, size) == expected


def test_registration_check_is_a_two_layer_flicker(phantom, tmp_path):
    _, p, _ = phantom
    out = F.registration_check(p["t1ce"], p["moving"], tmp_path / "reg.svg", brain_mask=p["brain"],
                               moving_label="post-op T1w")
    svg = out.read_text()
    assert svg.count("<image ") == 2 and 'class="moving"' in svg and "@keyframes" in svg
    assert "post-op T1w" in svg
    w, h = (int(v) for v in re.search(r'<svg[^>]* width="(\d+)" height="(\d+)"', svg).groups())
    assert w > 100 and h > 100
    with pytest.raises(ValueError, match=r"\.svg"):
        F.registration_check(p["t1ce"], p["moving"], tmp_path / "reg.png")


def test_preop_and_brain_figures(phantom, tmp_path):
    _, p, _ = phantom
    rgb = _png(F.preop_mask_figure(p["t1ce"], p["residual"], tmp_path / "pre.png"))
    assert _has_colour(rgb, F.PREOP_COLOUR)
    rgb = _png(F.brain_mask_figure(p["t1ce"], p["brain"], tmp_path / "brain.png"))
    assert _has_colour(rgb, F.BRAIN_COLOUR)


def test_images_on_different_grids_are_refused_by_name(tmp_path):
    a = write_nifti(tmp_path / "t1ce.nii.gz", np.ones((10, 10, 10), np.float32), affine_for("RAS"))
    b = write_nifti(tmp_path / "mask_other_shape.nii.gz", np.ones((10, 10, 9), np.uint8), affine_for("RAS"))
    c = write_nifti(tmp_path / "mask_other_affine.nii.gz", np.ones((10, 10, 10), np.uint8), affine_for("LPS"))
    with pytest.raises(ValueError, match=r"residual_mosaic.*t1ce\.nii\.gz.*mask_other_shape\.nii\.gz"):
        F.residual_mosaic(a, b, None, None, tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"mask_other_affine\.nii\.gz.*affine"):
        F.registration_check(a, c, tmp_path / "r.svg")
    with pytest.raises(ValueError, match="n_slices"):
        F.residual_mosaic(a, a, None, None, tmp_path / "m.png", n_slices=0)


# --- the demo participant's report ----------------------------------------------------------------

def _resample_by_header(moving: Path, reference: Path, out: Path, order: int) -> Path:
    """Stand-in for the registration: resample ``moving`` onto ``reference``'s grid through the headers."""
    from scipy import ndimage

    mov, ref = nib.load(str(moving)), nib.load(str(reference))
    matrix = np.linalg.inv(mov.affine) @ ref.affine
    data = ndimage.affine_transform(np.asarray(mov.dataobj, dtype=np.float32), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=ref.shape[:3], order=order)
    return write_nifti(out, data.astype(np.float32 if order else np.uint8), ref.affine)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """sub-01 of the demo dataset: figures, measures JSON (write_session_outputs) and the report."""
    from bids_postop.demo.dataset import write_demo_dataset

    tmp = tmp_path_factory.mktemp("report")
    bids = tmp / "bids"
    write_demo_dataset(bids, seed=0, n_participants=1)
    anat = bids / "sub-01" / "ses-postop" / "anat"
    manual = bids / "derivatives" / "manual" / "sub-01" / "ses-postop" / "anat"
    t1ce = anat / "sub-01_ses-postop_ce-gadolinium_T1w.nii.gz"
    inputs = {"postop_t1ce": t1ce, "postop_t1": anat / "sub-01_ses-postop_T1w.nii.gz",
              "postop_flair": anat / "sub-01_ses-postop_FLAIR.nii.gz",
              "preop_t1ce": bids / "sub-01" / "ses-preop" / "anat" / "sub-01_ses-preop_ce-gadolinium_T1w.nii.gz",
              "preop_mask": bids / "derivatives" / "preop_masks" / "sub-01" / "ses-preop" / "anat"
              / "sub-01_ses-preop_label-tumor_mask.nii.gz"}
    residual = manual / "sub-01_ses-postop_label-tumor_mask.nii.gz"
    brain = manual / "sub-01_ses-postop_label-brain_mask.nii.gz"
    work = tmp / "work"
    work.mkdir()
    # the ground truth stands in for the prediction; a smooth probability around it
    from scipy import ndimage

    truth = nib.load(str(residual))
    prob = ndimage.gaussian_filter(np.asarray(truth.dataobj, dtype=np.float32), 1.0)
    probseg = write_nifti(work / "probseg.nii.gz", prob, truth.affine)
    mask, measures = postprocess_probability(
        np.asarray(truth.dataobj, dtype=np.float32), tuple(truth.header.get_zooms()[:3]), threshold=0.5,
        preop_volume_ml=volume_ml(np.asarray(nib.load(str(inputs["preop_mask"])).dataobj) > 0,
                                  nib.load(str(inputs["preop_mask"])).header.get_zooms()[:3]))
    mask_file = write_nifti(work / "residual.nii.gz", mask, truth.affine)
    card_dir = tmp / "model"
    card_dir.mkdir()
    card = {"name": "demo-E", "architecture": "nnunet", "configuration": "E",
            "channels": ["postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask"],
            "threshold": 0.5, "intended_use": "demo model for simulated data", "not_for_clinical_use": True,
            "folder": str(card_dir)}
    (card_dir / "bids_postop_model.json").write_text(json.dumps({**card, "nnunet": {"folds": [0]}}))
    output_dir = tmp / "derivatives" / "bids_postop"
    outputs = write_session_outputs(
        output_dir, bids, subject="01", session="postop", site="north", sources=inputs,
        residual_mask=mask_file, residual_probseg=probseg, brain_mask=brain, measures=measures.as_dict(),
        model=card, configuration="E",
        extra_provenance={"bids_postop_version": "0.1.0", "command_line": "bids_postop bids out participant",
                          "versions": {"nibabel": nib.__version__, "numpy": np.__version__},
                          "configuration": "E"})
    preop_reg = _resample_by_header(inputs["preop_t1ce"], t1ce, work / "preop_reg.nii.gz", 1)
    preop_mask_reg = _resample_by_header(inputs["preop_mask"], t1ce, work / "preop_mask_reg.nii.gz", 0)
    figures = {
        "mosaic": F.residual_mosaic(t1ce, outputs.residual_mask, outputs.residual_probseg, outputs.brain_mask,
                                    work / "mosaic.png"),
        "brainmask": F.brain_mask_figure(t1ce, outputs.brain_mask, work / "brain.png"),
        "registration_postop_t1": F.registration_check(t1ce, inputs["postop_t1"], work / "t1.svg",
                                                       brain_mask=brain, moving_label="post-op T1w"),
        "registration_postop_flair": F.registration_check(t1ce, inputs["postop_flair"], work / "flair.svg",
                                                          brain_mask=brain, moving_label="post-op FLAIR"),
        "preopmask": F.preop_mask_figure(preop_reg, preop_mask_reg, work / "preop.png"),
    }
    report = render_participant_report(
        output_dir, "01", "postop", measures_json=outputs.measures_json, figures=figures,
        inputs={k: bids_uri(v, bids) for k, v in inputs.items()},
        warnings=["pre-op registration: header only (test stand-in)"], runtime_s=754.2, device="cpu")
    return {"report": report, "output_dir": output_dir, "measures": measures, "figures": figures, "tmp": tmp,
            "bids": bids, "inputs": inputs, "card": card, "files": (mask_file, probseg, brain)}


def test_report_files_and_summary(demo_report):
    out, m = demo_report["output_dir"], demo_report["measures"]
    report = demo_report["report"]
    assert report == out / "sub-01.html"
    page = report.read_text()
    for key in demo_report["figures"]:
        name = figure_filename("01", "postop", key, ext=demo_report["figures"][key].suffix, model_label="demoE")
        assert (out / "sub-01" / "figures" / name).is_file()
        assert f'"sub-01/figures/{name}"' in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert f"{m.residual_volume_ml:.3f} ml" in page and f"{m.preop_volume_ml:.2f} ml" in page
    assert f"{m.eor_percent:.1f} %" in page and f'id="status">{m.resection_status}<' in page
    assert 'class="banner clinical"' in page and "NOT FOR CLINICAL USE" in page  # from the card's flag
    assert "12 min 34 s" in page and ">cpu<" in page
    assert "bids_postop bids out participant" in page and '"folds"' in page  # command line, full model card
    # the Methods section is generated from what ran (an nnU-Net card here), with its references
    methods = page[page.index('id="methods"'):page.index('id="provenance"')]
    assert 'id="methods-text"' in methods and "nnU-Net v2" in methods and "AGU-Net" not in methods
    assert "Helland" in methods and "Isensee" in methods
    assert "{&#x27;" not in page and "{'" not in page, "values, not Python reprs"


def test_rebuild_reports_from_the_output_dir_alone(demo_report, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_report["output_dir"], out)
    (out / "sub-01.html").unlink()
    written = rebuild_reports(out)
    assert written == [out / "sub-01.html"]
    page = written[0].read_text()
    assert page.count("data-figure=") == len(demo_report["figures"])
    assert "header only (test stand-in)" in page and "12 min 34 s" in page
    assert not list((out / "sub-01" / "figures").glob(".*tmp*"))


def test_a_second_model_keeps_the_first_models_figures_and_is_listed(demo_report, tmp_path):
    """Two models written into one output folder: each model's own figures are kept (named per model), the page
    of the latest run lists the other model's result, and --reports-only finds each model's figures again."""
    out = tmp_path / "out"
    shutil.copytree(demo_report["output_dir"], out)
    mask_file, probseg, brain = demo_report["files"]
    card = {**demo_report["card"], "name": "other-B", "configuration": "B",
            "channels": ["postop_t1ce", "postop_t1"], "not_for_clinical_use": False}
    m = demo_report["measures"].as_dict()
    outputs = write_session_outputs(
        out, demo_report["bids"], subject="01", session="postop", site="north",
        sources={k: demo_report["inputs"][k] for k in ("postop_t1ce", "postop_t1")}, residual_mask=mask_file,
        residual_probseg=probseg, brain_mask=brain, measures={**m, "residual_volume_ml": 9.87654}, model=card,
        configuration="B", extra_provenance={"bids_postop_version": "0.1.0"})
    second = tmp_path / "second_mosaic.png"
    second.write_bytes(b"\x89PNG not the first model's")
    figures_dir = out / "sub-01" / "figures"
    first = figures_dir / figure_filename("01", "postop", "mosaic", model_label="demoE")
    first_bytes = first.read_bytes()
    page = render_participant_report(out, "01", "postop", measures_json=outputs.measures_json,
                                     figures={"mosaic": second}, inputs={}).read_text()
    mine = figures_dir / figure_filename("01", "postop", "mosaic", model_label="otherB")
    assert mine.read_bytes() == second.read_bytes() and first.read_bytes() == first_bytes  # nothing overwritten
    assert f'"sub-01/figures/{mine.name}"' in page and first.name not in page
    table = page[page.index('id="other-models"'):]
    table = table[:table.index("</table>")]
    assert "demo-E" in table and f"{demo_report['measures'].residual_volume_ml:.3f} ml" in table
    assert "other-B" not in table and "9.877 ml" in page  # this page's own result
    (out / "sub-01.html").unlink()
    [rebuilt] = rebuild_reports(out)  # the last model in sorted order (otherB), with its own figure
    page = rebuilt.read_text()
    assert mine.name in page and first.name not in page and 'id="other-models"' in page
    found = existing_figures(out, "01", "postop", model_label="demoE")
    assert found["mosaic"] == first and "brainmask" in found


def test_figure_names_and_unknown_keys(demo_report):
    assert figure_filename("sub-01", "ses-postop", "mosaic") == "sub-01_ses-postop_desc-residual_mosaic.png"
    assert figure_filename("01", "postop", "mosaic", model_label="demoB") == \
        "sub-01_ses-postop_desc-demoBResidual_mosaic.png"
    assert figure_filename("01", "postop", "brainmask", model_label="demoB") == \
        "sub-01_ses-postop_desc-brainmask_overlay.png"  # not a model's figure
    assert figure_filename("01", None, "registration_preop_t1ce") == "sub-01_desc-preopt1ce_registration.svg"
    assert session_prefix("01", None) == "sub-01"
    assert set(FIGURES) >= {"mosaic", "brainmask", "preopmask", "registration_postop_t1"}
    with pytest.raises(ValueError, match="unknown report figure"):
        render_participant_report(demo_report["output_dir"], "01", "postop", measures_json=Path("x"),
                                  figures={"mosiac": Path("x")}, inputs={})


def test_failed_run_and_configuration_without_registration(tmp_path):
    """No measures (the run failed): the page says so and lists the errors; rebuild finds it again.
    Configuration A registers nothing and has no pre-op mask: those sections say so."""
    out = tmp_path / "out"
    render_participant_report(out, "07", None, measures_json=None, figures={},
                              inputs={"postop_t1ce": "sub-07/anat/sub-07_ce-gd_T1w.nii.gz"},
                              errors=["segment: CUDA out of memory"])
    page = (out / "sub-07.html").read_text()
    assert 'id="no-results"' in page and "CUDA out of memory" in page
    measures = out / "sub-08" / "sub-08_desc-residual_measures.json"
    measures.parent.mkdir(parents=True)
    measures.write_text(json.dumps({
        "participant_id": "sub-08", "session_id": None, "configuration": "A",
        "model": {"name": "m", "architecture": "nnunet", "channels": ["postop_t1ce"],
                  "intended_use": "research, not for clinical use (words only: no flag, no banner)"},
        "measures": {"residual_volume_ml": 0.1, "resection_status": "GTR", "preop_volume_ml": None,
                     "eor_percent": None, "threshold": 0.5}, "sources": {"postop_t1ce": "bids:raw:x"}}))
    assert rebuild_reports(out) == [out / "sub-07.html", out / "sub-08.html"]
    page = (out / "sub-08.html").read_text()
    assert "No image was registered" in page and "No pre-operative tumour mask" in page
    assert 'id="status">GTR<' in page and "not known (no pre-operative tumour mask)" in page
    assert 'class="banner clinical"' not in page
    assert page.count("Figure not available") == 2  # mosaic and brain mask; nothing expected elsewhere
    assert "CUDA out of memory" in (out / "sub-07.html").read_text()


def _chromium(url: str, tmp: Path, *args: str) -> str:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    run = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def _figure_marks(dom: str) -> dict[str, str]:
    marks = {}
    for tag in re.findall(r"<(?:img|object)\b[^>]*\bdata-figure=[^>]*>", dom):
        name = htmllib.unescape(re.search(r'data-figure="([^"]+)"', tag).group(1))
        loaded = re.search(r'data-loaded="(\w+)"', tag)
        marks[name] = loaded.group(1) if loaded else "unchecked"
    return marks


@needs_chromium
def test_report_in_headless_chromium(demo_report, tmp_path):
    """Every figure loads, the summary shows the volumes and GTR/RT; screenshots saved (and to docs/)."""
    report, m = demo_report["report"], demo_report["measures"]
    dom = _chromium(report.as_uri(), tmp_path, "--dump-dom", "--window-size=1280,1600")
    marks = _figure_marks(dom)
    assert len(marks) == len(demo_report["figures"]), marks
    assert set(marks.values()) == {"yes"}, marks
    assert re.search(r'data-figures-checked="5"', dom)
    summary = dom[dom.index('id="summary"'):dom.index('id="residual"')]
    assert f"{m.residual_volume_ml:.3f} ml" in summary and f"{m.residual_volume_ml:.4f} ml" in summary
    assert f"{m.preop_volume_ml:.2f} ml" in summary and f"{m.eor_percent:.1f} %" in summary
    assert f">{m.resection_status}<" in summary and "NOT FOR CLINICAL USE" in summary

    # docs: the top of the page, and the registration and pre-op sections (a copy of the page with the
    # sections above them hidden: headless Chromium draws a blank page when asked to scroll to a #fragment)
    page = report.read_text()
    hidden = "<style>#summary,#residual,#brain,nav{display:none}</style></head>"
    lower = report.with_name("sub-01.lower-sections.html")
    lower.write_text(page.replace("</head>", hidden, 1))
    for name, url in (("report_screenshot.png", report.as_uri()),
                      ("report_screenshot_registration.png", lower.as_uri())):
        shot = tmp_path / name
        _chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,1500")
        _shrink_png(shot)
        assert 20_000 < shot.stat().st_size < 400_000, (name, shot.stat().st_size)
        if os.environ.get("BIDS_POSTOP_UPDATE_DOCS"):
            shutil.copyfile(shot, REPO / "docs" / name)
    lower.unlink()


@needs_chromium
def test_chromium_check_sees_a_missing_figure(demo_report, tmp_path):
    """The load check is real: a figure deleted after rendering is marked and named on the page."""
    out = tmp_path / "out"
    shutil.copytree(demo_report["output_dir"], out)
    missing = next((out / "sub-01" / "figures").glob("*_desc-preopmask_overlay.png"))
    missing.unlink()
    svg = next((out / "sub-01" / "figures").glob("*_desc-postopt1_registration.svg"))
    svg.unlink()
    dom = _chromium((out / "sub-01.html").as_uri(), tmp_path, "--dump-dom")
    marks = _figure_marks(dom)
    assert marks[f"sub-01/figures/{missing.name}"] == "no"
    assert marks[f"sub-01/figures/{svg.name}"] == "no"
    assert sum(v == "yes" for v in marks.values()) == len(marks) - 2
    assert "This figure could not be loaded" in dom


def _shrink_png(path: Path) -> None:
    """Palette PNG (the page is mostly greys and flat colours): keeps docs screenshots small."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, format="PNG", optimize=True)
