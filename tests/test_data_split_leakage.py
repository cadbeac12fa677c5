"""Leak-free splits on overlapping synthetic sources: official lists, SegVol-seen scans, cross-source copies."""

from __future__ import annotations

import itertools

import pytest

from segevo.data.split import SplitCase, split_cases

AMOS_VAL_AS_TEST = {"train": "train", "val": "test", "test": "test"}


def overlapping_sources() -> list[SplitCase]:
    """AMOS with its own train/val lists; M3D-Seg re-packaging some AMOS scans (its train list: SegVol-seen, its
    test list: not); MSD prostate with no test list; a local folder holding byte-identical copies of three MSD
    scans under other patient ids; a patient scanned twice within AMOS's val list."""
    cases = [SplitCase(f"amos22/amos_{i:04d}", "amos22", f"amos-{i:04d}", "train" if i <= 40 else "val",
                       content=f"amos{i}") for i in range(1, 61)]
    cases.append(SplitCase("amos22/amos_0059b", "amos22", "amos-0059", "val", content="amos59b"))
    seen = [*range(1, 11), 41, 42, 43]  # 41-43 are in AMOS's val list (our test) but SegVol trained on them
    cases += [SplitCase(f"m3d_seg/0002_amos_{i:04d}", "m3d_seg", f"amos-{i:04d}", "train", segvol_seen=True,
                        content=f"m3d{i}") for i in seen]
    cases += [SplitCase(f"m3d_seg/0002_amos_{i:04d}", "m3d_seg", f"amos-{i:04d}", "test", content=f"m3d{i}")
              for i in (50, 51)]
    cases += [SplitCase(f"msd/prostate_{i:02d}", "msd", f"msd-prostate-{i}", "train", content=f"p{i}")
              for i in range(30)]
    cases += [SplitCase(f"local/case{i}", "local", f"local-{i}", None, content=f"p{i}") for i in (3, 4, 5)]
    return cases


def components(cases: list[SplitCase]) -> list[set[str]]:
    """Brute-force closure of "same patient or same content" (independent of the union-find under test)."""
    groups = [{c.key} for c in cases]
    links = {c.key: {("p", c.patient_id), ("c", c.content)} for c in cases}
    merged = True
    while merged:
        merged = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            if any(links[x] & links[y] for x in groups[a] for y in groups[b]):
                groups[a] |= groups.pop(b)
                merged = True
                break
    return groups


def test_no_group_crosses_splits_and_no_segvol_scan_is_tested():
    cases = overlapping_sources()
    result = split_cases(cases, 0.1, 0.2, seed=0, official=AMOS_VAL_AS_TEST)
    where = {k: s for s, keys in result.splits.items() for k in keys}
    assert sorted(where) == sorted(c.key for c in cases)
    for group in components(cases):
        assert len({where[k] for k in group}) == 1, f"{sorted(group)} split across {[where[k] for k in group]}"
    seen_patients = {c.patient_id for c in cases if c.segvol_seen}
    tested = [c.key for c in cases if where[c.key] == "test" and c.patient_id in seen_patients]
    assert tested == []
    # AMOS's own lists: its train list never in test, its val list in test unless SegVol saw the scan
    for c in cases:
        if c.source == "amos22" and c.subset == "train":
            assert where[c.key] != "test"
    amos_val = {c.key for c in cases if c.source == "amos22" and c.subset == "val"}
    moved = {f"amos22/amos_{i:04d}" for i in (41, 42, 43)}
    assert {k for k in amos_val if where[k] == "test"} == amos_val - moved
    assert all(where[k] == "train" for k in moved)
    # M3D-Seg's test-list copies follow their AMOS original (val list -> test)
    assert where["m3d_seg/0002_amos_0050"] == where["amos22/amos_0050"] == "test"
    # the local copies are on the side of the MSD scan they duplicate, and the group is reported
    for i in (3, 4, 5):
        assert where[f"local/case{i}"] == where[f"msd/prostate_{i:02d}"]
        assert [f"local/case{i}", f"msd/prostate_{i:02d}"] in result.groups
    # MSD publishes no test list: its test share is drawn (20 % of 30 patients)
    assert sum(where[f"msd/prostate_{i:02d}"] == "test" for i in range(30)) == 6


def test_moves_are_reported_with_their_reason():
    result = split_cases(overlapping_sources(), 0.1, 0.2, seed=0, official=AMOS_VAL_AS_TEST)
    segvol = [m for m in result.moves if m["rule"] == "segvol_seen"]
    moved_keys = sorted(k for m in segvol for k in m["cases"])
    assert moved_keys == sorted([f"amos22/amos_{i:04d}" for i in (41, 42, 43)]
                                + [f"m3d_seg/0002_amos_{i:04d}" for i in (41, 42, 43)])
    assert all(m["from"] == "test" and m["to"] == "train" and "SegVol was trained on" in m["why"] for m in segvol)
    assert result.reasons() == {"segvol_seen": 6}


def test_rules_can_be_relaxed():
    cases = overlapping_sources()
    allowed = split_cases(cases, 0.1, 0.2, seed=0, official=AMOS_VAL_AS_TEST, segvol_seen="allow")
    assert "amos22/amos_0041" in allowed.splits["test"] and not allowed.moves
    ignored = split_cases(cases, 0.1, 0.2, seed=0, official=None, segvol_seen="allow")
    amos = [k for k in ignored.splits["test"] if k.startswith("amos22/")]
    assert 0 < len(amos) < 20  # drawn at random from all 60 AMOS patients, lists ignored
    with pytest.raises(ValueError, match="segvol_seen"):
        split_cases(cases, 0.1, 0.2, seed=0, segvol_seen="sometimes")


def test_official_val_list_kept_as_val_by_default():
    result = split_cases(overlapping_sources(), 0.1, 0.2, seed=0)
    where = {k: s for s, keys in result.splits.items() for k in keys}
    assert where["amos22/amos_0045"] == "val"
    assert where["amos22/amos_0041"] == "val"  # SegVol-seen is fine outside test
    assert not any(where[f"amos22/amos_{i:04d}"] == "val" for i in range(1, 41))  # AMOS supplies its own val
