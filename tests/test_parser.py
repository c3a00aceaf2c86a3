import subprocess
import sys

import pytest

from bids_postop.cli.parser import build_parser
from bids_postop.cli.run import main, settings_from_args


def test_defaults_and_options(tmp_path):
    s = settings_from_args([str(tmp_path), str(tmp_path / "out"), "participant", "--participant-label", "sub-01",
                            "02", "-d", f"preop={tmp_path}", "--config", "B", "--nprocs", "2", "--mem", "8G",
                            "-w", str(tmp_path / "w"), "--device", "cpu", "-vv"])
    assert s.participant_labels == ("sub-01", "02") and s.derivatives == {"preop": tmp_path}
    assert s.config == "B" and s.nprocs == 2 and s.omp_nthreads == 1 and s.mem_gb == 8.0
    assert s.postop_session == "postop" and s.preop_session == "preop" and s.verbosity == 2
    assert s.model is None and s.work_dir == tmp_path / "w" and not s.notrack


@pytest.mark.parametrize(("nprocs", "omp", "expected"), [
    ("1", None, 1), ("2", None, 1), ("4", None, 3), ("16", None, 8), ("4", "2", 2), ("2", "6", 2)])
def test_omp_nthreads_defaults_as_fmriprep_and_never_exceeds_nprocs(tmp_path, nprocs, omp, expected):
    argv = [str(tmp_path), str(tmp_path / "out"), "participant", "--nprocs", nprocs]
    s = settings_from_args(argv + (["--omp-nthreads", omp] if omp else []))
    assert s.omp_nthreads == expected and s.omp_nthreads <= s.nprocs


@pytest.mark.parametrize(("option", "value", "gb"), [
    ("--mem", "16000", 16000 / 1024), ("--mem-mb", "16000", 16000 / 1024), ("--mem_mb", "2048", 2.0),
    ("--mem", "16G", 16.0), ("--mem", "16GB", 16.0), ("--mem-gb", "16", 16.0), ("--mem_gb", "0.5T", 512.0),
    ("--mem", "1T", 1024.0)])
def test_memory_in_mb_as_fmriprep_with_units_and_a_gb_option(tmp_path, option, value, gb):
    s = settings_from_args([str(tmp_path), str(tmp_path / "out"), "participant", option, value])
    assert s.mem_gb == pytest.approx(gb)


def test_implausible_memory_is_warned_about(tmp_path, capsys):
    settings_from_args([str(tmp_path), str(tmp_path / "out"), "participant", "--mem", "16"])  # 16 MB: GB meant?
    assert "too little" in capsys.readouterr().err
    settings_from_args([str(tmp_path), str(tmp_path / "out"), "participant", "--mem-gb", "16000"])
    assert "TB" in capsys.readouterr().err


def test_notrack_is_accepted(tmp_path):
    assert settings_from_args([str(tmp_path), str(tmp_path / "out"), "participant", "--notrack"]).notrack


@pytest.mark.parametrize("argv", [
    [], ["bids"], ["bids", "out", "subject"], ["bids", "out", "participant", "--config", "F"],
    ["bids", "out", "participant", "--nprocs", "0"], ["bids", "out", "participant", "--mem", "lots"],
    ["bids", "out", "participant", "--no-such-option"], ["bids", "out", "participant", "--mem", "-5"],
    ["bids", "out", "participant", "--mem", "8G", "--mem-gb", "8"],
])
def test_usage_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 64


def test_missing_bids_dir_exits_66(tmp_path):
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "participant"]) == 66


def test_help_and_version_do_not_import_heavy_packages():
    code = ("import sys\nfrom bids_postop.cli.run import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'tensorflow', 'nipype', 'nnunetv2', 'ants', 'bids') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert "bids_postop 0." in out.stdout


def test_boilerplate_writes_the_methods_with_citations(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    out = tmp_path / "out"
    assert main([str(tmp_path / "bids"), str(out), "participant", "--boilerplate", "--brain-method", "hdbet"]) == 0
    text = (out / "logs" / "CITATION.md").read_text()
    assert "Helland" in text and "nnU-Net" in text and "HD-BET" in text and "deepbet" not in text
    assert "below 0.175 ml" in text
    assert "folds averaged, with mirroring test-time augmentation)" in text
    assert text in capsys.readouterr().out
    fast = tmp_path / "out_fast"
    assert main([str(tmp_path / "bids"), str(fast), "participant", "--boilerplate", "--fast"]) == 0
    text = (fast / "logs" / "CITATION.md").read_text()
    assert ("only the model's first fold, without test-time augmentation, bfloat16 arithmetic on CPUs with "
            "bfloat16 instructions") in text.replace("\n", " ")


def test_clean_workdir_empties_only_a_work_dir_bids_postop_created(tmp_path):
    from conftest import make_bids

    root = make_bids(tmp_path / "bids", {"01": {"ses-postop/anat/sub-01_ses-postop_T1w.nii.gz": None}})
    out = root / "derivatives" / "bids_postop"
    args = [str(root), str(out), "participant", "--model", "demo", "--skip-bids-validation"]
    # a folder bids_postop did not create is never emptied
    foreign = tmp_path / "foreign"
    (foreign / "keep").mkdir(parents=True)
    (foreign / "notes.txt").write_text("x")
    assert main([*args, "-w", str(foreign), "--clean-workdir"]) == 64
    assert (foreign / "notes.txt").read_text() == "x" and (foreign / "keep").is_dir()
    # a work folder it created (marker) is emptied, and only what lies under it: a symlink is removed, not followed
    work = tmp_path / "work"
    assert main([*args, "-w", str(work)]) == 66  # sub-01 has no contrast T1w: nobody runs, the work dir exists
    assert (work / ".bids_postop_workdir.json").is_file()
    (work / "old_wf").mkdir()
    (work / "stale.txt").write_text("x")
    (work / "link").symlink_to(foreign, target_is_directory=True)
    assert main([*args, "-w", str(work), "--clean-workdir"]) == 66
    assert [p.name for p in work.iterdir()] == [".bids_postop_workdir.json"]
    assert (foreign / "notes.txt").read_text() == "x"
