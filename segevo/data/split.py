"""Train/val/test splits that cannot leak, and round-robin balanced training subsets.

A test split is only as trustworthy as its separation from everything a compared model has seen, so cases
are first joined into groups that must stay on one side, then each group is placed by rules before chance:

1. **Groups.** Cases sharing a patient id (ids are namespaced per source, and sources that re-package another's
   scans use that source's id: M3D-Seg's AMOS and MSD copies) or the content hash of their raw image (one file
   published twice) are one group, across sources.
2. **Official lists.** A source that publishes its own train/val/test lists (``subset`` per case) keeps them:
   official test cases go to test, official val to val (mapped by ``official``), official train cases never
   to a split the source itself supplies. Splits a source does not supply are carved from its other cases.
3. **SegVol-seen scans.** A group holding a scan SegVol was trained on (M3D-Seg train lists) never goes to test
   under the default rule ``segvol_seen: not_test``: comparing against the SegVol baseline on those would
   flatter it.
4. **Chance.** The remaining free groups are shuffled per source with a seeded generator (so adding a source
   does not reshuffle the others) and fill each source's val/test quota.

Every group moved away from where a rule or the draw would have put it is reported with the reason.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segevo.errors import UserError
from segevo.io import read_json

SPLITS = ("train", "val", "test")
DEFAULT_OFFICIAL = {"train": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class SplitCase:
    """What the split needs of one case (a manifest row)."""

    key: str
    source: str
    patient_id: str
    subset: str | None = None  # the source's official list: train / val / test
    segvol_seen: bool = False  # in an M3D-Seg train list, so in SegVol's training data
    content: str | None = None  # SHA256 of the raw image


@dataclass
class SplitResult:
    splits: dict[str, list[str]]
    moves: list[dict[str, Any]] = field(default_factory=list)  # what a rule changed, and why
    groups: list[list[str]] = field(default_factory=list)  # groups of more than one case across sources

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for move in self.moves:
            counts[move["rule"]] += len(move["cases"])
        return dict(sorted(counts.items()))


def _stable_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction} must be >= 0 and sum below 1")


def group_cases(cases: Sequence[SplitCase]) -> list[list[SplitCase]]:
    """Connected components of "same patient id" and "same raw content" (union-find); sorted, deterministic."""
    parent = list(range(len(cases)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, case in enumerate(cases):
        for link in (("patient", case.patient_id), ("content", case.content)):
            if link[1] is None:
                continue
            j = first.setdefault(link, i)  # type: ignore[arg-type]
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[SplitCase]] = defaultdict(list)
    for i, case in enumerate(cases):
        members[find(i)].append(case)
    return sorted((sorted(g, key=lambda c: c.key) for g in members.values()), key=lambda g: g[0].key)


def _supplied(cases: Iterable[SplitCase], official: Mapping[str, str]) -> dict[str, set[str]]:
    """Per source, the splits its own lists fill; a source with a single list (or none) supplies none."""
    lists: dict[str, set[str]] = defaultdict(set)
    for c in cases:
        if c.subset in official:
            lists[c.source].add(official[c.subset])
    return {s: (found - {"train"} if len(found) > 1 else set()) for s, found in lists.items()}


def split_cases(cases: Iterable[SplitCase], val_fraction: float, test_fraction: float, seed: int, *,
                official: Mapping[str, str] | None = DEFAULT_OFFICIAL,
                segvol_seen: str = "not_test") -> SplitResult:
    """Place every case in train/val/test by the rules of the module docstring.

    ``official`` maps a source's list name to a split (None: ignore the sources' lists); ``segvol_seen`` is
    ``not_test`` (SegVol-seen groups go to train) or ``allow``. Fractions apply to each source's free groups
    (rounded, at least one group left for training); a group belongs to the source of its first case.
    """
    _check_fractions(val_fraction, test_fraction)
    if segvol_seen not in ("not_test", "allow"):
        raise ValueError(f"segvol_seen must be 'not_test' or 'allow', got {segvol_seen!r}")
    cases = sorted(cases, key=lambda c: c.key)
    official = dict(official or {})
    supplied = _supplied(cases, official)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    result = SplitResult(out)
    free: dict[str, list[tuple[list[SplitCase], set[str], list[str]]]] = defaultdict(list)  # group, allowed, seen

    def move(group: list[SplitCase], rule: str, to: str, why: str, away: str | None = None) -> None:
        result.moves.append({"cases": [c.key for c in group], "rule": rule, "from": away, "to": to, "why": why})

    for group in group_cases(cases):
        keys = [c.key for c in group]
        if len({c.source for c in group}) > 1:
            result.groups.append(keys)
        pins = {official[c.subset] for c in group if c.subset in official and official[c.subset] in supplied[c.source]}
        allowed = set(SPLITS)
        for c in group:  # an official train case never goes to a split its own source supplies
            if c.subset in official and official[c.subset] == "train":
                allowed -= supplied[c.source]
        pin = "test" if "test" in pins else "val" if "val" in pins else None
        if len(pins) > 1:
            move(group, "official", pin, f"official lists disagree ({', '.join(sorted(pins))}); kept {pin}")
        seen = [c.key for c in group if c.segvol_seen]
        if seen and segvol_seen == "not_test":
            allowed.discard("test")
            if pin == "test":
                move(group, "segvol_seen", "train", f"SegVol was trained on {', '.join(seen)}", away="test")
                pin = "train"
        if pin is not None:
            out[pin].extend(keys)
        else:
            free[group[0].source].append((group, allowed, seen))
    for source in sorted(free):
        groups = free[source]
        order = np.random.default_rng(_stable_seed(seed, source)).permutation(len(groups))
        n = len(groups)
        n_test = min(round(n * test_fraction), n - 1) if "test" not in supplied.get(source, ()) else 0
        n_val = min(round(n * val_fraction), n - 1 - n_test) if "val" not in supplied.get(source, ()) else 0
        want = {"test": n_test, "val": n_val}
        for idx in order:
            group, allowed, seen = groups[idx]
            target = next((s for s in ("test", "val") if want[s] > 0 and s in allowed), "train")
            if target != "train":
                want[target] -= 1
            if want["test"] > 0 and target != "test" and seen and segvol_seen == "not_test":
                move(group, "segvol_seen", target, f"drawn for test, but SegVol was trained on {', '.join(seen)}",
                     away="test")
            out[target].extend(c.key for c in group)
    result.splits = {s: sorted(keys) for s, keys in out.items()}
    return result


def round_robin_subset(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """N cases taken one source at a time in turn (sources in name order, cases in seeded order), so small
    sources are fully used before large ones dominate; fewer than N if the keys run out."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        by_source[key.split("/", 1)[0]].append(key)
    queues = []
    for source in sorted(by_source):
        items = by_source[source]
        order = np.random.default_rng(_stable_seed(seed, "subset/" + source)).permutation(len(items))
        queues.append([items[i] for i in order])
    chosen: list[str] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return sorted(chosen)


