"""Running on Slurm: one participant per array task, the group level after them, one shared output_dir.

- Fast tests: concurrent writers of the shared files (dataset_description.json, .bidsignore, logs, a TSV);
  the job-array script's index → participant mapping and the command it runs; submit_cohort.sh's sbatch
  calls (with a fake ``sbatch`` on PATH).
- Slow test: a real single-node Slurm cluster (``scripts/slurm/start_local_cluster.sh``; CI starts it when
  slurm-wlm is installed) runs two demo participants as array tasks and the group level after them; the
  outputs must equal a local run's. Skipped when ``sbatch`` is missing or ``sinfo`` cannot reach a cluster.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
ARRAY_SCRIPT = SLURM_SCRIPTS / "bids_postop_array.sbatch"
SUBMIT = SLURM_SCRIPTS / "submit_cohort.sh"
LOCAL_CLUSTER_CONF = Path(os.environ.get("BIDS_POSTOP_SLURM_DIR", "/tmp/bids_postop_slurm")) / "slurm.conf"
BIDS_POSTOP = Path(sys.executable).parent / "bids_postop"
# thread counts fixed per process (ITK reads its variable once): both runs must start from the same state
THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# --- concurrent writers into one output_dir (no Slurm needed) --------------------------------------------

def _concurrent_writer(output_dir: str, bids_dir: str, index: int, barrier, n_lines: int) -> str:
    import logging

    from bids_postop.bids.derivatives import atomic_write_text, write_dataset_description
    from bids_postop.cli.run import settings_from_args, setup_logging

    out, bids = Path(output_dir), Path(bids_dir)
    settings = settings_from_args([bids_dir, output_dir, "participant", "-w", str(out.parent / f"work{index}"),
                                   "--model", "demo"])
    barrier.wait()
    for _ in range(20):
        write_dataset_description(out, bids)
    log_file = setup_logging(settings)
    logger = logging.getLogger("bids_postop")
    for handler in logger.handlers:  # keep the console quiet; the file gets everything
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)
    for line in range(n_lines):
        logger.info("writer %d line %d %s", index, line, "x" * 200)
        if line % 50 == 0:
            atomic_write_text(out / "group_summary.tsv",
                              "participant_id\twriter\n" + "".join(f"sub-{i:02d}\t{index}\n" for i in range(200)))
    for handler in logger.handlers:
        handler.close()
    return str(log_file)


def test_concurrent_processes_leave_valid_shared_files(tmp_path):
    from bids_postop.bids.derivatives import BIDSIGNORE

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    out = tmp_path / "out"
    n_proc, n_lines = 4, 300
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n_proc)
        with ctx.Pool(n_proc) as pool:
            logs = pool.starmap(_concurrent_writer, [(str(out), str(bids), i, barrier, n_lines)
                                                     for i in range(n_proc)], chunksize=1)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_postop"
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert sorted(ignore) == sorted(BIDSIGNORE), "each pattern once, none lost"
    assert len(set(logs)) == n_proc, "one log file per process"
    for index, log in enumerate(logs):
        lines = Path(log).read_text().splitlines()
        writer_lines = [line for line in lines if " writer " in line]
        assert len(writer_lines) == n_lines
        assert all(f" writer {index} line " in line and line.endswith("x" * 200) for line in writer_lines)
    rows = (out / "group_summary.tsv").read_text().splitlines()
    assert len(rows) == 201 and len({row.split("\t")[1] for row in rows[1:]}) == 1, "one writer's whole file"
    leftovers = [p.name for p in out.rglob(".*") if p.name != ".bids_postop.lock" and p.name != ".bidsignore"]
    assert leftovers == [], "no temporary files left behind"


# --- the scripts, without a cluster --------------------------------------------------------------------------

def _participants_tsv(bids: Path, labels) -> None:
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "participants.tsv").write_text("participant_id\tsite\n" + "".join(f"sub-{x}\tn/a\n" for x in labels))


@pytest.mark.parametrize("index, label", [(1, "01"), (3, "c3")])
def test_array_task_runs_its_participant(tmp_path, index, label):
    bids = tmp_path / "bids"
    _participants_tsv(bids, ["01", "b2", "c3"])
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "3",
           "SLURM_MEM_PER_NODE": "10000", "BIDS_POSTOP_CMD": "echo RUN", "BIDS_POSTOP_WORK_DIR": str(tmp_path / "w")}
    env.pop("PARTICIPANTS_FILE", None)
    proc = subprocess.run(["bash", str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out"), "--model", "demo"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = [line for line in proc.stdout.splitlines() if line.startswith("RUN ")]
    assert run.split() == ["RUN", str(bids), str(tmp_path / "out"), "participant", "--participant-label", label,
                           "-w", str(tmp_path / "w" / f"sub-{label}"), "--nprocs", "3", "--mem", "9000M",
                           "--model", "demo"]
    assert "exit code 0" in proc.stdout.splitlines()[-1]


def test_array_task_outside_the_list_is_a_usage_error(tmp_path):
    bids = tmp_path / "bids"
    _participants_tsv(bids, ["01"])
    listing = tmp_path / "list.txt"
    listing.write_text("# cohort\nsub-01\n\n02\n")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "BIDS_POSTOP_CMD": "echo RUN", "PARTICIPANTS_FILE": str(listing)}
    proc = subprocess.run(["bash", str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "outside 1-2" in proc.stderr + proc.stdout


def test_default_command_is_the_singularity_image(tmp_path):
    bids = tmp_path / "bids"
    _participants_tsv(bids, ["01"])
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "singularity").write_text('#!/bin/sh\necho "SINGULARITY $*"\n')
    (fake_bin / "singularity").chmod(0o755)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "PATH": f"{fake_bin}:{os.environ['PATH']}",
           "BIDS_POSTOP_SIF": "/images/bids_postop.sif", "BIDS_POSTOP_BIND": "/models,/data/masks"}
    for name in ("BIDS_POSTOP_CMD", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
                 "PARTICIPANTS_FILE", "BIDS_POSTOP_WORK_DIR", "BIDS_POSTOP_HOME"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = [line for line in proc.stdout.splitlines() if line.startswith("SINGULARITY ")]
    assert run.split() == ["SINGULARITY", "run", "--nv", "--cleanenv", "-B", str(bids), "-B", str(tmp_path / "out"),
                           "-B", str(tmp_path / "work"), "-B", "/models", "-B", "/data/masks",
                           "/images/bids_postop.sif", str(bids), str(tmp_path / "out"), "participant",
                           "--participant-label", "01", "-w", str(tmp_path / "work" / "sub-01"), "--nprocs", "1"]


def test_submit_cohort_submits_the_array_then_the_group(tmp_path):
    bids = tmp_path / "bids"
    _participants_tsv(bids, ["01", "02", "03"])
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.txt"
    # a fake sbatch: records its arguments (one per line, blank line between calls) and prints a job id
    (fake_bin / "sbatch").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" >>"{calls}"; echo >>"{calls}"\n'
        f'n=$(grep -c "^$" "{calls}"); echo "$((100 + n));cluster"\n')
    (fake_bin / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "BIDS_POSTOP_MAX_PARALLEL": "2",
           "SBATCH_ARGS": "--cpus-per-task=2 --mem=4G", "BIDS_POSTOP_SLURM_LOGS": str(tmp_path / "logs")}
    env.pop("PARTICIPANTS_FILE", None)

    def submit(*extra):
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(SUBMIT), str(bids), str(tmp_path / "out"), *extra], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, [c.splitlines() for c in calls.read_text().strip("\n").split("\n\n")]

    stdout, (array, group) = submit("--model", "demo", "--no-tta")
    assert stdout.split() == ["array_job=101", "group_job=102"]
    assert "--array=1-3%2" in array and "--parsable" in array and "--cpus-per-task=2" in array
    assert array[-6:] == [str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out"), "--model", "demo", "--no-tta"]
    [listing] = (tmp_path / "logs").glob("participants_*.txt")
    assert listing.read_text().split() == ["01", "02", "03"]
    assert "--dependency=afterany:101" in group and "--export=ALL,BIDS_POSTOP_LEVEL=group" in group
    assert group[-6:] == [str(ARRAY_SCRIPT), str(bids), str(tmp_path / "out"), "--model", "demo", "--no-tta"]

    # --participant-label picks the participants (and is not passed on: each task gets its own)
    shutil.rmtree(tmp_path / "logs")
    _, (array, group) = submit("--participant-label", "sub-03", "01", "--model", "demo")
    assert "--array=1-2%2" in array and "--participant-label" not in array + group
    [listing] = (tmp_path / "logs").glob("participants_*.txt")
    assert listing.read_text().split() == ["03", "01"]


# --- a real Slurm cluster on localhost ----------------------------------------------------------------------

def _slurm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if "SLURM_CONF" not in env and LOCAL_CLUSTER_CONF.is_file():
        env["SLURM_CONF"] = str(LOCAL_CLUSTER_CONF)
    # nipype and Slurm tools want these; containers and CI often leave them unset
    user = env.get("USER") or env.get("LOGNAME") or "root"
    env.setdefault("USER", user)
    env.setdefault("LOGNAME", user)
    return env


def _start_local_cluster(env: dict[str, str]) -> dict[str, str]:
    """Start the single-node cluster of scripts/slurm (idempotent; .ci/run starts it too); fail when it cannot."""
    script = REPO / "scripts" / "slurm" / "start_local_cluster.sh"
    proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"no Slurm cluster reachable and {script} could not start one:\n{proc.stderr[-2000:]}")
    conf = proc.stdout.strip().removeprefix("export SLURM_CONF=")
    return {**env, "SLURM_CONF": conf}


@pytest.fixture(scope="module")
def slurm_env():
    """A reachable Slurm cluster: the running one, else the local one started here. Slurm's absence fails the
    test (CI installs slurm-wlm and munge; .ci/run fails when it cannot)."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        pytest.fail("Slurm client tools (sbatch) not installed: apt-get install -y slurm-wlm munge")
    env = _slurm_env()
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%T %c %m"], env=env, capture_output=True, text=True,
                              timeout=30)
        reachable = info.returncode == 0 and bool(info.stdout.strip())
    except subprocess.TimeoutExpired:
        reachable = False
    return env if reachable else _start_local_cluster(env)


