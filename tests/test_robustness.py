"""Robustness of the participant level beyond the happy path (issue 8):

- the input dataset is never modified, not even transiently (read-only dataset, full tree listing with
  modes, sizes, mtimes and hashes before and after a full run);
- extreme anisotropy (0.4×0.4×7 mm) and a tiny image (< 32 voxels on every axis) go through the CLI and
  give outputs on their own input grid;
- a very large image (896×896×512) goes through the input checks and post-processing within a documented
  memory bound (peak RSS of a fresh process, ``resource.getrusage``); the full pipeline on it is a
  benchmark (``benchmarks/large_image.py``), not a test;
- two participant processes writing into one output_dir at once leave its shared files intact.

All are ``slow``: they run registration, brain extraction and nnU-Net, or move gigabytes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_postop.bids.derivatives import BIDSIGNORE, SUMMARY_COLUMNS
from bids_postop.demo.dataset import write_demo_dataset

pytestmark = pytest.mark.slow
BIDS_POSTOP = [sys.executable, "-m", "bids_postop.cli.run"]
# the cheapest real run: configuration B (sub-04 of the demo), no test-time mirroring, one process
FAST = ["--model", "demo", "--no-tta", "--nprocs", "1", "--omp-nthreads", "1", "--device", "cpu"]
RUN_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robustness") / "bids"
    write_demo_dataset(root, seed=0)
    return root


def run_cli(bids: Path, out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BIDS_POSTOP, str(bids), str(out), "participant", "-w", str(work), *FAST, *extra],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return proc


def session_outputs(out: Path, t1ce: Path, sub: str) -> dict[str, Path]:
    prefix = t1ce.name.replace("_T1w.nii.gz", "")
    anat = out / f"sub-{sub}" / "ses-postop" / "anat"
    desc = {"04": "demoB"}.get(sub, "demo")  # sub-04 runs configuration B with the demo model
    if sub != "04":
        [tsv] = (out / f"sub-{sub}" / "ses-postop").glob("*_measures.tsv")
        desc = tsv.name.split("_desc-")[1].split("_")[0]
    return {"mask": anat / f"{prefix}_label-tumor_desc-{desc}_mask.nii.gz",
            "probseg": anat / f"{prefix}_label-tumor_desc-{desc}_probseg.nii.gz",
            "brain": anat / f"{prefix}_desc-brain_mask.nii.gz",
            "tsv": out / f"sub-{sub}" / "ses-postop" / f"sub-{sub}_ses-postop_desc-{desc}_measures.tsv"}


# --- 1. the input dataset is never modified ------------------------------------------------------------------

def tree_listing(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (root included) → (kind, mode bits, size, mtime_ns, sha256 or link target).

    Directory mtimes change when anything is created or removed inside, even transiently: as root ignores
    mode bits, a read-only dataset alone would not catch a temporary file written and deleted.
    """
    listing = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            listing[rel] = ("link", stat.S_IMODE(st.st_mode), os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            listing[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        else:
            listing[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                            hashlib.sha256(path.read_bytes()).hexdigest())
    return listing


def set_read_only(root: Path, read_only: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not path.is_symlink():
            path.chmod(mode & ~0o222 if read_only else mode | 0o200)


def test_input_dataset_is_never_modified(demo, tmp_path):
    """A full participant run on a read-only dataset, output outside it: the tree is identical after."""
    set_read_only(demo, True)
    try:
        before = tree_listing(demo)
        assert all(not mode & 0o222 for _, mode, *_ in before.values()), "the dataset is read-only"
        out = tmp_path / "out"
        proc = run_cli(demo, out, tmp_path / "work", "--participant-label", "04")
        after = tree_listing(demo)
    finally:
        set_read_only(demo, False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert session_outputs(out, next((demo / "sub-04" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz")),
                           "04")["mask"].is_file()
    created = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not created and not removed and not changed, {"created": created, "removed": removed,
                                                          "changed": [(k, before[k], after[k]) for k in changed]}


# --- 2. extreme anisotropy and a tiny image through the CLI --------------------------------------------------

def resampled(img: nib.Nifti1Image, zooms: tuple[float, float, float]) -> nib.Nifti1Image:
    """``img`` on a grid with the same axis directions and field of view but voxel sizes ``zooms`` (linear)."""
    from nibabel.processing import resample_from_to

    directions = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    extent = np.array(img.shape[:3]) * np.array(img.header.get_zooms()[:3])
    shape = tuple(int(n) for n in np.maximum(np.round(extent / np.array(zooms)), 1))
    affine = np.eye(4)
    affine[:3, :3] = directions * np.array(zooms)
    # same centre of field of view as the source
    centre = img.affine @ np.append((np.array(img.shape[:3]) - 1) / 2, 1)
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    out = resample_from_to(img, (shape, affine), order=1, mode="constant", cval=0)
    data = np.clip(np.round(np.asanyarray(out.dataobj)), -32768, 32767).astype(np.int16)
    result = nib.Nifti1Image(data, affine)
    result.set_qform(affine, code=1)
    result.set_sform(affine, code=1)
    return result


GRIDS = {"aniso": (0.4, 0.4, 7.0), "tiny": (6.0, 6.0, 6.0)}


@pytest.fixture(scope="module")
def odd_grids(demo, tmp_path_factory) -> Path:
    """A BIDS dataset with the demo's sub-04 post-op T1w-CE and T1w resampled to each grid of GRIDS."""
    root = tmp_path_factory.mktemp("odd_grids") / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "odd grids", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("participant_id\tsite\n" + "".join(f"sub-{s}\t{s}\n" for s in GRIDS))
    source = demo / "sub-04" / "ses-postop" / "anat"
    for sub, zooms in GRIDS.items():
        anat = root / f"sub-{sub}" / "ses-postop" / "anat"
        anat.mkdir(parents=True)
        for name in ("ce-Gd_T1w", "T1w"):
            img = resampled(nib.load(source / f"sub-04_ses-postop_{name}.nii.gz"), zooms)
            nib.save(img, anat / f"sub-{sub}_ses-postop_{name}.nii.gz")
    return root


def test_extreme_anisotropy_and_tiny_image_give_outputs_on_the_input_grid(odd_grids, tmp_path):
    shapes = {s: nib.load(next((odd_grids / f"sub-{s}").rglob("*_ce-*_T1w.nii.gz"))).shape for s in GRIDS}
    assert 8 <= min(shapes["tiny"]) and max(shapes["tiny"]) < 32, shapes
    assert shapes["aniso"][2] >= 8, shapes
    out = tmp_path / "out"
    proc = run_cli(odd_grids, out, tmp_path / "work", "--participant-label", *GRIDS, "--skip-bids-validation")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for sub, zooms in GRIDS.items():
        t1ce = next((odd_grids / f"sub-{sub}").rglob("*_ce-*_T1w.nii.gz"))
        ref = nib.load(t1ce)
        np.testing.assert_allclose(ref.header.get_zooms()[:3], zooms, rtol=1e-5)
        files = session_outputs(out, t1ce, sub)
        for key in ("mask", "probseg", "brain"):
            img = nib.load(files[key])
            assert img.shape == ref.shape, (sub, key, img.shape, ref.shape)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5, err_msg=f"{sub} {key}")
        mask = np.asanyarray(nib.load(files["mask"]).dataobj)
        prob = np.asanyarray(nib.load(files["probseg"]).dataobj)
        assert set(np.unique(mask)) <= {0, 1} and np.all((prob >= 0) & (prob <= 1))
        assert np.asanyarray(nib.load(files["brain"]).dataobj).any(), f"{sub}: an empty brain mask"
        [row] = list(csv.DictReader(files["tsv"].open(), delimiter="\t"))
        voxel_ml = float(np.prod(zooms)) / 1000
        assert row["config"] == "B"
        assert float(row["residual_volume_ml"]) == pytest.approx(mask.sum() * voxel_ml, rel=1e-3, abs=1e-4)


# --- 3. a very large image: input checks and post-processing within a memory bound --------------------------

LARGE_SHAPE = (896, 896, 512)
LARGE_VOXELS = int(np.prod(LARGE_SHAPE))
GIB = 2**30
# Documented bounds (peak RSS of a fresh Python process doing only that step, 896×896×512):
# - input checks of an int16 .nii.gz (0.77 GiB of voxels): nibabel decompresses it whole, twice one after the
#   other (load_3d, then check_image), with a transient copy while decompressing, plus the interpreter with
#   pybids/nibabel. Measured 1.6 GiB (2026-11, 2-core VM); bound 3 GiB;
# - post-processing of a float32 probability (1.53 GiB, counted in): the probability, boolean masks
#   (0.38 GiB each) and cc3d's label images (up to 1.53 GiB each, one at a time). Measured 2.3–3.2 GiB;
#   bound 5 GiB.
# Both are well below the 8 GiB an HPC job is typically given per participant.
CHECK_BOUND_GIB = 3.0
POSTPROCESS_BOUND_GIB = 5.0


def write_large_int16(path: Path, shape: tuple[int, int, int], zooms=(0.25, 0.25, 0.35)) -> Path:
    """A head-like int16 NIfTI (ellipsoid + noise) written slab by slab, without holding it in memory;
    gzip-compressed when ``path`` ends with .gz (as BIDS datasets usually are: nibabel then cannot memory-map
    it, and reads it whole)."""
    raw = path.with_name(path.name.removesuffix(".gz"))
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms(zooms)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(zooms) / 2
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    with open(raw, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4)
    data = np.memmap(raw, dtype=np.int16, mode="r+", offset=352, shape=shape, order="F")
    x, y = np.ogrid[: shape[0], : shape[1]]
    rng = np.random.default_rng(0)
    for z in range(shape[2]):
        r2 = ((x - shape[0] / 2) / (0.4 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 + (
            (z - shape[2] / 2) / (0.42 * shape[2])) ** 2
        data[:, :, z] = np.where(r2 < 1, 400, 0) + rng.integers(0, 20, size=shape[:2], dtype=np.int16)
    data.flush()
    del data
    if raw != path:
        with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=1) as dest:
            shutil.copyfileobj(src, dest, length=16 * 2**20)
        raw.unlink()
    return path


def peak_rss_gib(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; return its peak RSS (GiB) and its stdout.

    The peak is the interpreter's own ``VmHWM`` (reset by exec), not ``ru_maxrss``: Linux carries the
    latter over from the forking process, so a child of a big pytest process would report pytest's size.
    """
    script = textwrap.dedent(code) + textwrap.dedent("""
        from pathlib import Path
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        print("PEAK_KIB", hwm.split()[1])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB")))
    return kib / 2**20, proc.stdout


def available_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


@pytest.fixture
def enough_resources(tmp_path):
    if available_memory_gib() < POSTPROCESS_BOUND_GIB + 2:
        pytest.skip(f"needs {POSTPROCESS_BOUND_GIB + 2:.0f} GiB of free memory")
    free = os.statvfs(tmp_path)
    if free.f_bavail * free.f_frsize < 2 * LARGE_VOXELS * 2:
        pytest.skip("needs 1.6 GiB of free disk space")


def test_large_image_input_checks_within_memory_bound(tmp_path, enough_resources):
    bids = tmp_path / "bids"
    anat = bids / "sub-01" / "ses-postop" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "large", "BIDSVersion": "1.10.0"}))
    write_large_int16(anat / "sub-01_ses-postop_ce-gadolinium_T1w.nii.gz", LARGE_SHAPE)
    peak, stdout = peak_rss_gib(f"""
        from bids_postop.bids.inputs import discover
        from bids_postop.workflows.preflight import check_participant_inputs
        [p] = [check_participant_inputs(p) for p in discover({str(bids)!r}, validate=False)]
        print("FILES", sorted(p.files), "NOTES", list(p.notes))
    """)
    assert "FILES ['postop_t1ce'] NOTES []" in stdout, stdout
    image_gib = LARGE_VOXELS * 2 / GIB
    print(f"input checks of a {LARGE_SHAPE} int16 image ({image_gib:.2f} GiB): peak RSS {peak:.2f} GiB")
    assert peak < CHECK_BOUND_GIB, f"peak RSS {peak:.2f} GiB for the input checks"


def test_large_probability_postprocessing_within_memory_bound(enough_resources):
    peak, stdout = peak_rss_gib(f"""
        import numpy as np
        from bids_postop.core.postprocess import postprocess_probability
        shape = {LARGE_SHAPE!r}
        prob = np.zeros(shape, np.float32)
        rng = np.random.default_rng(0)
        prob[400:460, 380:450, 200:240] = 0.9           # a residual tumour (~168 000 voxels)
        for i in range(300):                           # specks of 8 voxels, 40 apart, to be removed
            x, y = 20 + 40 * (i % 20), 20 + 40 * (i // 20)
            prob[x:x + 2, y:y + 2, 20:22] = rng.uniform(0.5, 1)
        mask, m = postprocess_probability(prob, (0.25, 0.25, 0.35), threshold=0.5)
        print("RESULT", m.residual_voxels, m.components_removed, mask.shape, mask.dtype)
    """)
    assert "RESULT 168000 300 (896, 896, 512) uint8" in stdout, stdout
    print(f"post-processing of a {LARGE_SHAPE} float32 probability: peak RSS {peak:.2f} GiB")
    assert peak < POSTPROCESS_BOUND_GIB, f"peak RSS {peak:.2f} GiB for post-processing"


# --- 4. two participant processes writing into one output_dir at once ----------------------------------------

def test_concurrent_participant_runs_share_one_output_dir(demo, tmp_path):
    """sub-01 (all inputs, run as configuration B) and sub-04 (B) at the same time, as two Slurm array
    tasks would: each its own work directory, one output directory."""
    out = tmp_path / "out"
    procs = {sub: subprocess.Popen([*BIDS_POSTOP, str(demo), str(out), "participant", "--participant-label", sub,
                                    "--config", "B", "-w", str(tmp_path / f"work_{sub}"), *FAST],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sub in ("01", "04")}
    results = {sub: p.communicate(timeout=RUN_TIMEOUT_S) for sub, p in procs.items()}
    for sub, p in procs.items():
        assert p.returncode == 0, (sub, results[sub][1][-3000:])

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "bids_postop"
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert sorted(ignore) == sorted(BIDSIGNORE), "each pattern once, none lost"
    logs = sorted((out / "logs").glob("*.log"))
    assert len(logs) == 2, "one log per process"
    texts = [log.read_text() for log in logs]
    for sub in ("01", "04"):
        [own] = [t for t in texts if f"--participant-label {sub}" in t]
        assert f"sub-{sub}: finished" in own
        other = "04" if sub == "01" else "01"
        assert f"sub-{other}:" not in own, "a log holds one process's lines only"
    for sub in ("01", "04"):
        t1ce = next((demo / f"sub-{sub}" / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
        files = session_outputs(out, t1ce, sub)
        with files["tsv"].open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
        assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
        assert len(rows) == 1 and rows[0]["participant_id"] == f"sub-{sub}" and rows[0]["config"] == "B"
        measures = json.loads(files["tsv"].with_suffix(".json").read_text())
        assert measures["participant_id"] == f"sub-{sub}"
        for key in ("mask", "probseg", "brain"):
            assert nib.load(files[key]).shape == nib.load(t1ce).shape
    leftovers = [p.name for p in out.rglob(".*") if p.name not in (".bids_postop.lock", ".bidsignore")]
    assert leftovers == [], "no temporary files left behind"