class SplitError(UserError):
    """``split.json`` is missing or not what ``segevo split`` writes."""


def read_split(path: str | Path, known: Iterable[str] | None = None) -> dict[str, Any]:
    """``split.json`` checked: ``train``/``val``/``test`` lists of case keys (when ``known`` is given, each in the
    manifest) and ``subsets`` mapping a size to keys of ``train``. Splits may overlap: tiny data sets validate
    on training cases on purpose."""
    path = Path(path)
    if not path.exists():
        raise SplitError(f"{path}: no split (run 'segevo split' first)")
    data = read_json(path, "split", SplitError)
    seen: set[str] = set()
    for name in SPLITS:
        keys = data.get(name)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise SplitError(f"{path}: '{name}' must be a list of case keys (rerun 'segevo split')")
        seen.update(keys)
    train = set(data["train"])
    subsets = data.setdefault("subsets", {})
    if not isinstance(subsets, dict) or not all(
            isinstance(v, list) and all(isinstance(k, str) and k in train for k in v) for v in subsets.values()):
        raise SplitError(f"{path}: 'subsets' must map sizes to lists of training case keys")
    unknown = sorted(seen - set(known)) if known is not None else []
    if unknown:
        raise SplitError(f"{path}: case {unknown[0]} is not in the manifest (rerun 'segevo split')")
    return data
