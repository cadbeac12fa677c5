"""What the data holds, nnU-Net-fingerprint style: per source, modality and class, how many cases and voxels,
the spacing and shape, and the raw intensities inside the class, so a user sees the split before training on it.

Intensities are measured by ``segevo preprocess`` on the raw image (HU for CT) while it reads each case, in one
pass over the volume a slab at a time: exact count, sum and sum of squares per label value, and a 4096-bin
histogram per value over the case's own range for the percentiles (0.5, 50, 99.5: nnU-Net's), so the pass costs
neither a sort nor a full-size temporary. Across cases, mean and std are pooled exactly; percentiles are the
median of the cases' percentiles.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from segevo.data.manifest import PrepCase

BINS = 4096
PERCENTILES = (0.5, 50.0, 99.5)
INTENSITY_STATS = ("mean", "std", "p00_5", "p50", "p99_5")  # nnU-Net's fingerprint statistics
COLUMNS = ("split", "source", "modality", "class", "cases", "voxels", "spacing_d", "spacing_h", "spacing_w",
           "shape_d", "shape_h", "shape_w", *INTENSITY_STATS)


def _percentiles(hist: np.ndarray, lo: float, width: float) -> list[float]:
    """Percentiles from a histogram: the centre of the bin where the cumulative count crosses each level."""
    cumulative = np.cumsum(hist)
    return [float(lo + (np.searchsorted(cumulative, q / 100 * cumulative[-1]) + 0.5) * width) for q in PERCENTILES]


def intensity_stats(image: np.ndarray, label: np.ndarray, values: Iterable[int]) -> dict[int, list[float]]:
    """Per label value: [count, sum, sum of squares, p0.5, p50, p99.5] of ``image`` where ``label`` has it.

    Both are raw-grid arrays of one shape, walked along axis 0: a label map in another memory order is made
    C-contiguous first (its own size, a quarter of a float32 image at most for uint8), since strided slabs
    would make the pass 20x slower.
    """
    values = sorted({int(v) for v in values} - {0})
    if not values:
        return {}
    label = np.ascontiguousarray(label)
    top = max(values) + 1
    lo, hi = float(image.min()), float(image.max())
    width = (hi - lo) / BINS or 1.0
    count = np.zeros(top, np.int64)
    total = np.zeros(top)
    squares = np.zeros(top)
    hist = np.zeros(top * BINS, np.int64)
    for i in range(image.shape[0]):
        slab = np.ascontiguousarray(label[i]).ravel()
        inside = np.flatnonzero((slab > 0) & (slab < top))  # background, most of a volume, is not summarised
        lab = slab[inside].astype(np.intp)
        img = np.ascontiguousarray(image[i]).ravel()[inside].astype(np.float64)
        count += np.bincount(lab, minlength=top)
        total += np.bincount(lab, weights=img, minlength=top)
        squares += np.bincount(lab, weights=img * img, minlength=top)
        bins = np.minimum(((img - lo) / width).astype(np.intp), BINS - 1)
        hist += np.bincount(lab * BINS + bins, minlength=top * BINS)
    hist = hist.reshape(top, BINS)
    return {v: [int(count[v]), float(total[v]), float(squares[v]), *_percentiles(hist[v], lo, width)]
            for v in values if count[v]}


def case_intensity(stats: Mapping[int, list[float]], names: Mapping[int, str]) -> dict[str, list[float]]:
    """Per class name (values merged into one class pooled): [count, sum, sum of squares, p0.5, p50, p99.5];
    the percentiles of a merged class are those of its largest value."""
    out: dict[str, list[float]] = {}
    for value, row in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        name = names[value]
        if name in out:
            out[name][:3] = [a + b for a, b in zip(out[name][:3], row[:3], strict=True)]
        else:
            out[name] = list(row)
    return out


def _summarise(group: Sequence[tuple[PrepCase, str]]) -> dict[str, Any]:
    rows = [(case, case.intensity.get(name)) for case, name in group]
    n = sum(r[0] for _, r in rows if r)
    mean = sum(r[1] for _, r in rows if r) / n if n else float("nan")
    var = max(sum(r[2] for _, r in rows if r) / n - mean * mean, 0.0) if n else float("nan")
    pct = np.median([r[3:6] for _, r in rows if r], axis=0) if n else [float("nan")] * 3
    spacing = np.median([c.spacing for c, _ in rows], axis=0)
    shape = np.median([c.shape for c, _ in rows], axis=0)
    stats = dict(zip(INTENSITY_STATS, [mean, var ** 0.5, *pct], strict=True))
    return {"cases": len(rows), "voxels": sum(int(c.voxels.get(name, 0)) for c, name in group),
            **{f"spacing_{a}": round(float(s), 3) for a, s in zip("dhw", spacing, strict=True)},
            **{f"shape_{a}": int(s) for a, s in zip("dhw", shape, strict=True)},
            **{k: round(float(v), 3) for k, v in stats.items()}}


def data_summary(cases: Iterable[PrepCase], splits: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One row per (split, source, modality, class), plus the split ``all``; medians of spacing and shape
    ((D, H, W) after the crop), pooled intensity mean/std, median intensity percentiles."""
    by_key = {c.key: c for c in cases}
    where = {"all": list(by_key), **{s: list(keys) for s, keys in splits.items()}}
    rows = []
    for split, keys in where.items():
        groups: dict[tuple[str, str, str], list[tuple[PrepCase, str]]] = defaultdict(list)
        for key in keys:
            case = by_key[key]
            for name in case.classes:
                groups[(case.source, case.modality, name)].append((case, name))
        for (source, modality, name), group in sorted(groups.items()):
            rows.append({"split": split, "source": source, "modality": modality, "class": name,
                         **_summarise(group)})
    return rows
