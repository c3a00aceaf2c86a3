"""Realistic synthetic cases for the speed benchmarks (shared by participant_speed.py and nnunet_vs_stock.py).

A real head *with skull* (TCGA-FG-6692 in its native acquisition space, ../shared/data/real or
bids_postop/data/real: T1w-CE and a separate T1w series, 256×224×26 at 0.9×0.9×5.5 mm, LAS) is resampled
(trilinear) onto the study's grids, centred on the head, with a faint noise floor outside it (as on
scanner images, so that only brain extraction, not the raw data, makes the background zero):

- ``study``: 430×461×180 at 0.67×0.64×1.96 mm, the study's average T1w-CE;
- ``large``: 512×512×200 at 0.5×0.5×1.0 mm.

The T1w keeps its own position (the head moved ~3 mm between the two series), so the rigid registration
has real work to do. The HD-BET brain mask of the T1w-CE is resampled too (nearest neighbour), for
benchmarks that start from skull-stripped channels. Anatomy is upsampled from 5.5 mm slices: fine for
timing, brain extraction and cropping, not for accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

CASES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "study": ((430, 461, 180), (0.67, 0.64, 1.96)),
    "large": ((512, 512, 200), (0.5, 0.5, 1.0)),
}
SOURCE_CASE = "tcga-fg-6692/native"
SOURCE_FILES = {"t1ce": "TCGA-FG-6692_t1c.nii.gz", "t1": "TCGA-FG-6692_t1.nii.gz",
                "brain_mask": "TCGA-FG-6692_t1c_brainmask_hdbet.nii.gz", "flair": "TCGA-FG-6692_flair.nii.gz"}


def real_data_dir() -> Path:
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "shared" / "data" / "real", here / "bids_postop" / "data" / "real"):
        if (candidate / SOURCE_CASE / SOURCE_FILES["t1ce"]).is_file():
            return candidate / SOURCE_CASE
    raise SystemExit(f"cannot find {SOURCE_CASE} under ../shared/data/real or bids_postop/data/real")


def target_affine(source: nib.Nifti1Image, shape, spacing) -> np.ndarray:
    """Axes of ``source`` (its direction cosines), voxel size ``spacing``, centred on the source's field of view."""
    direction = source.affine[:3, :3] / np.linalg.norm(source.affine[:3, :3], axis=0)
    linear = direction @ np.diag(spacing)
    centre = source.affine @ np.array([*(np.array(source.shape[:3]) - 1) / 2, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre[:3] - linear @ ((np.array(shape) - 1) / 2)
    return affine


def resample(source: nib.Nifti1Image, shape, affine: np.ndarray, *, order: int) -> np.ndarray:
    """``source`` sampled on the (shape, affine) grid, in z slabs (small temporaries); 0 outside."""
    from scipy.ndimage import affine_transform

    vox = np.linalg.inv(source.affine) @ affine
    data = np.asanyarray(source.dataobj).astype(np.float32)
    out = np.zeros(shape, np.float32)
    step = 24
    for z0 in range(0, shape[2], step):
        z1 = min(z0 + step, shape[2])
        offset = vox[:3, :3] @ np.array([0, 0, z0]) + vox[:3, 3]
        out[:, :, z0:z1] = affine_transform(data, vox[:3, :3], offset=offset,
                                            output_shape=(shape[0], shape[1], z1 - z0), order=order,
                                            mode="constant", cval=0.0)
    return out


def make_case(name: str, out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write ``t1ce.nii.gz``, ``t1.nii.gz``, ``flair.nii.gz`` (int16, with skull) and ``brain_mask.nii.gz`` of case
    ``name``; reuse them when present (the FLAIR series keeps its own position too)."""
    shape, spacing = CASES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("t1ce", "t1", "brain_mask", "flair")
    files = {key: out_dir / f"{key}.nii.gz" for key in keys}
    if all(f.is_file() for f in files.values()) and nib.load(files["t1ce"]).shape == shape:
        return files
    src = real_data_dir()
    reference = nib.load(src / SOURCE_FILES["t1ce"])
    affine = target_affine(reference, shape, spacing)
    rng = np.random.default_rng(seed)
    for key in keys:
        if files[key].is_file() and nib.load(files[key]).shape == shape:
            continue
        img = nib.load(src / SOURCE_FILES[key])
        is_mask = key == "brain_mask"
        data = resample(img, shape, affine, order=0 if is_mask else 1)
        if is_mask:
            out = nib.Nifti1Image((data > 0.5).astype(np.uint8), affine)
        else:
            floor = 0.01 * float(np.percentile(data[data > 0], 99))
            data = np.maximum(data, np.abs(rng.normal(0.0, floor, size=shape)).astype(np.float32))
            out = nib.Nifti1Image(np.round(data).astype(np.int16), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        nib.save(out, files[key])
    return files


def write_bids(case: str, files: dict[str, Path], bids: Path, *, preop: dict[str, Path] | None = None) -> str:
    """A one-participant BIDS dataset holding the case; returns the label. Configuration B inputs (post-op T1w-CE
    and T1w), and with ``preop`` (:func:`make_preop`) configuration E's: the FLAIR, the pre-op T1w-CE and the pre-op
    tumour mask in ``derivatives/preop_masks`` (give it with ``-d preop=<bids>/derivatives/preop_masks``)."""
    label = case
    anat = bids / f"sub-{label}" / "ses-postop" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "speed benchmark", "BIDSVersion": "1.10.0"}))
    links = [(anat / f"sub-{label}_ses-postop_{name}.nii.gz", files[key])
             for key, name in (("t1ce", "ce-gadolinium_T1w"), ("t1", "T1w"))]
    if preop is not None:
        pre_anat = bids / f"sub-{label}" / "ses-preop" / "anat"
        masks = bids / "derivatives" / "preop_masks"
        (masks / f"sub-{label}" / "ses-preop" / "anat").mkdir(parents=True, exist_ok=True)
        pre_anat.mkdir(parents=True, exist_ok=True)
        (masks / "dataset_description.json").write_text(json.dumps({
            "Name": "pre-op tumour masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "benchmarks/study_cases.py"}]}))
        links += [(anat / f"sub-{label}_ses-postop_FLAIR.nii.gz", files["flair"]),
                  (pre_anat / f"sub-{label}_ses-preop_ce-gadolinium_T1w.nii.gz", preop["preop_t1ce"]),
                  (masks / f"sub-{label}" / "ses-preop" / "anat" / f"sub-{label}_ses-preop_label-tumor_mask.nii.gz",
                   preop["preop_mask"])]
    for dest, source in links:
        if not dest.exists():
            dest.symlink_to(source.resolve())
    return label


def rigid_matrix(angles_deg, shift_mm, *, centre) -> np.ndarray:
    """4×4 RAS rigid motion: rotations about x, y then z (degrees) about ``centre`` (mm), then a shift (mm)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    centre = np.asarray(centre, dtype=float)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre - rot @ centre + np.asarray(shift_mm, dtype=float)
    return out


def warp_field(*, seed: int, rms_mm: float, centre, terms: int = 4):
    """A smooth random displacement field d(x) (RAS mm → mm): per component, ``terms`` sinusoids of random direction,
    phase and wavelength 50–110 mm, scaled to ``rms_mm`` root-mean-square length (|d| at most ~2.9× that, |∇d| ≤ 0.4:
    invertible). Returns a function of points (…, 3) giving displacements (…, 3), float32."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(3, terms, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    waves = directions * (2 * np.pi / rng.uniform(50.0, 110.0, size=(3, terms, 1)))
    phases = rng.uniform(0, 2 * np.pi, size=(3, terms))
    amplitude = rms_mm / np.sqrt(1.5 * terms)  # E|d|^2 = 3 components x terms x a^2 / 2
    centre = np.asarray(centre, dtype=np.float32)

    def field(points: np.ndarray) -> np.ndarray:
        x = np.asarray(points, dtype=np.float32) - centre
        out = np.empty(x.shape, dtype=np.float32)
        for c in range(3):
            out[..., c] = amplitude * np.sin(x @ waves[c].T.astype(np.float32) + phases[c].astype(np.float32)).sum(-1)
        return out

    return field


PREOP_MOTION = ((3.0, -4.0, 5.0), (4.0, -6.0, 3.0))
PREOP_WARP = {"seed": 11, "rms_mm": 2.0}
PREOP_TUMOUR = {"offset_mm": (25.0, 8.0, 6.0), "radii_mm": (20.0, 15.0, 14.0)}


def make_preop(name: str, out_dir: Path, *, seed: int = 5) -> dict[str, Path]:
    """A pre-operative session for case ``name``: the real T1w-CE head through a known rigid motion and a known
    smooth warp (:func:`warp_field`), resampled onto a grid of the same size and spacing (trilinear, 1 % noise
    floor), and a pre-op tumour mask: an ellipsoid (radii 20×15×14 mm, ~17.6 ml) in the anatomy, 25 mm right of the
    brain's centre, carried by the same warp. Also writes the truth: the ellipsoid on the post-op grid
    (``truth_mask``) and the transform (``truth.json``: the fixed→moving map is ``w⁻¹``, ``w(y) = z + d(z)``,
    ``z = M⁻¹ y``). Reuses the files when present."""
    shape, spacing = CASES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {key: out_dir / f"{key}.nii.gz" for key in ("preop_t1ce", "preop_mask", "truth_mask")}
    files["truth"] = out_dir / "preop_truth.json"
    if all(f.is_file() for f in files.values()):
        return files
    post = make_case(name, out_dir, seed=0)
    src = real_data_dir()
    source = nib.load(src / SOURCE_FILES["t1ce"])
    affine = target_affine(source, shape, spacing)
    brain = nib.load(post["brain_mask"])
    idx = np.argwhere(np.asanyarray(brain.dataobj) > 0)
    brain_centre = idx.mean(axis=0) @ brain.affine[:3, :3].T + brain.affine[:3, 3]
    head_centre = (source.affine @ np.array([*(np.array(source.shape[:3]) - 1) / 2, 1.0]))[:3]
    motion = rigid_matrix(*PREOP_MOTION, centre=head_centre)
    field = warp_field(seed=PREOP_WARP["seed"], rms_mm=PREOP_WARP["rms_mm"], centre=head_centre)
    tumour_centre = brain_centre + np.array(PREOP_TUMOUR["offset_mm"])
    radii = np.array(PREOP_TUMOUR["radii_mm"])

    def inside(points: np.ndarray) -> np.ndarray:
        return (((points - tumour_centre) / radii) ** 2).sum(-1) <= 1.0

    from scipy.ndimage import map_coordinates

    data = np.asanyarray(source.dataobj).astype(np.float32)
    inv_src = np.linalg.inv(source.affine)
    inv_motion = np.linalg.inv(motion)
    pre = np.zeros(shape, np.float32)
    pre_mask = np.zeros(shape, np.uint8)
    truth = np.zeros(shape, np.uint8)
    ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), -1).astype(np.float32)
    for k in range(shape[2]):
        pts = np.concatenate([ij, np.full(shape[:2] + (1,), k, np.float32)], -1) @ affine[:3, :3].T + affine[:3, 3]
        z = pts @ inv_motion[:3, :3].T + inv_motion[:3, 3]
        w = (z + field(z)).astype(np.float32)
        vox = w @ inv_src[:3, :3].T + inv_src[:3, 3]
        pre[:, :, k] = map_coordinates(data, np.moveaxis(vox, -1, 0), order=1, mode="constant", cval=0.0)
        pre_mask[:, :, k] = inside(w)
        truth[:, :, k] = inside(pts)
    rng = np.random.default_rng(seed)
    floor = 0.01 * float(np.percentile(pre[pre > 0], 99))
    pre = np.maximum(pre, np.abs(rng.normal(0.0, floor, size=shape)).astype(np.float32))
    for key, values, dtype in (("preop_t1ce", np.round(pre), np.int16), ("preop_mask", pre_mask, np.uint8),
                               ("truth_mask", truth, np.uint8)):
        out = nib.Nifti1Image(values.astype(dtype), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        nib.save(out, files[key])
    files["truth"].write_text(json.dumps({"seed": PREOP_WARP["seed"], "rms_mm": PREOP_WARP["rms_mm"],
                                          "centre": head_centre.tolist(), "motion": motion.tolist()}))
    return files


def skull_stripped_channels(files: dict[str, Path], out_dir: Path) -> list[Path]:
    """T1w-CE and T1w (the T1w taken as registered: same grid) zeroed outside the brain mask, in RAS+ voxel
    order (nibabel's ``as_closest_canonical``: SimpleITK and nibabel then give nnU-Net the same array), float32,
    named as nnU-Net's raw inputs ``case_0000.nii.gz``, ``case_0001.nii.gz``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = np.asanyarray(nib.load(files["brain_mask"]).dataobj) > 0
    written = []
    for i, key in enumerate(("t1ce", "t1")):
        dest = out_dir / f"case_{i:04d}.nii.gz"
        written.append(dest)
        if dest.exists():
            continue
        img = nib.load(files[key])
        data = np.where(mask, np.asanyarray(img.dataobj).astype(np.float32), 0).astype(np.float32)
        canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
        out = nib.Nifti1Image(np.asanyarray(canonical.dataobj).astype(np.float32), canonical.affine)
        out.set_qform(canonical.affine, code=1)
        out.set_sform(canonical.affine, code=1)
        nib.save(out, dest)
    return written


def machine() -> dict[str, object]:
    import os
    import platform
    import time
    from importlib.metadata import PackageNotFoundError, version

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    versions = {}
    for name in ("bids_postop", "torch", "nnunetv2", "onnxruntime", "antspyx", "deepbet", "nibabel", "numpy", "scipy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    mem = ""
    try:
        mem = next(line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational only
        gpu = None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cpus": os.cpu_count(), "memory": mem,
            "avx512_bf16": "avx512_bf16" in flags, "gpu": gpu, "python": platform.python_version(),
            "versions": versions, "load_average": [round(x, 2) for x in os.getloadavg()]}


def tree_usage(root_pid: int) -> tuple[int, dict[int, float]]:
    """Summed resident memory (bytes) of ``root_pid`` and all its descendants, and each one's CPU seconds so far
    (user + system, from /proc; processes already gone are not listed)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    cpu: dict[int, float] = {}
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pid = int(entry.name)
            rss[pid] = int((entry / "statm").read_text().split()[1]) * page
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(pid)
    total, seen, todo = 0, {}, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        if pid in cpu:
            seen[pid] = cpu[pid]
        todo.extend(children.get(pid, []))
    return total, seen


WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "print('RUSAGE', r.ru_maxrss, r.ru_utime + r.ru_stime, flush=True); sys.exit(code)")


def run_measured(command: list[str], *, env: dict | None = None, log: Path | None = None,
                 cwd: Path | None = None) -> dict[str, object]:
    """Run ``command`` under a small wrapper process; returns wall seconds, CPU seconds (user + system of the
    command and all its descendants), the peak summed RSS of the process tree (sampled every 0.25 s), the
    largest single process's peak RSS (``ru_maxrss``), the exit code and the output (stdout + stderr)."""
    import subprocess
    import sys
    import threading
    import time

    start = time.monotonic()
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *command], stdout=out, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=cwd)
    peak = 0
    cpu_by_pid: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            rss, cpu = tree_usage(proc.pid)
            peak = max(peak, rss)
            cpu_by_pid.update(cpu)
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    took = time.monotonic() - start
    if log:
        out.close()
        stdout = log.read_text()
    usage = [line.split() for line in (stdout or "").splitlines() if line.startswith("RUSAGE ")]
    max_kib, reaped_cpu = (int(usage[-1][1]), float(usage[-1][2])) if usage else (0, float("nan"))
    # CPU: the larger of what the wrapper reaped and the sampled per-process totals (nipype's forkserver workers
    # are reaped by the forkserver, not by the wrapper; sampling misses at most the last 0.25 s of each process)
    cpu = max(reaped_cpu, sum(cpu_by_pid.values()))
    return {"wall_s": round(took, 1), "cpu_s": round(cpu, 1), "peak_tree_rss_gib": round(peak / 2**30, 2),
            "peak_process_rss_gib": round(max_kib / 2**20, 2), "returncode": proc.returncode,
            "output": stdout or ""}
