"""Benchmark: the participant report's figures on the study grid, per figure (by hand, not CI; issue 18 item 2).

    python benchmarks/figures_speed.py --workdir /tmp/bench_figures [--case study] [--code DIR ...] [--repeat 2]

Inputs (study_cases.py, configuration E's figures): the case's post-op T1w-CE (int16 ``.nii.gz``, with skull and
noise floor, as the BIDS input), its brain mask, a residual mask (a 12×12×3-voxel block in the brain) with a
smooth probability map around it, and the "registered" T1w, FLAIR and pre-op T1w-CE as float32 ``.nii`` on the
same grid (as the work directory holds them) with the pre-op tumour mask: the mosaic, the brain-mask figure, three
registration checks and the pre-op figure — what the ReportFigures node draws. Each ``--code`` folder (a
bids_postop package, e.g. ``git archive <commit> bids_postop | tar -x -C DIR``; default: the installed one) runs in
a fresh process, ``--repeat`` times, back to back; reported: wall and CPU seconds per figure and in all (matplotlib's
import included in the first figure, as in the node). The machine may be shared: CPU seconds are the steadier
number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_cases import CASES, machine, make_case, make_preop  # noqa: E402

SCRIPT = textwrap.dedent("""
    import contextlib, json, sys, time
    from pathlib import Path
    from bids_postop.reports import figures as F
    files = {k: Path(v) for k, v in json.loads(sys.argv[1]).items()}
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    shared = getattr(F, "shared_loading", None)
    rows = {}
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    with (shared() if shared else contextlib.nullcontext()):
        for name, call in (
            ("mosaic", lambda: F.residual_mosaic(files["t1ce"], files["residual"], files["probseg"],
                                                 files["brain_mask"], out / "mosaic.png")),
            ("brainmask", lambda: F.brain_mask_figure(files["t1ce"], files["brain_mask"], out / "brainmask.png")),
            ("registration_t1", lambda: F.registration_check(files["t1ce"], files["t1"], out / "reg_t1.svg",
                                                             brain_mask=files["brain_mask"])),
            ("registration_flair", lambda: F.registration_check(files["t1ce"], files["flair"], out / "reg_flair.svg",
                                                                brain_mask=files["brain_mask"])),
            ("registration_preop", lambda: F.registration_check(files["t1ce"], files["preop"], out / "reg_pre.svg",
                                                                brain_mask=files["brain_mask"])),
            ("preopmask", lambda: F.preop_mask_figure(files["preop"], files["preop_mask"], out / "preopmask.png")),
        ):
            w, c = time.perf_counter(), time.process_time()
            call()
            rows[name] = [round(time.perf_counter() - w, 2), round(time.process_time() - c, 2)]
    rows["total"] = [round(time.perf_counter() - start_wall, 2), round(time.process_time() - start_cpu, 2)]
    print("FIGURES", json.dumps(rows))
    print("PACKAGE", F.__file__)
""")


def make_inputs(case: str, workdir: Path) -> dict[str, Path]:
    files = make_case(case, workdir / "cases" / case)
    pre = make_preop(case, workdir / "cases" / case)
    out = workdir / "figure_inputs" / case
    out.mkdir(parents=True, exist_ok=True)
    t1ce = nib.load(files["t1ce"])
    made = {"t1ce": files["t1ce"], "brain_mask": files["brain_mask"], "preop_mask": pre["preop_mask"]}
    for key, source in (("t1", files["t1"]), ("flair", files["flair"]), ("preop", pre["preop_t1ce"])):
        made[key] = out / f"{key}.nii"
        if not made[key].exists():  # the work directory's registered images: float32, uncompressed, same grid
            data = np.asanyarray(nib.load(source).dataobj).astype(np.float32)
            nib.save(nib.Nifti1Image(data, t1ce.affine), made[key])
    made["residual"], made["probseg"] = out / "residual.nii.gz", out / "probseg.nii.gz"
    if not made["probseg"].exists():
        from scipy.ndimage import gaussian_filter

        brain = np.asanyarray(nib.load(files["brain_mask"]).dataobj) > 0
        centre = np.argwhere(brain).mean(axis=0).astype(int)
        residual = np.zeros(t1ce.shape, np.uint8)
        residual[centre[0] + 20:centre[0] + 32, centre[1]:centre[1] + 12, centre[2] - 1:centre[2] + 2] = 1
        nib.save(nib.Nifti1Image(residual, t1ce.affine), made["residual"])
        probability = np.clip(gaussian_filter(residual.astype(np.float32), 3) * 2.5, 0, 1).astype(np.float32)
        nib.save(nib.Nifti1Image(probability, t1ce.affine), made["probseg"])
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--case", default="study", choices=sorted(CASES))
    parser.add_argument("--code", type=Path, nargs="*", default=[None], help="bids_postop package folders to compare")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    files = make_inputs(args.case, workdir)
    print(f"machine: {json.dumps(machine())}", flush=True)
    rows = []
    for _ in range(args.repeat):
        for code in args.code:
            env = dict(os.environ)
            if code is not None:
                env["PYTHONPATH"] = str(code.resolve())
            label = str(code) if code is not None else "installed"
            load = os.getloadavg()[0]
            # `python -c` puts the working directory first on sys.path: run from the code's folder
            done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps({k: str(v) for k, v in files.items()}),
                                   str(workdir / "figures" / Path(label).name)], capture_output=True, text=True,
                                  env=env, cwd=code.resolve() if code is not None else None)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            times = json.loads(next(line.split(" ", 1)[1] for line in done.stdout.splitlines()
                                    if line.startswith("FIGURES ")))
            package = next(line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("PACKAGE "))
            rows.append({"code": label, "package": package, "load": round(load, 2), "seconds": times})
            print(json.dumps(rows[-1]), flush=True)
    (workdir / f"figures_{args.case}.json").write_text(json.dumps(rows, indent=1))
    names = list(rows[0]["seconds"])
    print("\n| code | load | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['code']} | {r['load']} | " + " | ".join(f"{r['seconds'][n][0]} / {r['seconds'][n][1]}"
                                                            for n in names) + " |")
    print("(each cell: wall / CPU seconds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
