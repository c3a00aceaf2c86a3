"""The runtime layer: offline by default, thread counts, per-job caches in the images."""

from __future__ import annotations

import os

import pytest

from bids_postop import runtime


def test_offline_turns_nipype_version_check_off(monkeypatch):
    monkeypatch.delenv("NIPYPE_NO_ET", raising=False)
    runtime.offline()
    assert os.environ["NIPYPE_NO_ET"] == "1"


@pytest.mark.parametrize(("nprocs", "omp", "expected"), [(1, None, (1, 1)), (2, None, (2, 1)), (12, None, (12, 8)),
                                                         (4, 4, (4, 4)), (2, 8, (2, 2))])
def test_thread_counts(nprocs, omp, expected):
    got = runtime.thread_counts(nprocs, omp)
    assert got[:2] == expected and (got[2] is not None) == (omp is not None and omp > nprocs)


def test_caches_move_into_the_work_dir_only_in_the_images(tmp_path, monkeypatch):
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        monkeypatch.setenv(variable, "/tmp/shared")
    monkeypatch.delenv(runtime.CACHES_IN_WORK_DIR, raising=False)
    assert runtime.use_work_dir_caches(tmp_path / "work") == {}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/shared"
    monkeypatch.setenv(runtime.CACHES_IN_WORK_DIR, "1")
    chosen = runtime.use_work_dir_caches(tmp_path / "work")
    assert set(chosen) == {"TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"}
    for variable, path in chosen.items():
        assert os.environ[variable] == path and path.startswith(str(tmp_path / "work" / ".cache"))
