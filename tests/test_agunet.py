"""AGU-Net: architecture, augmentation, export to the Raidionics ONNX format (checked against TensorFlow),
resumable training in the worker process, and ``bids_postop-train --architecture agunet`` end to end.

TensorFlow never runs in the pytest process (it must not share one with torch's triton): every TensorFlow
step runs in a subprocess, as in production.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import THREE_SITES, affine_for, read_tsv

from bids_postop.agunet.architecture import TINY_SPEC, NetworkSpec, adapt_weights
from bids_postop.agunet.augment import Augmentation, augment
from bids_postop.agunet.export import preprocessing_ini_text, write_preprocessing_ini
from bids_postop.segmentation import raidionics as R
from bids_postop.segmentation import raidionics_model as RM

# find_spec, not importorskip: TensorFlow must not be imported into this process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="AGU-Net tests need the agunet extra (pip install bids_postop[agunet])")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _python(code: str, *, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (TensorFlow's own process); fail with its output if it fails."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _worker(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bids_postop.agunet.worker", *argv], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------
# no TensorFlow needed


def test_importing_the_package_and_the_commands_does_not_import_tensorflow():
    proc = _python("""
        import sys
        import bids_postop.agunet, bids_postop.agunet.export, bids_postop.agunet.architecture
        import bids_postop.agunet.training, bids_postop.agunet.data, bids_postop.agunet.worker
        import bids_postop.training.agunet, bids_postop.cli.train, bids_postop.cli.run
        print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'tf2onnx'}))
    """)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(("extra", "message"), [
    (["--init-model", "missing.keras"], "--init-model"),  # nnunet (default) does not take it
    (["--architecture", "agunet", "--init-model", "missing.keras"], "file not found"),
    (["--architecture", "agunet", "--batch-size", "4", "--effective-batch-size", "2"], "smaller than"),
])
def test_train_refuses_bad_agunet_options_before_doing_anything(tmp_path, capsys, extra, message):
    from bids_postop.cli.train import main as train_main

    (tmp_path / "manual").mkdir()
    code = train_main([str(tmp_path / "bids"), str(tmp_path / "work"), "--manual", f"manual={tmp_path / 'manual'}",
                       *extra])
    assert code == 64 and message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("shape", "filters", "ok"), [
    ((128, 128, 144), (16, 32, 128, 256, 256), True),
    ((32, 32, 32), (4, 8, 8, 8, 8), True),
    ((32, 32, 36), (4, 8, 8, 8, 8), False),  # 36 is not a multiple of 2**4
    ((32, 32), (4, 8), False),
    ((32, 32, 32), (4,), False),
])
def test_network_spec_checks_shapes(shape, filters, ok):
    if ok:
        spec = NetworkSpec(shape=shape, filters=filters)
        assert NetworkSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    else:
        with pytest.raises(ValueError):
            NetworkSpec(shape=shape, filters=filters)


def test_ini_is_what_the_raidionics_backend_reads(tmp_path):
    spec = NetworkSpec(shape=(128, 128, 144), n_inputs=3)
    config = RM.read_preprocessing_ini(write_preprocessing_ini(tmp_path, spec, threshold=0.4))
    assert config.output_spacing == (1.0, 1.0, 1.0) and config.background_cropping == "brain_clip"
    assert config.normalization_method == "zeromean" and config.new_axial_size == (128, 128, 144)
    assert config.mode == "full" and config.number_inputs == 3 and config.channels_order == "channels_last"
    assert config.nb_classes == 2 and config.activation_layer_included and config.foreground_class == 1
    assert RM.class_threshold(config) == 0.4
    assert "optimal_thresholds" not in preprocessing_ini_text(spec)


def test_adapt_weights_keeps_the_first_channel_and_fills_new_ones_with_the_mean():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(3, 3, 3, 1, 4)), rng.normal(size=4)
    new = adapt_weights([kernel, bias], [(3, 3, 3, 3, 4), (4,)])
    assert new is not None and new[0].shape == (3, 3, 3, 3, 4)
    assert np.array_equal(new[0][..., 0, :], kernel[..., 0, :]) and np.array_equal(new[1], bias)
    assert np.allclose(new[0][..., 2, :], kernel.mean(axis=-2))
    two = rng.normal(size=(3, 3, 3, 2, 4))
    assert np.array_equal(adapt_weights([two], [(3, 3, 3, 1, 4)])[0][..., 0, :], two[..., 0, :])
    assert adapt_weights([kernel], [(3, 3, 3, 1, 8)]) is None  # output channels differ: not adaptable


def test_augmentation_keeps_shapes_and_label_range_and_is_identity_with_p0():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(24, 20, 16, 2)).astype(np.float32)
    label = np.zeros((24, 20, 16), np.float32)
    label[8:14, 6:12, 5:10] = 1
    same = augment(image, label, rng, Augmentation(probability=0.0))
    assert np.array_equal(same[0], image) and np.array_equal(same[1], label)
    changed = 0
    for _ in range(6):
        out_image, out_label = augment(image, label, rng, Augmentation(probability=1.0))
        assert out_image.shape == image.shape and out_label.shape == label.shape
        assert out_label.min() >= 0 and out_label.max() <= 1 and out_label.sum() > 0.5 * label.sum()
        changed += not np.allclose(out_label, label)
    assert changed == 6


def test_augmentation_flips_horizontally_and_vertically_never_superior_inferior_and_rotates_axially():
    """The paper: horizontal and vertical flips, rotations in [-20, 20] degrees, translation <= 10 %, each p = 0.5.
    Arrays are RAS+ (x left-right, y posterior-anterior, z inferior-superior)."""
    rng = np.random.default_rng(3)
    image = rng.normal(size=(12, 10, 8, 1)).astype(np.float32)
    label = np.zeros((12, 10, 8), np.float32)
    label[2:5, 1:4, 1:3] = 1  # an off-centre box: every flip is visible
    no_motion = Augmentation(probability=1.0, max_rotation_deg=0.0, max_translation=0.0)
    out_image, out_label = augment(image, label, rng, no_motion)
    np.testing.assert_allclose(out_label, label[::-1, ::-1, :], atol=1e-6)  # both flips, z untouched
    np.testing.assert_allclose(out_image, image[::-1, ::-1, :, :], atol=1e-5)
    seen = {"x": 0, "y": 0, "z": 0}
    for _ in range(400):
        _, out = augment(image, label, rng, Augmentation(probability=0.5, max_rotation_deg=0.0, max_translation=0.0))
        where = np.argwhere(out > 0.5)
        seen["x"] += where[:, 0].min() > 5
        seen["y"] += where[:, 1].min() > 4
        seen["z"] += where[:, 2].min() > 3
    assert 150 < seen["x"] < 250 and 150 < seen["y"] < 250 and seen["z"] == 0
    # rotation in the axial plane: every axial slice keeps its amount of tumour
    blob = np.zeros((24, 24, 12), np.float32)
    blob[8:16, 9:15, 2:5] = 1
    blob[10:14, 10:14, 7:10] = 1
    for _ in range(5):
        _, rotated = augment(np.zeros((*blob.shape, 1), np.float32), blob, rng,
                             Augmentation(probability=1.0, max_rotation_deg=20.0, max_translation=0.0))
        np.testing.assert_allclose(rotated.sum(axis=(0, 1)), blob.sum(axis=(0, 1)), rtol=0.1, atol=0.5)


# ------------------------------------------------------------------------------------------------
# export: TensorFlow (subprocess) against onnxruntime through our Raidionics backend


def _scan(tmp_path):
    """Two channels on an oblique LPS 1.3 × 1.1 × 2 mm grid, skull-stripped (zero outside an ellipsoid)."""
    shape = (40, 44, 20)
    affine = affine_for("LPS", (1.3, 1.1, 2.0), oblique_deg=12)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    rng = np.random.default_rng(3)
    files = []
    for c in range(2):
        data = np.where(brain, 200 + 40 * c + rng.normal(0, 20, shape), 0).astype(np.float32)
        data[18:24, 20:26, 8:12] += 150
        files.append(tmp_path / f"channel{c}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), files[-1])
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), tmp_path / "brain.nii.gz")
    return files, tmp_path / "brain.nii.gz", affine, brain


def test_exported_onnx_matches_tensorflow_through_the_raidionics_backend(tmp_path):
    from bids_postop.segmentation.backend import predict_probability
    from bids_postop.segmentation.models import resolve_models

    spec = NetworkSpec(shape=(32, 32, 32), n_inputs=2, filters=(4, 8, 8, 8, 8))
    files, brain_file, affine, brain = _scan(tmp_path)
    config = RM.read_preprocessing_ini(write_preprocessing_ini(tmp_path / "ini", spec))
    arrays = [nib.load(f).get_fdata(dtype=np.float32) for f in files]
    # the affine as the file stores it (float32) and the backend reads it: the box edges fall on the resampled grid's
    # edges, where 1e-6 mm decides between a value and 0 (as in raidionicsseg)
    prepared = R.preprocess(arrays, nib.load(files[0]).affine, config, brain_mask=brain)
    assert prepared.data.shape == (32, 32, 32, 2)
    np.save(tmp_path / "input.npy", prepared.data)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_json()))

    start = time.monotonic()
    _python(f"""
        import json, keras, numpy as np
        from pathlib import Path
        from bids_postop.agunet.architecture import NetworkSpec, build_agunet
        from bids_postop.agunet.export import export_package, inference_model
        tmp = Path({str(tmp_path)!r})
        spec = NetworkSpec.from_json(json.loads((tmp / "spec.json").read_text()))
        models = []
        for seed in (1, 2):
            keras.utils.set_random_seed(seed)
            model = build_agunet(spec)
            rng = np.random.default_rng(seed)  # batch-norm statistics that matter
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    g, b, m, v = layer.get_weights()
                    layer.set_weights([g * rng.uniform(0.5, 2, g.shape), rng.normal(0, .2, b.shape),
                                       rng.normal(0, .2, m.shape), rng.uniform(.5, 2, v.shape)])
            models.append(model)
            x = np.load(tmp / "input.npy")[None]
            np.save(tmp / f"tf{{seed}}.npy", np.asarray(inference_model(model)(x, training=False))[0])
        export_package(models[0], tmp / "package", configuration="B", threshold=0.4, folds=models)
    """)
    tf_seconds = time.monotonic() - start
    tf1, tf2 = np.load(tmp_path / "tf1.npy"), np.load(tmp_path / "tf2.npy")
    assert tf1.shape == (32, 32, 32, 2) and np.allclose(tf1.sum(-1), 1, atol=1e-5)
    assert np.abs(tf1 - tf2).max() > 1e-2  # two different networks: averaging is visible

    package = tmp_path / "package"
    assert [p.parent.name for p in RM.model_files(package)] == ["fold_0", "fold_1"]
    single = R.run_folds([package / "fold_0" / "model.onnx"], prepared.data, config)
    diff_single = float(np.abs(single - tf1).max())
    averaged = R.run_folds(RM.model_files(package), prepared.data, RM.read_preprocessing_ini(package))
    diff_folds = float(np.abs(averaged - (tf1 + tf2) / 2).max())
    print(f"max |ONNX - TF|: single {diff_single:.2e}, 2 folds {diff_folds:.2e}; TF process {tf_seconds:.1f} s")
    assert diff_single < 1e-4 and diff_folds < 1e-4

    # the participant level's path: model card → backend → probability on the first channel's grid
    (card,) = resolve_models(package)
    assert (card.architecture, card.configuration, card.threshold) == ("raidionics", "B", 0.4)
    probability = predict_probability(card, files, brain_mask=brain_file)
    assert probability.shape == arrays[0].shape
    expected = R.to_reference_grid(((tf1 + tf2) / 2)[..., 1], prepared)
    assert np.abs(probability - expected).max() < 1e-4


# ------------------------------------------------------------------------------------------------
# training worker: resume and initialisation from another model


def _events(stdout: str) -> list[dict]:
    from bids_postop.agunet.training import PROGRESS_PREFIX

    return [json.loads(line[len(PROGRESS_PREFIX):]) for line in stdout.splitlines() if line.startswith(PROGRESS_PREFIX)]


@pytest.mark.slow
def test_worker_trains_resumes_and_starts_from_a_one_channel_model(tmp_path):
    from bids_postop.agunet.training import FoldJob

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        x = rng.normal(size=(32, 32, 32, 2)).astype(np.float32)
        y = np.zeros((32, 32, 32), np.float32)
        y[10:18, 12:20, 8 + i:16 + i] = 1
        x[..., 0] += 2 * y
        np.save(data / f"sub-{i}_input.npy", x)
        np.save(data / f"sub-{i}_label.npy", y)
    (tmp_path / "spec1.json").write_text(json.dumps(NetworkSpec(TINY_SPEC.shape, 1, TINY_SPEC.filters).to_json()))
    _worker("build", str(tmp_path / "spec1.json"), str(tmp_path / "one.keras"))
    spec = NetworkSpec(shape=TINY_SPEC.shape, n_inputs=2, filters=TINY_SPEC.filters)
    job = FoldJob(spec=spec, data_dir=str(data), train=("sub-0", "sub-1"), val=("sub-2",),
                  fold_dir=str(tmp_path / "fold"), max_epochs=1, effective_batch_size=2,
                  init_model=str(tmp_path / "one.keras"))
    (tmp_path / "job.json").write_text(json.dumps(job.to_json()))
    start = time.monotonic()
    first = _events(_worker("train", str(tmp_path / "job.json")).stdout)
    seconds = time.monotonic() - start
    assert [e["event"] for e in first] == ["epoch", "done"]
    state = json.loads((tmp_path / "fold" / "state.json").read_text())
    adapted = state["init_model"]["adapted"]
    assert "enc0_1_conv" in adapted and "msi1_conv" in adapted and not state["init_model"]["missing"]

    # more epochs allowed: the fold resumes from its checkpoint (epoch 1) instead of starting over
    (tmp_path / "job.json").write_text(json.dumps({**job.to_json(), "max_epochs": 2}))
    second = _events(_worker("train", str(tmp_path / "job.json"), "--onnx", str(tmp_path / "fold" / "m.onnx")).stdout)
    assert [e["event"] for e in second] == ["resumed", "epoch", "done", "exported"]
    assert second[0]["epoch"] == 1 and second[1]["epoch"] == 2
    history = json.loads((tmp_path / "fold" / "state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    print(f"tiny AGU-Net: first worker run (1 epoch, 2 cases, start-up included) {seconds:.1f} s; "
          f"epoch seconds {[h['seconds'] for h in history]}")
    assert (tmp_path / "fold" / "m.onnx").is_file()


# ------------------------------------------------------------------------------------------------
# bids_postop-train --architecture agunet end to end



@pytest.fixture(scope="session")
def protocol(tmp_path_factory):
    import trained_protocol

    return trained_protocol.trained(tmp_path_factory)


@pytest.mark.slow
def test_train_tiny_agunet_end_to_end(protocol):
    from bids_postop.cli.train import main as train_main
    from bids_postop.segmentation.models import read_card, resolve_models

    bids, work, argv = protocol["bids"], protocol["work"], protocol["argv"]["agunet"]
    assert protocol["codes"]["agunet"] == 0
    train_seconds = protocol["seconds"]["agunet"]

    splits = read_tsv(work / "splits.tsv")
    folds_of_site: dict[str, set[str]] = {}
    for r in splits:
        folds_of_site.setdefault(r["site"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_site.values())
    assert folds_of_site["east"] == {"test"}
    assert sorted(folds_of_site["north"] | folds_of_site["south"]) == ["0", "1"]
    for fold in (0, 1):
        job = json.loads((work / "agunet" / "A" / f"fold_{fold}" / "job.json").read_text())
        assert not {"sub-05", "sub-06"} & set(job["train"] + job["val"])
        assert not set(job["train"]) & set(job["val"]) and len(job["val"]) == 2
        sites = {THREE_SITES[p] for p in job["val"]}
        assert len(sites) == 1 and not sites & {THREE_SITES[p] for p in job["train"]}

    model = work / "agunet" / "models" / "A"
    card = read_card(model)
    assert card.architecture == "raidionics" and card.configuration == "A" and 0 < card.threshold < 1
    raw = json.loads((model / "bids_postop_model.json").read_text())
    name = json.loads((bids / "dataset_description.json").read_text())["Name"]
    assert raw["training"]["dataset_name"] == name and f"on {name!r}" in raw["description"]
    assert raw["threshold_selection"]["rule"] == "dice_f1" and len(raw["threshold_selection"]["table"]) == 9
    # the review section: per-fold thresholds; no mirror-score threshold (AGU-Net runs no test-time mirroring)
    review = raw["uncertainty"]
    assert set(review["members"]) == {"fold_0", "fold_1"} and review["score_threshold"] is None
    assert "without a mirror score" in review["score_threshold_selection"]["how"]
    assert [p.parent.name for p in RM.model_files(model)] == ["fold_0", "fold_1"]
    assert [c.folder for c in resolve_models(model)] == [model]
    log = "\n".join(p.read_text() for p in (work / "logs").glob("*.log"))
    assert "ETA fold" in log and "s/epoch" in log

    # the predictions dataset, beside the AGU-Net models (an nnU-Net model of the same configuration trained in
    # this WORK_DIR writes WORK_DIR/predictions/A): every validation participant by its own fold's network, the
    # test site by the fold ensemble, masks on each participant's post-op T1w-CE grid, the group level's metrics
    out = work / "agunet" / "predictions" / "A"
    assert (work / "predictions" / "A").is_dir() and out != work / "predictions" / "A"
    fold_of = {r["participant_id"]: r["fold"] for r in splits}
    for sub in ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06"):
        t1ce = next((bids / sub / "ses-postop" / "anat").glob("*_ce-*_T1w.nii.gz"))
        (mask,) = (out / sub / "ses-postop" / "anat").glob("*_label-tumor_desc-*_mask.nii.gz")
        ref, got = nib.load(t1ce), nib.load(mask)
        assert got.shape == ref.shape and np.array_equal(got.affine, ref.affine)
        (measures,) = (out / sub / "ses-postop").glob("*_measures.json")
        data = json.loads(measures.read_text())
        assert data["model"]["name"] == card.name and data["model"]["architecture"] == "raidionics"
        cv = data["provenance"].get("cross_validation")
        assert (cv is None) if fold_of[sub] == "test" else (str(cv["fold"]) == fold_of[sub]), sub
    assert {"sub-05", "sub-06"} <= {r["participant_id"] for r in read_tsv(out / "group" / "patients.tsv")}

    # a rerun resumes: finished folds are skipped, the model and its cross-validation predictions are reused
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*_measures.json"))
    assert train_main([*argv, "--no-test-scoring", "--no-paper-tables"]) == 0
    newest = max((work / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "already trained" in newest and "reused" in newest
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*_measures.json")) == before
    print(f"bids_postop-train --architecture agunet (tiny, 2 configurations, 2 folds, data preparation cached): "
          f"{train_seconds:.0f} s")
