"""Segmentation metrics with explicit empty-mask rules, and bootstrap confidence intervals over cases.

Empty-ground-truth rule (Dice and NSD alike): a structure that is absent and not predicted scores 1 (nothing to
find, nothing found); absent but predicted, or present but missed entirely, scores 0. Both metrics are computed
with MONAI's implementations where both masks are non-empty.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

EMPTY_RULE = ("Dice = 2|P∩G| / (|P| + |G|); an absent structure that is not predicted scores 1, "
              "one predicted where there is none (or one missed entirely) scores 0")


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_bool(pred, "prediction"), _as_bool(truth, "ground truth")
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from the ground truth's {t.shape}")
    return p, t


def _empty_score(p: np.ndarray, t: np.ndarray) -> float | None:
    has_p, has_t = bool(p.any()), bool(t.any())
    if has_p and has_t:
        return None
    return 1.0 if has_p == has_t else 0.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary 3D masks (MONAI ``compute_dice``), with the empty-mask rule above."""
    p, t = _pair(pred, truth)
    empty = _empty_score(p, t)
    if empty is not None:
        return empty
    import torch
    from monai.metrics import compute_dice

    value = compute_dice(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None], ignore_empty=False)
    return float(value.item())


def nsd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (MONAI ``compute_surface_dice``), voxel ``spacing`` in mm."""
    p, t = _pair(pred, truth)
    if tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    empty = _empty_score(p, t)
    if empty is not None:
        return empty
    import warnings

    import torch
    from monai.metrics import compute_surface_dice

    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                     class_thresholds=[float(tolerance_mm)], include_background=True,
                                     spacing=[float(s) for s in spacing])
    return float(value.item())


def case_values(rows: Iterable[dict], metric: str) -> dict[str, float]:
    """Per case, the mean of ``metric`` over its rows (rows without a value skipped): the unit the bootstrap
    resamples, so a case with many rows weighs as much as one with few."""
    per_case: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            per_case[r["case"]].append(float(r[metric]))
    return {case: float(np.mean(v)) for case, v in per_case.items()}


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of per-case values (resampling cases with replacement).

    One value gives a degenerate interval (the value itself); NaNs are refused rather than silently dropped.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-D sequence of per-case values")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap values contain NaN or Inf")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(lo), float(hi)
