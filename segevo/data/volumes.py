"""Reading and counting full-size volumes without full-size temporaries: what keeps a data-stage worker near
2x its float32 volume (``bench/preprocess_large.py``) instead of the 3.5x of nibabel's float64 defaults."""

from __future__ import annotations

from typing import Any

import numpy as np


def scaled_float32(proxy: Any) -> np.ndarray:
    """The scaled voxels as float32 with the values of nibabel's float64 ``get_fdata`` cast to float32 (what
    MONAI's reader gives SegVol), computed one slice at a time: peak = stored array + the float32 result, not
    the stored array + a float64 volume + its float32 copy."""
    stored = np.asanyarray(proxy.get_unscaled())
    if stored.dtype.kind not in "iuf":  # complex, RGB, bool: refused by the caller with its own message
        return stored
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope == 1 and inter == 0 and stored.dtype.kind == "f":  # float64 is cast and range-checked by the caller
        return stored
    out = np.empty(stored.shape, dtype=np.float32)  # C order: the pseudo-mask resize needs no other copy
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported as such by the caller
        for i in range(stored.shape[0]):
            out[i] = stored[i] * slope + inter  # float64 arithmetic per slab, as get_fdata does
    return out


def value_counts(array: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(array.ravel())`` for a non-negative integer volume, a slice at a time: bincount widens its
    input to int64, 8 bytes per voxel, twice a float32 CT."""
    counts = np.zeros(max(minlength, int(array.max(initial=0)) + 1), dtype=np.int64)
    for k in range(array.shape[-1]):
        counts += np.bincount(array[..., k].ravel(order="K"), minlength=counts.size)
    return counts
