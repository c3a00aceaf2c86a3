"""Hospital-stratified folds: balanced, no site in two folds, test sites in none, deterministic."""

from __future__ import annotations

import csv
import json

import pytest

from bids_postop.errors import EXIT_USAGE
from bids_postop.training.splits import SplitError, assign_sites, make_splits, write_splits


def _participants(site_counts: dict[str, int]) -> dict[str, str]:
    out, i = {}, 0
    for site, n in site_counts.items():
        for _ in range(n):
            i += 1
            out[f"sub-{i:03d}"] = site
    return out


CASES = [
    # site counts, folds, test sites, expected fold sizes (sorted), expected test count
    ({"a": 10, "b": 10, "c": 10, "d": 10, "e": 10, "t": 7}, 5, ["t"], [10, 10, 10, 10, 10], 7),
    ({"a": 30, "b": 20, "c": 15, "d": 10, "e": 5, "f": 5}, 3, [], [25, 30, 30], 0),
    ({"a": 9, "b": 8, "c": 7, "d": 6, "e": 5, "f": 4, "g": 3, "t1": 2, "t2": 2}, 5, ["t1", "t2"],
     [7, 8, 9, 9, 9], 4),
    ({"big": 40, "s1": 3, "s2": 3, "s3": 3}, 2, [], [9, 40], 0),  # one hospital cannot be split: as even as possible
    ({"north": 2, "south": 2, "east": 2}, 2, ["east"], [2, 2], 2),
]


@pytest.mark.parametrize(("counts", "n_folds", "test", "sizes", "n_test"), CASES)
def test_folds(counts, n_folds, test, sizes, n_test):
    participants = _participants(counts)
    plan = make_splits(participants, n_folds=n_folds, test_sites=test)
    assert sorted(plan.fold_sizes) == sizes
    assert len(plan.test) == n_test
    # no site in two folds; test sites in none; every participant placed once
    folds_of_site: dict[str, set] = {}
    for a in plan.assignments:
        folds_of_site.setdefault(a.site, set()).add(a.fold)
    assert all(len(f) == 1 for f in folds_of_site.values())
    assert all(folds_of_site[t] == {None} for t in test)
    assert all(None not in folds_of_site[s] for s in counts if s not in test)
    assert sorted(a.participant_id for a in plan.assignments) == sorted(participants)
    # nnU-Net splits: validation sets partition the training participants, train = the rest
    splits = plan.nnunet_splits()
    val = [p for s in splits for p in s["val"]]
    assert sorted(val) == sorted(p for p, s in participants.items() if s not in test)
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == sorted(val)


@pytest.mark.parametrize("counts", [c[0] for c in CASES])
def test_greedy_balance_bound(counts):
    """Greedy largest-first: max − min fold size never exceeds the largest site."""
    folds = assign_sites(counts, 2)
    sizes = [sum(n for s, n in counts.items() if folds[s] == k) for k in range(2)]
    assert max(sizes) - min(sizes) <= max(counts.values())


def test_deterministic_and_order_independent():
    counts = {"a": 5, "b": 5, "c": 4, "d": 4, "e": 3, "f": 3, "g": 1}
    participants = _participants(counts)
    reversed_order = dict(reversed(list(participants.items())))
    one = make_splits(participants, n_folds=3)
    assert one == make_splits(participants, n_folds=3)
    assert one.assignments == make_splits(reversed_order, n_folds=3).assignments
    assert one.site_folds == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 0, "f": 1, "g": 0}


@pytest.mark.parametrize(("counts", "n_folds", "test", "message"), [
    ({"a": 3, "b": 3}, 5, [], "2 training site(s) (a, b) for 5 folds"),
    ({"a": 3, "b": 3, "c": 3}, 3, ["c"], "use --folds 2 or fewer"),
    ({"a": 3, "b": 3}, 1, [], "at least 2 folds"),
    ({"a": 3, "b": 3}, 2, ["x"], "--test-site x: not a site"),
])
def test_refused(counts, n_folds, test, message):
    with pytest.raises(SplitError) as info:
        make_splits(_participants(counts), n_folds=n_folds, test_sites=test)
    assert message in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


def test_missing_site_refused():
    with pytest.raises(SplitError, match="no site for sub-2"):
        make_splits({"sub-1": "a", "sub-2": None, "sub-3": "b"}, n_folds=2)


def test_write_splits(tmp_path):
    plan = make_splits(_participants({"a": 2, "b": 1, "c": 1, "t": 1}), n_folds=2, test_sites=["t"])
    write_splits(plan, tsv=tmp_path / "splits.tsv", nnunet_json=tmp_path / "splits_final.json")
    with (tmp_path / "splits.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert rows == [{"participant_id": "sub-001", "site": "a", "fold": "0"},
                    {"participant_id": "sub-002", "site": "a", "fold": "0"},
                    {"participant_id": "sub-003", "site": "b", "fold": "1"},
                    {"participant_id": "sub-004", "site": "c", "fold": "1"},
                    {"participant_id": "sub-005", "site": "t", "fold": "test"}]
    assert json.loads((tmp_path / "splits_final.json").read_text()) == [
        {"train": ["sub-003", "sub-004"], "val": ["sub-001", "sub-002"]},
        {"train": ["sub-001", "sub-002"], "val": ["sub-003", "sub-004"]}]


@pytest.mark.parametrize(("argv", "message"), [
    (["--init-model", "m.keras"], "--init-model is for --architecture agunet"),
    (["--config", "F"], "invalid choice"),
    (["--folds", "0"], "must be >= 1"),
])
def test_train_cli_usage_errors(tmp_path, capsys, argv, message):
    from bids_postop.cli.train import main

    try:
        code = main([str(tmp_path), str(tmp_path / "work"), "--manual", f"manual={tmp_path}", *argv])
    except SystemExit as exc:  # argparse errors exit through the parser
        code = exc.code
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err
