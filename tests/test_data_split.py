"""Patient-level splits and round-robin subsets: no patient in two splits, deterministic, balanced (sources without
official lists or SegVol-seen scans; those rules are in test_data_split_leakage.py)."""

from __future__ import annotations

import pytest

from segevo.data.split import SplitCase, round_robin_subset, split_cases


def split_patients(cases, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """(key, source, patient) rows, patients scoped per source, no official lists."""
    rows = [SplitCase(key, source, f"{source}/{patient}") for key, source, patient in cases]
    return split_cases(rows, val_fraction, test_fraction, seed, official=None).splits


def cases(n_per_source: dict[str, int], scans_per_patient: int = 2) -> list[tuple[str, str, str]]:
    out = []
    for source, n in n_per_source.items():
        for p in range(n):
            for s in range(scans_per_patient):
                out.append((f"{source}/p{p}_s{s}", source, f"p{p}"))
    return out


def test_no_patient_is_in_two_splits_and_every_case_is_somewhere():
    table = cases({"amos": 40, "chaos": 20, "msd": 7}, scans_per_patient=3)
    split = split_patients(table, 0.1, 0.2, seed=0)
    owner = {}
    for name, keys in split.items():
        for key in keys:
            patient = key.rsplit("_", 1)[0]
            assert owner.setdefault(patient, name) == name, f"{patient} in {owner[patient]} and {name}"
    assert sorted(k for keys in split.values() for k in keys) == sorted(k for k, _, _ in table)
    assert len([p for p in owner if p.startswith("amos/")]) == 40
    assert sum(owner[p] == "test" for p in owner if p.startswith("amos/")) == 8


def test_deterministic_by_seed_and_independent_per_source():
    table = cases({"amos": 30, "chaos": 12})
    a, b = split_patients(table, 0.1, 0.2, 7), split_patients(list(reversed(table)), 0.1, 0.2, 7)
    assert a == b
    assert split_patients(table, 0.1, 0.2, 8) != a
    with_more = split_patients(table + cases({"zeta": 5}), 0.1, 0.2, 7)
    assert [k for k in with_more["test"] if not k.startswith("zeta/")] == a["test"]


def test_single_patient_source_goes_to_train():
    split = split_patients(cases({"demo": 1}, scans_per_patient=2), 0.1, 0.2, 0)
    assert split["train"] == ["demo/p0_s0", "demo/p0_s1"] and not split["val"] and not split["test"]


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum below 1"):
        split_patients([], 0.5, 0.5, 0)


def test_round_robin_subset_balances_sources():
    keys = [f"amos/c{i}" for i in range(100)] + [f"chaos/c{i}" for i in range(10)] + [f"msd/c{i}" for i in range(50)]
    subset = round_robin_subset(keys, 60, seed=0)
    counts = {s: sum(k.startswith(s + "/") for k in subset) for s in ("amos", "chaos", "msd")}
    assert counts == {"amos": 25, "chaos": 10, "msd": 25}
    assert round_robin_subset(keys, 60, seed=0) == subset
    assert len(round_robin_subset(keys, 1000, seed=0)) == len(keys)
