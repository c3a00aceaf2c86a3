"""Process state in one place: what libraries read from the environment, and how many threads each step uses.

- Offline by default: nipype's online version check (etelemetry) is turned off before nipype is imported
  (:func:`offline`); nothing else in a run uses the network. Only ``bids_postop-models fetch`` downloads.
- Threads (fMRIPrep's rule): ``--nprocs`` processes at once, ``--omp-nthreads`` threads per multi-threaded step
  (default ``min(nprocs - 1, 8)``, at least 1); every multi-threaded node declares ``n_procs`` so that nipype's
  MultiProc never runs more threads at once than ``--nprocs`` (:func:`thread_counts`).
- ITK and OpenMP read their thread counts once per process, at first use: :func:`set_thread_environment` sets
  them before any worker starts. Registration results depend on the thread count at the 0.01 mm level, so the
  count is recorded in the provenance.
"""

from __future__ import annotations

import os

OFFLINE_ENVIRONMENT = {"NIPYPE_NO_ET": "1"}  # nipype: no etelemetry version check (a network call per run)
MAX_OMP_THREADS = 8


def offline() -> None:
    """Turn off every network call libraries would make on their own (call before importing nipype)."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def default_omp_nthreads(nprocs: int) -> int:
    """fMRIPrep's default: one core left for the other steps, at most 8, at least 1."""
    return max(1, min(nprocs - 1, MAX_OMP_THREADS))


def thread_counts(nprocs: int, omp_nthreads: int | None) -> tuple[int, int, str | None]:
    """(nprocs, omp_nthreads, warning): ``omp_nthreads`` defaults per :func:`default_omp_nthreads` and is capped at
    ``nprocs`` (a step cannot use more threads than the run may)."""
    if omp_nthreads is None:
        return nprocs, default_omp_nthreads(nprocs), None
    if omp_nthreads > nprocs:
        return nprocs, nprocs, (f"--omp-nthreads {omp_nthreads} is more than --nprocs {nprocs}: using {nprocs} "
                                f"threads per step")
    return nprocs, omp_nthreads, None


def set_thread_environment(threads: int) -> None:
    """ITK (ANTs) and OpenMP thread counts for this process and the workers it starts."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# Caches that libraries keep under fixed paths; in the images they default to /tmp, which Singularity binds from
# the host, so concurrent jobs of several users would share (and race on) them.
_WORK_DIR_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "MPLCONFIGDIR": "matplotlib",
                    "XDG_CACHE_HOME": "xdg"}
CACHES_IN_WORK_DIR = "BIDS_POSTOP_CACHES_IN_WORKDIR"  # set by the container images


def use_work_dir_caches(work_dir) -> dict[str, str]:
    """Point library caches at ``<work_dir>/.cache/`` (one set per job, on the bound work folder) when the
    images ask for it (``BIDS_POSTOP_CACHES_IN_WORKDIR=1``); returns what was set (for the provenance)."""
    from pathlib import Path

    if os.environ.get(CACHES_IN_WORK_DIR, "") not in ("1", "true", "yes"):
        return {}
    root = Path(work_dir) / ".cache"
    chosen = {}
    for variable, folder in _WORK_DIR_CACHES.items():
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = chosen[variable] = str(path)
    return chosen
