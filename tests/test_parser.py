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
    assert s.config == "B" and s.nprocs == 2 and s.omp_nthreads == 2 and s.mem_gb == 8.0
    assert s.postop_session == "postop" and s.preop_session == "preop" and s.verbosity == 2
    assert s.model == "demo" and s.work_dir == tmp_path / "w"


@pytest.mark.parametrize("argv", [
    [], ["bids"], ["bids", "out", "subject"], ["bids", "out", "participant", "--config", "F"],
    ["bids", "out", "participant", "--nprocs", "0"], ["bids", "out", "participant", "--mem", "lots"],
    ["bids", "out", "participant", "--no-such-option"],
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


def test_clean_workdir_empties_it_and_refuses_dangerous_folders(tmp_path):
    from conftest import make_bids

    root = make_bids(tmp_path / "bids", {"01": {"ses-postop/anat/sub-01_ses-postop_T1w.nii.gz": None}})
    work = tmp_path / "work"
    (work / "old_wf").mkdir(parents=True)
    (work / "stale.txt").write_text("x")
    out = root / "derivatives" / "bids_postop"
    # sub-01 has no contrast T1w: nobody runs (66), but the work dir was emptied first
    assert main([str(root), str(out), "participant", "-w", str(work), "--clean-workdir",
                 "--skip-bids-validation"]) == 66
    assert work.is_dir() and not any(work.iterdir())
    assert main([str(root), str(out), "participant", "-w", str(root), "--clean-workdir",
                 "--skip-bids-validation"]) == 64
    assert (root / "dataset_description.json").exists()
