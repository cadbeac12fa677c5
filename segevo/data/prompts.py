"""Prompts built on the data side, from a binary target, as fixed-size arrays (no work left for the step).

Conventions are SegVol's: boxes ``[d0, h0, w0, d1, h1, w1]`` in voxel indices (inclusive ends), points
``(d, h, w)`` with label 1 positive, 0 negative and -1 padding, padded to a fixed count so samples stack.
"""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray) -> np.ndarray | None:
    """Inclusive (d0, h0, w0, d1, h1, w1) box of the non-zero voxels, or None when there are none."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        lo.append(nz[0])
        hi.append(nz[-1])
    return np.array(lo + hi, dtype=np.float32)


def jitter_box(box: np.ndarray, shape: tuple[int, ...], jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Move each face by up to ``jitter`` x the box extent on that axis, keeping the box inside the volume."""
    if jitter <= 0:
        return box
    extent = box[3:] - box[:3] + 1
    moved = box + rng.uniform(-jitter, jitter, 6) * np.concatenate([extent, extent])
    limit = np.array(shape, dtype=np.float32) - 1
    lo = np.clip(np.round(moved[:3]), 0, limit)
    hi = np.clip(np.round(moved[3:]), 0, limit)
    return np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)]).astype(np.float32)


def sample_points(mask: np.ndarray, n_positive: int, n_negative: int, pad_to: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_positive`` voxels inside the mask and ``n_negative`` outside it, padded with label -1 to ``pad_to``.

    Needs at least one foreground voxel; negatives are drawn by rejection from the whole volume (background
    dominates in practice) and are skipped if none is found quickly.
    """
    if n_positive + n_negative > pad_to:
        raise ValueError(f"{n_positive} + {n_negative} points do not fit in {pad_to} slots")
    coords = np.zeros((pad_to, 3), dtype=np.float32)
    labels = np.full(pad_to, -1, dtype=np.int64)
    fg = np.flatnonzero(mask)
    if fg.size == 0:
        raise ValueError("cannot place positive points on an empty mask")
    pos = rng.choice(fg, size=n_positive, replace=fg.size < n_positive)
    coords[:n_positive] = np.stack(np.unravel_index(pos, mask.shape), axis=1)
    labels[:n_positive] = 1
    flat = mask.reshape(-1)
    candidates = rng.integers(0, flat.size, size=max(4 * n_negative, 16))
    negatives = candidates[flat[candidates] == 0][:n_negative]
    k = negatives.size
    coords[n_positive : n_positive + k] = np.stack(np.unravel_index(negatives, mask.shape), axis=1)
    labels[n_positive : n_positive + k] = 0
    return coords, labels
