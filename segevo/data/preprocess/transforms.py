"""SegVol's intensity and geometry transforms as pure array functions (nnU-Net's ``run_case_npy`` part): no
files, no case table, so the data stages, predict and the tests run the very same arithmetic.

The recipe they make up is in :mod:`segevo.data.preprocess`; :mod:`segevo.data.preprocess.geometry` maps
volumes between the raw grid and the prep grid with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segevo.data.cases import CaseError


def foreground_normalize(image: np.ndarray, inplace: bool = False) -> np.ndarray:
    """SegVol's ``ForegroundNormalization`` (float32 in, float32 out, same arithmetic as its numpy code).

    Memory: the voxels above the mean are the one copy made (the percentiles partition it in place after the
    order-sensitive mean and std); ``inplace`` clips into ``image`` itself instead of a new volume.
    """
    flat = image.ravel(order="K")  # no copy, whatever the memory order (nibabel's arrays are Fortran-ordered)
    foreground = flat[flat > np.mean(flat)]
    if foreground.size == 0:
        raise CaseError("image is constant (no voxel above the mean)")
    mean, std = np.mean(foreground), np.std(foreground)
    lower, upper = np.percentile(foreground, [0.05, 99.95], overwrite_input=True)
    del foreground
    out = np.clip(image, lower.astype(image.dtype), upper.astype(image.dtype), out=image if inplace else None)
    out -= mean
    out /= max(std, 1e-8)
    return out


def minmax(image: np.ndarray) -> np.ndarray:
    """SegVol's ``MinMaxNormalization``: ``x - min``, then divided by ``max(max, 1e-8)``; in place if float32."""
    out = image if image.dtype == np.float32 else image.astype(np.float32)
    out -= out.min()
    out /= np.clip(out.max(), 1e-8, None)
    return out


def normalise_intensity(image: np.ndarray, normalised: bool, inplace: bool = False) -> np.ndarray:
    """:func:`~segevo.data.preprocess.case.segvol_intensity` for a bare array; the input is modified only with
    ``inplace``."""
    try:
        out = image if normalised else foreground_normalize(image, inplace)
    except ValueError as err:
        raise CaseError(str(err)) from None
    return minmax(out.copy() if out is image and not inplace else out)


def to_segvol_axes(array: np.ndarray) -> np.ndarray:
    """SegVol's ``DimTranspose`` (``np.swapaxes(-1, -3)``): raw (X, Y, Z) -> (D, H, W) = (Z, Y, X). A view."""
    return np.swapaxes(array, -1, -3)


def foreground_box(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI ``CropForeground`` with ``select_fn = x > 0`` and no margin: (start, end) per axis, end exclusive."""
    mask = image > 0
    start, end = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            raise ValueError("no foreground voxel (> 0 after min-max): the image is constant")
        start.append(int(hit[0]))
        end.append(int(hit[-1]) + 1)
    return tuple(start), tuple(end)


def crop_slices(start: Sequence[int], end: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, e) for s, e in zip(start, end, strict=True))


def resize_linear(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear, ``align_corners=False`` (MONAI's ``Resize(mode='trilinear')``); float32."""
    shape = tuple(int(s) for s in shape)
    if image.shape == shape:
        return np.array(image, dtype=np.float32)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def nearest_index(n: int, m: int) -> np.ndarray:
    """Source index of each of ``m`` output voxels resampling ``n`` by nearest neighbour at voxel centres."""
    return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.intp), n - 1)


def resize_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest neighbour at voxel centres (torch's ``nearest-exact``) over the last ``len(shape)`` axes."""
    shape = tuple(int(s) for s in shape)
    lead = array.ndim - len(shape)
    index = np.ix_(*(nearest_index(n, m) for n, m in zip(array.shape[lead:], shape, strict=True)))
    return array[(*(slice(None),) * lead, *index)]


def class_locations(label: np.ndarray, per_class: int = 1024, seed: int = 0) -> np.ndarray:
    """Up to ``per_class`` random voxels of every class as (class, d, h, w) rows (int32): the loader centres
    positive crops on them in O(1) instead of searching a 512x512x300 label map for a small organ."""
    flat = np.flatnonzero(label)
    values = label.ravel()[flat]
    order = np.argsort(values, kind="stable")
    bounds = np.cumsum(np.bincount(values, minlength=int(label.max()) + 1))
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(1, len(bounds)):
        members = order[bounds[k - 1] : bounds[k]]
        if members.size:
            pick = flat[members if members.size <= per_class else rng.choice(members, per_class, replace=False)]
            rows.append(np.column_stack([np.full(pick.size, k), *np.unravel_index(pick, label.shape)]))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
