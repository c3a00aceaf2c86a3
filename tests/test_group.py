"""Group level end to end on a tiny cohort: two datasets of predictions, two raters, folds, rater groups."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from bids_postop.bids.derivatives import summary_row
from bids_postop.core.postprocess import classify_resection, volume_ml
from bids_postop.errors import UsageError
from bids_postop.group import run_group_level

medpy_binary = pytest.importorskip("medpy.metric.binary")

SHAPE = (20, 20, 12)
SPACING = (0.5, 0.5, 1.0)  # 0.25 mm³ voxels: 700 voxels are exactly 0.175 ml
AFFINE = np.diag([*SPACING, 1.0])


def box(x0, x1, y0, y1, z0, z1, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[x0:x1, y0:y1, z0:z1] = 1
    return m


EMPTY = np.zeros(SHAPE, np.uint8)
BIG = box(2, 14, 2, 14, 1, 9)  # 1152 voxels = 0.288 ml
EDGE = box(5, 15, 5, 15, 2, 9)  # 700 voxels = 0.175 ml exactly
# participant → (site, fold, truth, main prediction, model); sub-06's manual masks lie on another grid
COHORT = {
    "01": ("A", "1", BIG, np.roll(BIG, 2, axis=0)),  # TP, Dice 0.8333
    "02": ("A", "1", EMPTY, EMPTY),  # TN, Dice and HD95 undefined
    "03": ("B", "2", BIG, EMPTY),  # FN, Dice 0, HD95 undefined
    "04": ("B", "2", EMPTY, BIG),  # FP
    "05": ("A", "2", EDGE, EDGE),  # TP at exactly 0.175 ml (TN with gtr_inclusive)
    "06": ("B", "1", BIG, BIG),  # error: manual masks not on the prediction grid
    "07": ("B", "test", None, BIG),  # no manual annotation
}


def write_outputs(root: Path, model: str, predictions: dict[str, np.ndarray], *, architecture: str | None = None,
                  json_sidecar: bool = True) -> Path:
    """Participant-level outputs as bids_postop writes them (measures TSV + JSON with the model card), or as an
    older version did (TSV only: ``json_sidecar=False``)."""
    desc = "".join(ch for ch in model if ch.isalnum()) if json_sidecar else "residual"
    for label, pred in predictions.items():
        site = COHORT[label][0]
        session = root / f"sub-{label}" / "ses-postop"
        mask = session / "anat" / f"sub-{label}_ses-postop_ce-gd_label-tumor_desc-{desc}_mask.nii.gz"
        measures = session / f"sub-{label}_ses-postop_desc-{desc}_measures.tsv"
        write_nifti(mask, pred.astype(np.uint8), AFFINE)
        ml = volume_ml(pred, SPACING)
        measures.write_text(summary_row({
            "participant_id": f"sub-{label}", "session_id": "ses-postop", "site": site if label != "04" else None,
            "config": "B", "model": model, "residual_volume_ml": ml, "resection_status": classify_resection(ml)}))
        if json_sidecar:
            measures.with_suffix(".json").write_text(json.dumps({
                "participant_id": f"sub-{label}", "session_id": "ses-postop",
                "model": {"name": model, "architecture": architecture, "configuration": "B", "threshold": 0.5},
                "measures": {"gtr_cutoff_ml": 0.175, "gtr_rule": "GTR if residual < 0.175 ml",
                             "min_component_voxels": 20},
                "outputs": {"residual_mask": mask.relative_to(root).as_posix()}}))
    return root


def write_manual(root: Path, masks: dict[str, np.ndarray], *, desc: str | None = None, off_grid: bool = True) -> Path:
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "manual", "BIDSVersion": "1.10.0",
                                                                "DatasetType": "derivative"}))
    for label, mask in masks.items():
        shape_affine = (mask, AFFINE) if label != "06" or not off_grid else (np.zeros((20, 20, 10), np.uint8), AFFINE)
        name = f"sub-{label}_ses-postop_label-tumor{f'_desc-{desc}' if desc else ''}_mask.nii.gz"  # BIDS order
        write_nifti(root / f"sub-{label}" / "ses-postop" / "anat" / name, *shape_affine)
    return root


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group")
    bids = tmp / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tsite\n" + "".join(
        f"sub-{k}\t{v[0]}\n" for k, v in COHORT.items()))
    (tmp / "folds.tsv").write_text("participant_id\tfold\n" + "".join(f"sub-{k}\t{v[1]}\n" for k, v in COHORT.items()))
    (tmp / "groups.tsv").write_text("rater\tgroup\nmanual\texpert\nr2\tnovice\n")
    # model names that say nothing of the architecture: it comes from the model cards
    out = write_outputs(tmp / "out", "first-model", {k: v[3] for k, v in COHORT.items()}, architecture="nnunet")
    agu = write_outputs(tmp / "agunet", "second-model", {k: v[2] for k, v in COHORT.items() if k < "06"},
                        architecture="raidionics")
    truth = {k: v[2] for k, v in COHORT.items() if v[2] is not None}
    manual = write_manual(bids / "derivatives" / "manual", truth)
    rater2 = write_manual(tmp / "rater2", {k: np.roll(v, 1, axis=1) for k, v in truth.items()}, desc="r2",
                          off_grid=False)
    messages: list[str] = []
    written = run_group_level(out, bids_dir=bids, manual={"manual": manual, "second": rater2},
                              rater_groups_tsv=tmp / "groups.tsv", folds_tsv=tmp / "folds.tsv",
                              compare={"agunet": agu}, n_bootstrap=500, progress=messages.append)
    return {"out": out, "bids": bids, "manual": manual, "written": written, "messages": messages, "truth": truth,
            "tmp": tmp}


def test_every_table_has_a_dictionary_and_the_report_exists(cohort):
    out = cohort["out"]
    tables = ["group_summary.tsv", *(f"group/{n}.tsv" for n in ("cohort", "patients", "sites", "folds",
                                                                 "folds_pooled", "overall", "raters",
                                                                 "raters_summary", "tests"))]
    for name in tables:
        tsv = out / name
        assert tsv in cohort["written"], name
        header = tsv.read_text().splitlines()[0].split("\t")
        assert header == list(json.loads(tsv.with_suffix(".json").read_text())), name
    html = (out / "group_report.html").read_text()
    for figure in ("cohort_volumes", "dice_per_site", "volumes_bland_altman", "confusion_matrix", "rater_jaccard"):
        assert (out / "group" / "figures" / f"{figure}.svg").is_file()
        assert f"group/figures/{figure}.svg" in html
    assert "Inter-rater study" in html and "not on the grid" in html


def test_summary_and_cohort(cohort):
    summary = read_tsv(cohort["out"] / "group_summary.tsv")
    assert len(summary) == 7
    by = {r["participant_id"]: r for r in summary}
    assert by["sub-04"]["site"] == "B"  # from participants.tsv when the measures TSV has none
    assert by["sub-07"]["fold"] == "test"
    sites = {r["site"]: r for r in read_tsv(cohort["out"] / "group" / "cohort.tsv")}
    assert sites["all"]["n_sessions"] == "7" and sites["A"]["n_GTR"] == "1" and sites["A"]["n_RT"] == "2"


def test_patient_rows(cohort):
    rows = {r["participant_id"]: r for r in read_tsv(cohort["out"] / "group" / "patients.tsv") if r["source"] == "main"}
    outcomes = {k: rows[k]["outcome"] for k in ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05")}
    assert outcomes == {"sub-01": "TP", "sub-02": "TN", "sub-03": "FN", "sub-04": "FP", "sub-05": "TP"}
    assert rows["sub-06"]["status"] == "error" and "not on the grid" in rows["sub-06"]["reason"]
    assert rows["sub-07"]["status"] == "no_reference"
    truth, pred = COHORT["01"][2], COHORT["01"][3]
    assert float(rows["sub-01"]["dice"]) == pytest.approx(medpy_binary.dc(pred, truth), abs=1e-9)
    assert float(rows["sub-01"]["hd95_mm"]) == pytest.approx(medpy_binary.hd95(pred, truth, SPACING), abs=1e-6)
    assert rows["sub-02"]["dice"] == "n/a" and rows["sub-02"]["dice_undefined_reason"] != "n/a"
    assert rows["sub-03"]["dice"] == "0" and rows["sub-03"]["hd95_mm"] == "n/a"
    assert rows["sub-03"]["hd95_undefined_reason"] != "n/a"
    assert rows["sub-01"]["architecture"] == "nnU-Net" and rows["sub-01"]["set"] == "validation"
    assert rows["sub-01"]["gtr_rule_source"] == "participant"
    assert float(rows["sub-05"]["true_volume_ml"]) == 0.175 and rows["sub-05"]["true_status"] == "RT"
    assert rows["sub-01"]["reference_rater"] == "manual"


def test_overall_site_and_fold_numbers(cohort):
    overall = {r["source"]: r for r in read_tsv(cohort["out"] / "group" / "overall.tsv")}
    main = overall["main"]
    assert (main["TP"], main["TN"], main["FP"], main["FN"]) == ("2", "1", "1", "1")
    assert (main["n_evaluated"], main["n_errors"], main["n_no_reference"], main["n_P"]) == ("5", "1", "1", "3")
    d01 = medpy_binary.dc(COHORT["01"][3], COHORT["01"][2])
    assert float(main["dice_P_mean"]) == pytest.approx(np.mean([d01, 0.0, 1.0]))
    assert float(main["dice_TP_mean"]) == pytest.approx(np.mean([d01, 1.0]))
    assert main["hd95_P_n_undefined"] == "1"
    assert float(main["recall"]) == pytest.approx(2 / 3) and float(main["specificity"]) == pytest.approx(1 / 2)
    assert float(main["balanced_accuracy"]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert main["recall_ci_low"] == "n/a" or float(main["recall_ci_low"]) <= 2 / 3
    agu = overall["agunet"]
    assert (agu["TP"], agu["TN"], agu["FP"], agu["FN"]) == ("3", "2", "0", "0")
    assert agu["recall_ci_reason"]  # every positive found: degenerate bootstrap, said so
    sites = {(r["source"], r["site"]): r for r in read_tsv(cohort["out"] / "group" / "sites.tsv")}
    assert sites[("main", "A")]["TP"] == "2" and sites[("main", "B")]["FN"] == "1"
    folds = {(r["source"], r["fold"]): r for r in read_tsv(cohort["out"] / "group" / "folds.tsv")}
    assert folds[("main", "1")]["n_evaluated"] == "2" and folds[("main", "test")]["n_no_reference"] == "1"
    pooled = {(r["source"], r["metric"]): r for r in read_tsv(cohort["out"] / "group" / "folds_pooled.tsv")}
    dice_p = pooled[("main", "dice_P")]
    assert dice_p["folds"] == "1; 2" and float(dice_p["pooled_mean"]) == pytest.approx(np.mean([d01, 0.0, 1.0]))


def test_raters_and_tests(cohort):
    rows = read_tsv(cohort["out"] / "group" / "raters.tsv")
    ok = [r for r in rows if r["status"] == "ok"]
    r01 = {(r["annotator"], r["target"]): r for r in ok if r["participant_id"] == "sub-01"}
    truth = COHORT["01"][2]
    assert float(r01[("r2", "reference")]["jaccard"]) == pytest.approx(medpy_binary.jc(np.roll(truth, 1, 1), truth))
    assert float(r01[("main", "consensus")]["jaccard"]) == pytest.approx(
        medpy_binary.jc(COHORT["01"][3], truth & np.roll(truth, 1, 1)))
    assert r01[("main", "consensus")]["consensus_of"] == "manual+r2"
    errors = [r for r in rows if r["status"] == "error"]
    assert [(r["participant_id"], r["annotator"]) for r in errors] == [("sub-06", "r2")]
    assert "not on the grid" in errors[0]["reason"]
    tests = read_tsv(cohort["out"] / "group" / "tests.tsv")
    # one configuration per architecture (from the model cards, not the names): no Tukey; the architectures'
    # best configurations compared on the validation set, as no test patient was evaluated
    assert not [t for t in tests if t["test"] == "Tukey HSD"]
    (mw,) = [t for t in tests if t["test"] == "Mann-Whitney U (two-sided)" and t["compares"].startswith("best")]
    assert {mw["group_a"], mw["group_b"]} == {"nnU-Net B (first-model)", "AGU-Net B (second-model)"}
    assert mw["scope"].startswith("validation set") and mw["origin"] == "paper"
    groups = {t["group_b"] for t in tests if t["metric"] == "Jaccard vs reference"}
    assert {"rater:r2", "group:novice (per-patient average)", "all raters (per-patient average)"} <= groups


def test_cutoff_rules_own_reclassified_mixed_and_no_manual(cohort, tmp_path):
    out = tmp_path / "out"
    write_outputs(out, "nnunet-B", {"05": EDGE})
    manual = write_manual(tmp_path / "manual", {"05": EDGE})
    # each participant's own rule (< 0.175 ml) unless asked to re-classify
    run_group_level(out, bids_dir=cohort["bids"], manual={"manual": manual}, gtr_inclusive=True, n_bootstrap=0)
    row = read_tsv(out / "group" / "patients.tsv")[0]
    assert (row["outcome"], row["true_status"], row["gtr_rule_source"]) == ("TP", "RT", "participant")
    assert "GTR if residual < 0.175 ml, else RT (1 session(s))" in json.loads(
        (out / "group_summary.json").read_text())["resection_status"]["Description"]
    run_group_level(out, bids_dir=cohort["bids"], manual={"manual": manual}, gtr_inclusive=True, reclassify=True,
                    n_bootstrap=0)
    row = read_tsv(out / "group" / "patients.tsv")[0]
    assert (row["outcome"], row["true_status"], row["gtr_inclusive"]) == ("TN", "GTR", "true")
    assert "--reclassify" in (out / "group_report.html").read_text()
    # a cohort whose participants used different cut-offs is flagged
    mixed = tmp_path / "mixed"
    write_outputs(mixed, "nnunet-B", {"01": BIG, "05": EDGE})
    tsv = next(mixed.glob("sub-01/ses-postop/*_measures.tsv"))
    tsv.write_text(tsv.read_text().replace("\t0.175\t", "\t0.2\t"))
    sidecar = tsv.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data["measures"]["gtr_cutoff_ml"] = 0.2
    sidecar.write_text(json.dumps(data))
    run_group_level(mixed, bids_dir=cohort["bids"], n_bootstrap=0)
    statement = json.loads((mixed / "group_summary.json").read_text())["resection_status"]["Description"]
    assert "MIXED SETTINGS" in statement and "< 0.2 ml" in statement
    assert "mixed GTR cut-off settings" in (mixed / "group_report.html").read_text()
    # outputs of an older version (no measures JSON, desc-residual names, empty cells): read, with notes
    old = tmp_path / "old"
    write_outputs(old, "nnunet-B", {"01": BIG}, json_sidecar=False)
    tsv = next(old.glob("sub-01/ses-postop/*_desc-residual_measures.tsv"))
    tsv.write_text(tsv.read_text().replace("n/a", ""))
    run_group_level(old, bids_dir=cohort["bids"], manual={"manual": cohort["manual"]}, n_bootstrap=0)
    row = read_tsv(old / "group" / "patients.tsv")[0]
    assert row["status"] == "ok" and row["architecture"] == "unknown" and row["gtr_rule_source"].startswith("group")
    summary = read_tsv(old / "group_summary.tsv")[0]
    assert summary["preop_volume_ml"] == "n/a" and summary["eor_percent"] == "n/a"
    assert "no measures JSON" in (old / "group_report.html").read_text()
    assert not (out / "group" / "raters.tsv").exists()  # one rater: no inter-rater study
    only = tmp_path / "only"
    write_outputs(only, "nnunet-B", {"01": BIG})
    written = run_group_level(only, bids_dir=cohort["bids"])
    assert {p.name for p in written} >= {"group_summary.tsv", "cohort.tsv", "group_report.html"}
    assert not (only / "group" / "patients.tsv").exists()


def test_raters_from_desc_entities_and_from_datasets(tmp_path):
    from bids_postop.group.collect import collect_annotations, read_folds

    one = write_manual(tmp_path / "one", {"01": BIG})
    write_manual(tmp_path / "one", {"01": BIG}, desc="a")
    two = write_manual(tmp_path / "two", {"01": BIG, "02": BIG}, desc="a")
    found, default = collect_annotations({"manual": one, "two": two})
    assert default == "manual"
    assert sorted(found[("01", "postop")]) == ["a", "manual", "two-a"]
    assert sorted(found[("02", "postop")]) == ["two-a"]
    with pytest.raises(UsageError, match="no sub-"):
        collect_annotations({"empty": tmp_path})
    folds = tmp_path / "folds.tsv"
    folds.write_text("site\tfold\nA\t1\nB\ttest\n")
    assert read_folds(folds, tmp_path) == ({}, {"A": "1", "B": "test"})
    folds.write_text("participant\tsplit\n")
    with pytest.raises(UsageError, match="'fold' column"):
        read_folds(folds, tmp_path)


def test_rater_masks_are_found_by_their_bids_entities_and_the_dataset_is_valid(tmp_path):
    """The README's naming of a two-rater manual dataset passes the BIDS validator, and the group level finds both
    raters (label-tumor before desc); the older order _desc-<rater>_label-tumor is read with a deprecation note."""
    from conftest import require_tool

    from bids_postop.group.collect import collect_annotations

    manual = tmp_path / "manual"
    write_manual(manual, {"01": BIG, "02": EMPTY}, desc="rater1")
    write_manual(manual, {"01": np.roll(BIG, 1, 0), "02": EMPTY}, desc="rater2")
    (manual / "dataset_description.json").write_text(json.dumps({
        "Name": "manual residual tumour masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "Manual"}]}))
    for mask in manual.rglob("*_mask.nii.gz"):
        mask.with_name(mask.name.replace(".nii.gz", ".json")).write_text(json.dumps({"Type": "Lesion"}))
    exe = require_tool("bids-validator-deno")
    proc = subprocess.run([exe, str(manual), "--json", "--datasetTypes", "derivative"], capture_output=True,
                          text=True, timeout=300)
    errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:5]
    notes: list[str] = []
    found, default = collect_annotations({"manual": manual}, notes=notes)
    assert sorted(found[("01", "postop")]) == ["rater1", "rater2"] and default is None and not notes
    old = manual / "sub-02" / "ses-postop" / "anat"
    (old / "sub-02_ses-postop_label-tumor_desc-rater2_mask.nii.gz").rename(
        old / "sub-02_ses-postop_desc-rater2_label-tumor_mask.nii.gz")
    found, _ = collect_annotations({"manual": manual}, notes=notes)
    assert sorted(found[("02", "postop")]) == ["rater1", "rater2"]
    assert len(notes) == 1 and "deprecated" in notes[0]


def test_report_without_matplotlib_still_writes_the_html(tmp_path, monkeypatch):
    from bids_postop.group.report import GroupResults, write_report

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    results = GroupResults(cutoff_rule="GTR if residual < 0.175 ml, else RT", cutoff_ml=0.175, datasets={})
    written = write_report(tmp_path, results)
    assert written == [tmp_path / "group_report.html"]
    assert "figures skipped" in written[0].read_text()


def test_tilted_grid_175_voxels_are_rt_at_the_group_level(tmp_path):
    """On a grid tilted by 7° (affine stored as float32 in the NIfTI header), 175 voxels of 1 mm³ are 0.175 ml:
    residual tumour for the prediction and the reference alike."""
    t = np.deg2rad(7.0)
    affine = np.eye(4)
    affine[:3, :3] = [[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:9, 2:7, 2:7] = 1
    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    session = out / "sub-01" / "ses-postop"
    write_nifti(session / "anat" / "sub-01_ses-postop_label-tumor_desc-m_mask.nii.gz", mask, affine)
    (session / "sub-01_ses-postop_desc-m_measures.tsv").write_text(summary_row({
        "participant_id": "sub-01", "session_id": "ses-postop", "model": "m", "residual_volume_ml": 0.175}))
    manual = tmp_path / "manual"
    write_nifti(manual / "sub-01" / "ses-postop" / "anat" / "sub-01_ses-postop_label-tumor_mask.nii.gz", mask, affine)
    run_group_level(out, bids_dir=bids, manual={"manual": manual}, n_bootstrap=0)
    (row,) = read_tsv(out / "group" / "patients.tsv")
    assert (row["true_volume_ml"], row["predicted_volume_ml"]) == ("0.175", "0.175")
    assert (row["true_status"], row["predicted_status"], row["outcome"]) == ("RT", "RT", "TP")


def test_fold_and_set_come_from_the_own_fold_record_the_folds_tsv_or_the_model_card():
    from bids_postop.group.collect import Prediction, fold_and_set

    card = {"folds": [{"fold": 0, "validation": ["sub-01"]}, {"fold": 1, "validation": ["sub-02"]}],
            "test_participants": ["sub-03"]}

    def pred(label: str, provenance: dict | None = None) -> Prediction:
        return Prediction(source="m", key=(label, "postop"), row={"site": "A"}, mask=None,
                          provenance=provenance or {}, card_training=card)

    none = ({}, {})
    assert fold_and_set(pred("01", {"cross_validation": {"fold": 0}}), none)[:2] == ("0", "validation")
    # the fold ensemble on a participant the model was trained on: in no column of the paper's tables
    assert fold_and_set(pred("01"), ({"01": "0"}, {}))[1] == "training"
    assert fold_and_set(pred("03"), none)[:2] == ("test", "test")  # the card's held-out participant
    assert fold_and_set(pred("04"), ({"04": "holdout"}, {}))[:2] == ("holdout", "test")
    assert fold_and_set(pred("05"), ({}, {"A": "2"}))[:2] == ("2", "validation")
    assert fold_and_set(pred("06"), none)[:2] == ("", "unknown")
