"""Patient-level train/val/test splits and round-robin balanced training subsets.

All cases of a patient land in one split (several scans of one person in train and test would leak).
The assignment is a pure function of the case list and the seed: patients are sorted, then shuffled per
source with a seeded generator, so adding a source does not reshuffle the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segevo.errors import UserError
from segevo.io import read_json

SPLITS = ("train", "val", "test")


def _stable_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def split_patients(cases: Iterable[tuple[str, str, str]], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, list[str]]:
    """``cases`` are (key, source, patient_id); returns split name -> sorted case keys.

    Fractions apply to patients within each source (rounded, with at least one training patient per
    source); a source with a single patient goes to train.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction} must be >= 0 and sum below 1")
    by_source: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key, source, patient in cases:
        by_source[source][f"{source}/{patient}"].append(key)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for source in sorted(by_source):
        patients = sorted(by_source[source])
        order = np.random.default_rng(_stable_seed(seed, source)).permutation(len(patients))
        n = len(patients)
        n_test = min(round(n * test_fraction), n - 1)
        n_val = min(round(n * val_fraction), n - 1 - n_test)
        for rank, idx in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            out[split].extend(by_source[source][patients[idx]])
    return {s: sorted(keys) for s, keys in out.items()}


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
