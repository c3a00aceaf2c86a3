"""Checkpoint safety (issue 8): checkpoints that need pickle are refused unless ``--trust-checkpoint``; network and
trainer classes come only from the installed nnunetv2 / dynamic_network_architectures / torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_bids, write_nifti

from bids_postop.cli.run import main
from bids_postop.errors import EXIT_USAGE, ModelError
from bids_postop.segmentation import nnunet as N
from bids_postop.segmentation.models import DEMO_MODELS, read_card

FAST = dict(device="cpu", use_mirroring=False)


class Opaque:  # an arbitrary class in the pickle: weights-only loading must stop at it
    pass


@pytest.fixture
def full_checkpoint_model(tmp_path) -> Path:
    """The demo model A with its checkpoint saved as full nnU-Net checkpoints are: pickled objects besides weights."""
    import torch

    model = tmp_path / "A_full"
    shutil.copytree(DEMO_MODELS / "A", model)
    ckpt = model / "nnunet" / "fold_0" / "checkpoint_final.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["optimizer_state"] = {"lr": np.float64(0.01)}
    state["logging"] = Opaque()
    torch.save(state, ckpt)
    return model


@pytest.fixture
def t1ce(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (32, 32, 24)).astype(np.float32)
    data[10:16, 10:16, 8:12] += 300
    return write_nifti(tmp_path / "t1ce.nii.gz", data, np.diag([1.5, 1.5, 1.5, 1.0]))


def test_full_checkpoint_is_refused_with_the_file_reason_and_fixes(full_checkpoint_model, t1ce):
    card = read_card(full_checkpoint_model)
    ckpt = full_checkpoint_model / "nnunet" / "fold_0" / "checkpoint_final.pth"
    for call in (lambda: N.check_checkpoints(card),
                 lambda: N.predict_probability(card, [t1ce], options=N.NnUNetOptions(**FAST))):
        with pytest.raises(ModelError) as exc:
            call()
        message = str(exc.value)
        assert str(ckpt) in message and "pickled Python objects" in message
        assert "--trust-checkpoint" in message and "bids_postop.training.nnunet import strip_checkpoint" in message
    assert "Opaque" in str(pytest.raises(ModelError, N.check_checkpoints, card).value)


def test_full_checkpoint_loads_with_trust(full_checkpoint_model, t1ce):
    card = read_card(full_checkpoint_model)
    N.check_checkpoints(card, trust_checkpoint=True)
    trusted = N.predict_probability(card, [t1ce], options=N.NnUNetOptions(**FAST, trust_checkpoint=True))
    plain = N.predict_probability(read_card(DEMO_MODELS / "A"), [t1ce], options=N.NnUNetOptions(**FAST))
    np.testing.assert_allclose(trusted, plain, atol=1e-6)  # same weights, same probabilities


def test_stripped_checkpoint_is_accepted(full_checkpoint_model, tmp_path):
    from bids_postop.training.nnunet import strip_checkpoint

    ckpt = full_checkpoint_model / "nnunet" / "fold_0" / "checkpoint_final.pth"
    strip_checkpoint(ckpt, tmp_path / "stripped.pth")
    shutil.move(tmp_path / "stripped.pth", ckpt)
    N.check_checkpoints(read_card(full_checkpoint_model))  # no error


def test_cli_refuses_a_full_checkpoint_before_any_participant_runs(full_checkpoint_model, tmp_path):
    bids = make_bids(tmp_path / "bids", {"01": {"ses-postop/anat/sub-01_ses-postop_ce-gadolinium_T1w.nii.gz": None}})
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--model", str(full_checkpoint_model), "-w",
                 str(tmp_path / "work"), "--skip-bids-validation"])
    assert code == EXIT_USAGE
    log = next((out / "logs").glob("*.log")).read_text()
    assert "checkpoint_final.pth: refused" in log and "--trust-checkpoint" in log
    assert not (out / "sub-01").exists()


def _with_plans(tmp_path: Path, edit) -> Path:
    model = tmp_path / "A_plans"
    shutil.copytree(DEMO_MODELS / "A", model)
    plans_file = model / "nnunet" / "plans.json"
    plans = json.loads(plans_file.read_text())
    edit(plans["configurations"]["3d_fullres"]["architecture"])
    plans_file.write_text(json.dumps(plans))
    return model


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.update(network_class_name="os.system"), "network class 'os.system'"),
    (lambda a: a.update(network_class_name="evil_module.Net"), "network class 'evil_module.Net'"),
    (lambda a: a["arch_kwargs"].update(conv_op="subprocess.Popen"), "conv_op = 'subprocess.Popen'"),
])
def test_network_classes_come_only_from_installed_packages(tmp_path, t1ce, edit, match):
    card = read_card(_with_plans(tmp_path, edit))
    with pytest.raises(ModelError, match=match):
        N.predict_probability(card, [t1ce], options=N.NnUNetOptions(**FAST))


def test_a_network_package_shadowed_outside_site_packages_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "shadow" / "dynamic_network_architectures"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))
    import importlib

    importlib.invalidate_caches()
    saved = {k: v for k, v in __import__("sys").modules.items() if k.startswith("dynamic_network_architectures")}
    for k in saved:
        monkeypatch.delitem(__import__("sys").modules, k)
    assert not N._installed_origin("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                   N.NETWORK_PACKAGES)


def test_trainer_class_must_be_part_of_installed_nnunetv2(tmp_path, t1ce):
    import torch

    model = tmp_path / "A_trainer"
    shutil.copytree(DEMO_MODELS / "A", model)
    ckpt = model / "nnunet" / "fold_0" / "checkpoint_final.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["trainer_name"] = "MyTrainerInTheModelFolder"
    torch.save(state, ckpt)
    (model / "nnunet" / "MyTrainerInTheModelFolder.py").write_text("raise RuntimeError('never imported')\n")
    with pytest.raises(ModelError, match="trainer class 'MyTrainerInTheModelFolder' is not part of the installed"):
        N.predict_probability(read_card(model), [t1ce], options=N.NnUNetOptions(**FAST))
