"""Bad inputs through the CLI: a clear message naming the file, a documented exit code, no processing
of what cannot be used. Runs that stop before processing are fast; the end-to-end test covers a bad
participant next to good ones."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, make_bids, write_nifti

from bids_postop.bids.inputs import discover
from bids_postop.cli.run import main
from bids_postop.workflows.preflight import check_participant_inputs

CE = "ses-postop/anat/sub-{s}_ses-postop_ce-gadolinium_T1w.nii.gz"
T1 = "ses-postop/anat/sub-{s}_ses-postop_T1w.nii.gz"


def dataset(tmp_path, labels=("01",)):
    return make_bids(tmp_path / "bids", {s: {CE.format(s=s): None, T1.format(s=s): None} for s in labels},
                     shape=(40, 40, 36))


def card_only_model(folder: Path) -> Path:
    """A model card without weights: enough for runs that stop before segmentation."""
    import json

    from bids_postop.configurations import CONFIGURATIONS

    for config in ("A", "B"):
        (folder / config).mkdir(parents=True, exist_ok=True)
        (folder / config / "bids_postop_model.json").write_text(json.dumps({
            "name": f"cards-{config}", "architecture": "nnunet", "configuration": config,
            "channels": list(CONFIGURATIONS[config]), "threshold": 0.5}))
    return folder


def run(root: Path, *extra: str) -> int:
    model = [] if "--model" in extra else ["--model", str(card_only_model(root.parent / "model"))]
    return main([str(root), str(root / "derivatives" / "bids_postop"), "participant", "--skip-bids-validation",
                 "-w", str(root.parent / "work"), *model, *extra])


def log_text(root: Path) -> str:
    return "\n".join(p.read_text() for p in (root / "derivatives" / "bids_postop" / "logs").glob("*.log"))


def corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    elif how == "not-gzip":
        path.write_bytes(b"this is not a NIfTI file")
    elif how == "4d":
        write_nifti(path, np.stack([blob_image((40, 40, 36))] * 3, axis=-1))
    elif how == "nan":
        data = blob_image((40, 40, 36))
        data[5, 5, 5] = np.nan
        write_nifti(path, data)
    elif how == "inf":
        data = blob_image((40, 40, 36))
        data[5, 5, 5] = np.inf
        write_nifti(path, data)
    elif how == "constant":
        write_nifti(path, np.full((40, 40, 36), 7.0, np.float32))
    elif how == "tiny":
        write_nifti(path, blob_image((40, 40, 4)))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how, message", [
    ("truncated", "cannot"), ("not-gzip", "cannot read"), ("4d", "shape (40, 40, 36, 3)"), ("nan", "NaN"),
    ("inf", "NaN or infinite"), ("constant", "constant"), ("tiny", "fewer than"),
])
def test_unusable_contrast_t1w_skips_the_participant_with_the_file_named(tmp_path, how, message):
    root = dataset(tmp_path)
    bad = root / "sub-01" / CE.format(s="01")
    corrupt(bad, how)
    assert run(root) == 66  # nobody left to run
    text = log_text(root)
    assert bad.name in text and message in text
    assert "sub-01 skipped" in text


def test_bad_optional_input_falls_back_and_says_why(tmp_path):
    root = dataset(tmp_path)
    bad = root / "sub-01" / T1.format(s="01")
    corrupt(bad, "truncated")
    [inputs] = [check_participant_inputs(p) for p in discover(root, validate=False)]
    assert set(inputs.files) == {"postop_t1ce"}
    assert any(bad.name in n and "postop_t1 unusable" in n for n in inputs.notes)


def test_4d_singleton_is_accepted(tmp_path):
    root = dataset(tmp_path)
    write_nifti(root / "sub-01" / CE.format(s="01"), blob_image((40, 40, 36))[..., None])
    [inputs] = [check_participant_inputs(p) for p in discover(root, validate=False)]
    assert "postop_t1ce" in inputs.files and not inputs.notes


@pytest.mark.parametrize("mask, message", [
    (np.zeros((40, 40, 36)), "empty"),
    (np.random.default_rng(0).random((40, 40, 36)), "non-integer"),
    (np.ones((40, 40, 30)), "grid"),
])
def test_bad_preop_mask_is_dropped_with_a_note(tmp_path, mask, message):
    shape = (40, 40, 36)
    root = make_bids(tmp_path / "bids", {"01": {CE.format(s="01"): None,
                                                "ses-preop/anat/sub-01_ses-preop_ce-gadolinium_T1w.nii.gz": None}},
                     preop_masks={"01": "preop"}, shape=shape)
    mask_file = next((root / "derivatives" / "preop").rglob("*_mask.nii.gz"))
    write_nifti(mask_file, mask.astype(np.float32))
    [inputs] = [check_participant_inputs(p) for p in discover(root, derivatives={"preop": mask_file.parents[3]},
                                                               validate=False)]
    assert "preop_mask" not in inputs.files
    assert any(message in n and mask_file.name in n for n in inputs.notes), inputs.notes


def test_symlinked_inputs_are_followed(tmp_path):
    root = dataset(tmp_path)
    ce = root / "sub-01" / CE.format(s="01")
    store = tmp_path / "store.nii.gz"
    ce.rename(store)
    os.symlink(store, ce)
    [inputs] = [check_participant_inputs(p) for p in discover(root, validate=False)]
    assert inputs.files["postop_t1ce"].name == ce.name and not inputs.notes


def test_non_bids_directory_and_unknown_participant(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "scan.nii.gz").write_bytes(gzip.compress(b"x"))
    assert main([str(tmp_path / "plain"), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                 "--model", "demo", "-w", str(tmp_path / "work")]) == 66
    root = dataset(tmp_path)
    assert run(root, "--participant-label", "99") == 66
    assert "sub-99" in log_text(root)


def test_output_dir_inside_bids_dir_or_equal_is_refused(tmp_path):
    root = dataset(tmp_path)
    assert main([str(root), str(root), "participant"]) == 73
    assert main([str(root), str(root / "results"), "participant"]) == 73
    assert not (root / "results").exists(), "nothing may be written into the input dataset"


def test_unknown_model_is_a_usage_error(tmp_path):
    root = dataset(tmp_path)
    assert run(root, "--model", str(tmp_path / "no_model")) == 64
    assert "model folder not found" in log_text(root)


def test_unwritable_output_dir_exits_73_even_as_root(tmp_path, capsys):
    # /proc refuses new folders to every user, root included (CI runs as root: mode bits would not do)
    root = dataset(tmp_path)
    assert main([str(root), "/proc/bids_postop_out", "participant", "--skip-bids-validation", "--model", "demo",
                 "-w", str(tmp_path / "work")]) == 73
    assert "cannot write to the output directory" in capsys.readouterr().err