def _jobs_pending(job_ids: list[str], env: dict[str, str]) -> bool:
    """Whether any of the jobs is still queued or running (``squeue -j``; no accounting database needed)."""
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], env=env, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        # jobs older than MinJobAge are forgotten: squeue then calls their ids invalid
        assert "Invalid job id" in proc.stderr, f"squeue failed: {proc.stderr}"
        return False
    return bool(proc.stdout.strip())


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.slow
def test_slurm_array_and_group_equal_a_local_run(slurm_env, tmp_path):
    from bids_postop.demo.dataset import write_demo_dataset
    from bids_postop.segmentation.models import resolve_models

    resolve_models("demo")  # the embedded demo models (docs/training.md): their absence fails the test
    assert BIDS_POSTOP.exists(), f"{BIDS_POSTOP} not found (install the package into this interpreter's env)"
    bids = tmp_path / "bids"
    write_demo_dataset(bids, seed=0)
    labels = ("01", "04")  # configurations E and B
    # --no-tta: mirroring TTA multiplies the CPU inference time by 8 and adds nothing to what is compared here
    options = ["-d", f"preop={bids / 'derivatives' / 'preop_masks'}", "--model", "demo", "--device", "cpu",
               "--no-tta"]
    slurm_out, local_out = tmp_path / "out_slurm", tmp_path / "out_local"
    logs = tmp_path / "slurm_logs"
    env = dict(slurm_env)
    node_mb = min(int(float(line.split()[2].rstrip("+"))) for line in subprocess.run(
        ["sinfo", "-h", "-o", "%T %c %m"], env=env, capture_output=True, text=True, timeout=30).stdout.splitlines())
    env.update({
        "BIDS_POSTOP_CMD": str(BIDS_POSTOP),
        "BIDS_POSTOP_WORK_DIR": str(tmp_path / "work_slurm"),
        "BIDS_POSTOP_SLURM_LOGS": str(logs),
        "BIDS_POSTOP_MAX_PARALLEL": "2",
        # one CPU per task → --nprocs 1: one ITK/torch thread, bit-for-bit the same as the local run below
        "SBATCH_ARGS": f"--cpus-per-task=1 --mem={min(3000, node_mb // 3)}M --time=02:00:00",
        "SBATCH_GROUP_ARGS": f"--cpus-per-task=1 --mem={min(1000, node_mb // 3)}M --time=00:10:00",
    })
    env.pop("PARTICIPANTS_FILE", None)
    start = time.monotonic()
    submitted = subprocess.run(["bash", str(SUBMIT), str(bids), str(slurm_out), "--participant-label", *labels,
                                *options], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    jobs = dict(line.split("=", 1) for line in submitted.stdout.split())
    # the local run in its own process (fresh thread settings), while the Slurm jobs run
    local_env = {k: v for k, v in env.items() if not k.startswith(("BIDS_POSTOP_", "SBATCH_"))}
    local_log_file = tmp_path / "local_run.log"  # a file, not a pipe: nobody reads a pipe while we poll
    local_log_handle = local_log_file.open("w")
    local = subprocess.Popen([str(BIDS_POSTOP), str(bids), str(local_out), "participant", "--participant-label",
                              *labels, "-w", str(tmp_path / "work_local"), "--nprocs", "1", *options],
                             env=local_env, cwd=tmp_path, stdout=local_log_handle,
                             stderr=subprocess.STDOUT)
    timeout = float(os.environ.get("BIDS_POSTOP_SLURM_TEST_TIMEOUT", "5400"))
    job_ids = [jobs["array_job"], jobs["group_job"]]
    local_seconds = slurm_seconds = None
    try:
        while local_seconds is None or slurm_seconds is None:
            if local_seconds is None and local.poll() is not None:
                local_seconds = time.monotonic() - start
            if slurm_seconds is None and not _jobs_pending(job_ids, env):
                slurm_seconds = time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not finished after {timeout:.0f} s (BIDS_POSTOP_SLURM_TEST_TIMEOUT): "
                                     f"local run {'done' if local_seconds else 'running'}, Slurm jobs "
                                     f"{'done' if slurm_seconds else 'queued or running'}")
            time.sleep(3)
    finally:
        if local.poll() is None:
            local.kill()
        if slurm_seconds is None:
            subprocess.run(["scancel", *job_ids], env=env, timeout=60)
        local_log_handle.close()
    local_log = local_log_file.read_text()
    print(f"\nSlurm (2 array tasks + group level): {slurm_seconds:.0f} s; local run of the same participants, "
          f"at the same time: {local_seconds:.0f} s")
    assert local.returncode == 0, local_log[-3000:]
    group_local = subprocess.run([str(BIDS_POSTOP), str(bids), str(local_out), "group"], env=local_env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert group_local.returncode == 0, group_local.stderr[-3000:]

    # every task and the group job ended with exit code 0 (their Slurm logs end with the exit code)
    task_logs = sorted(logs.glob(f"bids_postop_{jobs['array_job']}_*.out"))
    group_logs = list(logs.glob(f"bids_postop_group_{jobs['group_job']}.out"))
    assert len(task_logs) == 2 and len(group_logs) == 1, sorted(p.name for p in logs.iterdir())
    for log in (*task_logs, *group_logs):
        text = log.read_text()
        assert text.rstrip().endswith("exit code 0"), f"{log.name}:\n{text[-3000:]}"

    # shared files: valid, written once; one log file per process (2 tasks + group)
    description = json.loads((slurm_out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description == json.loads((local_out / "dataset_description.json").read_text())
    ignore = (slurm_out / ".bidsignore").read_text().splitlines()
    assert len(ignore) == len(set(ignore))
    assert len(list((slurm_out / "logs").glob("*.log"))) == 3
    assert not [p for p in slurm_out.rglob(".*.tmp*")], "temporary files left behind"

    # the same outputs as the local run: every TSV (per session and group level) row for row
    assert [r["participant_id"] for r in _read_tsv(slurm_out / "group_summary.tsv")] == ["sub-01", "sub-04"]
    tables = sorted(p.relative_to(local_out) for p in local_out.rglob("*.tsv") if "logs" not in p.parts)
    assert len(tables) >= 3, tables
    for rel in tables:
        assert _read_tsv(slurm_out / rel) == _read_tsv(local_out / rel), rel
    for label in labels:
        session = Path(f"sub-{label}") / "ses-postop"
        [tsv] = (slurm_out / session).glob(f"sub-{label}_ses-postop_desc-demo*_measures.tsv")
        [row] = _read_tsv(tsv)
        assert row["config"] == {"01": "E", "04": "B"}[label]
        images = sorted(p.relative_to(local_out) for p in (local_out / session / "anat").glob("*.nii.gz"))
        assert len(images) == 3, images
        for rel in images:
            a, b = nib.load(slurm_out / rel), nib.load(local_out / rel)
            np.testing.assert_array_equal(a.affine, b.affine, err_msg=str(rel))
            assert a.get_data_dtype() == b.get_data_dtype(), rel
            if rel.name.endswith("_probseg.nii.gz"):
                np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), rtol=0, atol=1e-5, err_msg=str(rel))
            else:
                np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), err_msg=str(rel))
            sidecar = rel.with_name(rel.name.replace(".nii.gz", ".json"))
            assert json.loads((slurm_out / sidecar).read_text()) == json.loads((local_out / sidecar).read_text())
