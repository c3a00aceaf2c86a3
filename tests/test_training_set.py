"""The simulated BIDS training set (``bids_postop-demo --training-set``): sites, masks, and a layout that
``bids_postop-train``'s discovery, manual-mask lookup and hospital folds accept. Fast: no training."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from bids_postop.bids.inputs import discover
from bids_postop.cli.demo import main as demo_main
from bids_postop.configurations import ROLES
from bids_postop.demo.training_set import MIN_SEED, TRAINING_SITES, write_training_dataset
from bids_postop.training.datasets import find_manual_mask, load_label
from bids_postop.training.splits import make_splits


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_set")
    data = write_training_dataset(root, n_participants=3, n_sites=3, seed=MIN_SEED)
    return root, data


def test_sites_and_participants_tsv(training_set):
    root, data = training_set
    with (root / "participants.tsv").open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-02", "sub-03"]
    assert [r["site"] for r in rows] == list(TRAINING_SITES)[:3] == ["north", "south", "east"]
    assert data.sites == ("east", "north", "south")


def test_discovery_manual_masks_and_folds(training_set):
    """What bids_postop-train does first: discover (all five roles), find the manual masks on the post-op
    T1w-CE grid, deal the sites into hospital folds."""
    root, data = training_set
    found = discover(root, derivatives={"preop": root / "derivatives" / "preop_masks"}, validate=False)
    assert [p.participant_id for p in found] == ["sub-01", "sub-02", "sub-03"]
    for p, demo in zip(found, data.participants, strict=True):
        assert set(p.files) == set(ROLES), p.participant_id
        assert p.site == demo.site
        mask = find_manual_mask(root / "derivatives" / "manual", p.subject, p.postop_session)
        assert mask is not None and mask.name == f"{p.participant_id}_ses-postop_label-tumor_mask.nii.gz"
        truth = load_label(mask, p.files["postop_t1ce"])  # raises unless on the post-op T1w-CE grid
        assert truth.any() == demo.residual
        brain = nib.load(mask.with_name(mask.name.replace("label-tumor", "label-brain"))).get_fdata() > 0
        assert not (truth & ~brain).any(), "residual tumour outside the brain"
        # the site's geometry (orientation and spacing)
        site = TRAINING_SITES[p.site]
        img = nib.load(p.files["postop_t1ce"])
        assert "".join(nib.aff2axcodes(img.affine)) == site.axcodes
        assert np.allclose(img.header.get_zooms()[:3], site.spacing, atol=1e-3)
    plan = make_splits({p.participant_id: p.site for p in found}, n_folds=3)
    assert sorted(plan.fold_sizes) == [1, 1, 1]


def test_seeds_disjoint_from_the_demo_and_arguments_checked(tmp_path):
    with pytest.raises(ValueError, match="seeds must be >= 1000"):
        write_training_dataset(tmp_path, seed=0)
    with pytest.raises(ValueError, match="n_sites 1"):
        write_training_dataset(tmp_path, n_sites=1)
    with pytest.raises(ValueError, match="at least one participant per site"):
        write_training_dataset(tmp_path, n_participants=2, n_sites=3)
    assert not list(tmp_path.iterdir()), "nothing written for refused arguments"


def test_cli_training_set(tmp_path, capsys):
    assert demo_main([str(tmp_path / "ts"), "--training-set", "--participants", "2", "--sites", "2",
                      "--seed", "1001"]) == 0
    assert "bids_postop-train" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ts").glob("sub-*")) == ["sub-01", "sub-02"]
    assert (tmp_path / "ts" / "derivatives" / "manual" / "dataset_description.json").is_file()
    with pytest.raises(SystemExit) as exc:
        demo_main([str(tmp_path / "bad"), "--training-set", "--seed", "5"])
    assert exc.value.code == 2
