"""The group level's paper tables and statistics on a synthetic three-hospital cohort of four models (two
architectures × two configurations, known only from their model cards), against an independent recomputation
(tests/paper_reference.py: numpy, scipy, statsmodels, MedPy) from the written derivatives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paper_reference as ref
import pytest
from conftest import write_nifti
from scipy import stats

from bids_postop.group import run_group_level

SHAPE = (16, 16, 10)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 mm³ voxels: 0.175 ml = 87.5 voxels
SITES = {"north": "0", "south": "1", "east": "test"}
N_BOOT = 400
# model name → (card architecture, configuration, dataset, quality: probability of finding the tumour)
MODELS = {"nnA": ("nnunet", "A", "nn_a", 0.6), "nnB": ("nnunet", "B", "nn_b", 0.9),
          "agA": ("raidionics", "A", "agu", 0.5), "agB": ("raidionics", "B", "agu", 0.8)}
NO_T1W = {"sub-27", "sub-28", "sub-29"}  # test participants without a T1w: configuration B cannot run


def _participants() -> dict[str, str]:
    sites = ["north"] * 9 + ["south"] * 9 + ["east"] * 12
    return {f"sub-{i + 1:02d}": s for i, s in enumerate(sites)}


def _truth(rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    if rng.random() < 0.25:  # GTR (a small remnant below the cut-off, or nothing)
        if rng.random() < 0.5:
            mask[3:6, 3:6, 2:5] = 1  # 27 voxels = 0.054 ml
        return mask
    x, y, z = rng.integers(1, 6), rng.integers(1, 6), rng.integers(1, 4)
    mask[x:x + rng.integers(6, 9), y:y + rng.integers(6, 9), z:z + rng.integers(3, 6)] = 1  # >= 0.216 ml
    return mask


def _prediction(truth: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    pred = np.zeros_like(truth)
    if truth.any() and rng.random() < quality:
        pred = np.roll(truth, int(rng.integers(0, 3)), axis=int(rng.integers(0, 2)))
        if rng.random() < 0.5:
            pred[tuple(np.argwhere(pred)[0])] = 0
    if rng.random() < (1 - quality) / 2:  # a false positive blob
        pred[10:15, 10:15, 6:10] = 1
    return pred


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    rng = np.random.default_rng(11)
    participants = _participants()
    bids = tmp / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tsite\n" + "".join(f"{p}\t{s}\n"
                                                                               for p, s in participants.items()))
    (tmp / "splits.tsv").write_text("participant_id\tsite\tfold\n" + "".join(
        f"{p}\t{s}\t{SITES[s]}\n" for p, s in participants.items()))
    manual = tmp / "manual"
    (manual / "dataset_description.json").parent.mkdir(parents=True)
    (manual / "dataset_description.json").write_text(json.dumps({"Name": "m", "BIDSVersion": "1.10.0",
                                                                 "DatasetType": "derivative"}))
    truths = {p: _truth(rng) for p in participants}
    for p, mask in truths.items():
        write_nifti(manual / p / "ses-postop" / "anat" / f"{p}_ses-postop_label-tumor_mask.nii.gz", mask, AFFINE)
        # a second rater, for the inter-rater study
        write_nifti(manual / p / "ses-postop" / "anat" / f"{p}_ses-postop_label-tumor_desc-r2_mask.nii.gz",
                    np.roll(mask, 1, axis=2), AFFINE)
    datasets: dict[str, Path] = {}
    for name, (arch, config, dataset, quality) in MODELS.items():
        root = datasets.setdefault(dataset, tmp / dataset)
        for p, site in participants.items():
            if config == "B" and p in NO_T1W:
                continue
            session = root / p / "ses-postop"
            mask = session / "anat" / f"{p}_ses-postop_ce-gd_label-tumor_desc-{name}_mask.nii.gz"
            write_nifti(mask, _prediction(truths[p], quality, rng), AFFINE)
            cv = {"cross_validation": {"set": "validation", "fold": int(SITES[site])}} if SITES[site] != "test" else {}
            (session / f"{p}_ses-postop_desc-{name}_measures.tsv").write_text(
                f"participant_id\tsession_id\tsite\tconfig\tmodel\tgtr_cutoff_ml\tgtr_inclusive\n"
                f"{p}\tses-postop\t{site}\t{config}\t{name}\t0.175\tfalse\n")
            (session / f"{p}_ses-postop_desc-{name}_measures.json").write_text(json.dumps({
                "participant_id": p, "session_id": "ses-postop",
                "model": {"name": name, "architecture": arch, "configuration": config, "threshold": 0.5},
                "measures": {"gtr_cutoff_ml": 0.175, "gtr_rule": "GTR if residual < 0.175 ml",
                             "min_component_voxels": 20},
                "outputs": {"residual_mask": mask.relative_to(root).as_posix()}, "provenance": cv}))
    out = tmp / "validation"
    run_group_level(out, bids_dir=bids, manual={"manual": manual}, folds_tsv=tmp / "splits.tsv",
                    compare=datasets, n_bootstrap=N_BOOT, seed=3)
    scored = ref.collect(datasets, manual, {p: SITES[s] for p, s in participants.items()})
    return {"out": out, "scored": scored, "datasets": datasets}


def test_paper_tables_equal_an_independent_recomputation(cohort):
    expected = ref.tables(cohort["scored"], n_resamples=N_BOOT, seed=3)
    seg = {(r["architecture"], r["configuration"], r["model"]): r
           for r in ref.read_tsv(cohort["out"] / "group" / "paper_segmentation.tsv")}
    cls = {(r["architecture"], r["configuration"], r["model"]): r
           for r in ref.read_tsv(cohort["out"] / "group" / "paper_classification.tsv")}
    assert set(seg) == set(cls) == set(expected) == {("nnU-Net", "A", "nnA"), ("nnU-Net", "B", "nnB"),
                                                     ("AGU-Net", "A", "agA"), ("AGU-Net", "B", "agB")}
    checked = 0
    for key, values in expected.items():
        got = {**seg[key], **cls[key]}
        assert int(got["validation_n"]) == values["validation_n"] == 18
        assert int(got["test_n"]) == values["test_n"] == (9 if key[1] == "B" else 12)
        for column, value in values.items():
            if column.endswith("_n"):
                continue
            cell = ref.num(got[column])
            if value is None:
                assert cell is None, (key, column, got[column])
            else:
                assert cell == pytest.approx(value, rel=1e-6, abs=1e-9), (key, column)
                checked += 1
    assert checked > 150
    # the AGU-Net models came from one dataset holding both: each is its own source
    assert seg[("AGU-Net", "A", "agA")]["sources"] == "agu:agA"


def test_tukey_per_architecture_on_common_test_patients(cohort):
    tests = ref.read_tsv(cohort["out"] / "group" / "tests.tsv")
    for arch in ("nnU-Net", "AGU-Net"):
        (tukey,) = [t for t in tests if t["test"] == "Tukey HSD" and t["compares"] == f"configurations of {arch}"
                    and t["metric"].startswith("Dice-P") and t["group_b"] != "*"]
        expected = ref.tukey_per_architecture(cohort["scored"], arch)
        assert ref.num(tukey["p_value"]) == pytest.approx(expected[frozenset((tukey["group_a"], tukey["group_b"]))],
                                                          abs=1e-3)
        n_common = len({r["pid"] for r in cohort["scored"][(arch, "B", "nnB" if arch == "nnU-Net" else "agB")]["test"]
                        if r["in_P"]})
        assert int(tukey["n_a"]) == int(tukey["n_b"]) == n_common  # B lacks three test patients: A is cut to match
        assert tukey["scope"].startswith("test set") and tukey["origin"] == "paper"
    assert not [t for t in tests if t["test"] == "Tukey HSD" and "nnU-Net" in t["group_a"] and "AGU-Net" in
                t["group_b"]]  # configurations are never pooled across architectures


def test_architecture_test_compares_the_best_configurations(cohort):
    tests = ref.read_tsv(cohort["out"] / "group" / "tests.tsv")
    seg = ref.read_tsv(cohort["out"] / "group" / "paper_segmentation.tsv")
    best = {}
    for arch in ("nnU-Net", "AGU-Net"):
        rows = [r for r in seg if r["architecture"] == arch]
        best[arch] = max(rows, key=lambda r: float(r["dice_P_validation_mean"]))
    (mw,) = [t for t in tests if t["test"] == "Mann-Whitney U (two-sided)"
             and t["compares"] == "best configurations of the architectures"]
    labels = {f"{r['architecture']} {r['configuration']} ({r['model']})": r for r in best.values()}
    assert {mw["group_a"], mw["group_b"]} == set(labels)
    scored = cohort["scored"]
    key = {f"{k[0]} {k[1]} ({k[2]})": k for k in scored}
    a = {r["pid"]: r["dice"] for r in scored[key[mw["group_a"]]]["test"] if r["in_P"]}
    b = {r["pid"]: r["dice"] for r in scored[key[mw["group_b"]]]["test"] if r["in_P"]}
    common = sorted(set(a) & set(b))
    expected = stats.mannwhitneyu([a[p] for p in common], [b[p] for p in common], alternative="two-sided")
    assert ref.num(mw["p_value"]) == pytest.approx(expected.pvalue)
    assert ref.num(mw["statistic"]) == pytest.approx(expected.statistic)
    (wilcoxon,) = [t for t in tests if t["test"].startswith("Wilcoxon") and t["compares"].startswith("best")]
    assert wilcoxon["origin"].startswith("addition")
    assert ref.num(wilcoxon["p_value"]) == pytest.approx(stats.wilcoxon([a[p] for p in common],
                                                                        [b[p] for p in common]).pvalue)


def test_bca_overlap_is_reported_for_the_classification_scores(cohort):
    tests = ref.read_tsv(cohort["out"] / "group" / "tests.tsv")
    cls = {f"{r['architecture']} {r['configuration']} ({r['model']})": r
           for r in ref.read_tsv(cohort["out"] / "group" / "paper_classification.tsv")}
    overlaps = [t for t in tests if t["test"] == "BCa 95 % interval overlap"]
    assert {t["metric"] for t in overlaps} == {"recall", "precision", "specificity", "balanced_accuracy"}
    assert {t["compares"] for t in overlaps} == {"configurations of nnU-Net", "configurations of AGU-Net",
                                                 "best configurations of the architectures"}
    decided = 0
    for t in overlaps:
        a, b = cls[t["group_a"]], cls[t["group_b"]]
        m = t["metric"]
        lo_a, hi_a, lo_b, hi_b = (ref.num(x) for x in (a[f"{m}_test_ci_low"], a[f"{m}_test_ci_high"],
                                                        b[f"{m}_test_ci_low"], b[f"{m}_test_ci_high"]))
        if None in (lo_a, hi_a, lo_b, hi_b):
            assert t["reason"] != "n/a" and t["significant"] == "n/a"
            continue
        decided += 1
        assert t["significant"] == ("true" if min(hi_a, hi_b) < max(lo_a, lo_b) else "false")
    assert decided >= 4
    assert [t for t in tests if t["test"].startswith("normal 95 %")]  # validation folds likewise


def test_interrater_scores_positive_patients_and_group_averages(cohort):
    rows = ref.read_tsv(cohort["out"] / "group" / "raters.tsv")
    summary = ref.read_tsv(cohort["out"] / "group" / "raters_summary.tsv")
    positive = {r["participant_id"] for r in rows if r["reference_positive"] == "true"}
    negative = {r["participant_id"] for r in rows if r["reference_positive"] == "false"}
    assert positive and negative
    (r2,) = [s for s in summary if s["annotator"] == "r2" and s["target"] == "reference"]
    assert int(r2["n"]) == len(positive) and r2["patients"] == "reference-positive patients"
    values = [float(r["jaccard"]) for r in rows if r["annotator"] == "r2" and r["target"] == "reference"
              and r["participant_id"] in positive]
    assert float(r2["jaccard_mean"]) == pytest.approx(np.mean(values))


# --- end to end: bids_postop-train (two architectures x two configurations) → the group level's tables -----------

@pytest.fixture(scope="session")
def protocol(tmp_path_factory):
    import trained_protocol

    return trained_protocol.trained(tmp_path_factory)


@pytest.mark.slow
def test_trained_models_tables_equal_an_independent_recomputation(protocol):
    """Tiny nnU-Net and AGU-Net models of configurations A and B trained on two hospitals (own-fold predictions
    = validation) and scored on the held-out third (fold ensemble = test); the group level that
    bids_postop-train ran at the end (WORK/validation) holds both columns for the four models, equal to a
    recomputation from the written derivatives."""
    assert protocol["codes"] == {"nnunet": 0, "agunet": 0}
    bids, work = protocol["bids"], protocol["work"]
    splits = {r["participant_id"]: r["fold"] for r in ref.read_tsv(work / "splits.tsv")}
    datasets = {f"{arch}-{config}": (work / "agunet" if arch == "agunet" else work) / "predictions" / config
                for arch in ("nnunet", "agunet") for config in ("A", "B")}
    for name, root in datasets.items():
        jsons = sorted(root.glob("sub-*/**/*_measures.json"))
        assert len(jsons) == 6, name  # 4 validation + 2 test participants
        for path in jsons:
            data = json.loads(path.read_text())
            cv = data["provenance"].get("cross_validation")
            fold = splits[data["participant_id"]]
            # each validation participant predicted by its own fold's network; the test site by the ensemble
            assert (cv is None) if fold == "test" else (str(cv["fold"]) == fold), (name, path.name)
    scored = ref.collect(datasets, bids / "derivatives" / "manual", splits)
    expected = ref.tables(scored, n_resamples=2000, seed=0)  # the group level's defaults
    group = work / "validation" / "group"
    seg = {(r["architecture"], r["configuration"]): r for r in ref.read_tsv(group / "paper_segmentation.tsv")}
    cls = {(r["architecture"], r["configuration"]): r for r in ref.read_tsv(group / "paper_classification.tsv")}
    assert set(seg) == set(cls) == {("nnU-Net", "A"), ("nnU-Net", "B"), ("AGU-Net", "A"), ("AGU-Net", "B")}
    checked = defined = 0
    for key, values in expected.items():
        got = {**seg[key[:2]], **cls[key[:2]]}
        assert got["model"] == key[2]
        assert (int(got["validation_n"]), int(got["test_n"]), got["validation_n_folds"]) == (4, 2, "2")
        for column, value in values.items():
            if column.endswith("_n"):
                continue
            cell = ref.num(got[column])
            checked += 1
            if value is None:
                assert cell is None, (key, column, got[column])
            else:
                defined += 1
                assert cell == pytest.approx(value, rel=1e-6, abs=1e-9), (key, column)
    assert checked >= 4 * 40 and defined >= 4 * 15
    html = (work / "validation" / "group_report.html").read_text()
    assert "Table 3 shape" in html and "Table 4 shape" in html and "group/figures/architectures.svg" in html
    tests = ref.read_tsv(group / "tests.tsv")
    assert {t["compares"] for t in tests if t["origin"] == "paper"} >= {
        "configurations of nnU-Net", "configurations of AGU-Net", "best configurations of the architectures"}
    print("trained protocol, Dice-P validation / test: " + "; ".join(
        f"{k[0]} {k[1]} {seg[k]['dice_P_validation_mean']} / {seg[k]['dice_P_test_mean']}" for k in sorted(seg)))
