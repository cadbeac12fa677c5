"""Where the zoom-in looks: the ROI around the coarse mask and the sliding windows that cover it.

Two ROI rules (``inference.roi_rule``), both starting from the bounding box of the coarse mask and growing an
axis shorter than the window by half the shortfall on each side:

- ``clip`` (SegVol's ``logits2roi_coor``): the grown box is clipped to the volume, so near an edge the ROI can
  stay shorter than the window (the window is then zero padded: less real context).
- ``shift``: the grown box is moved back inside the volume, keeping the window's size where the volume allows.

Two window grids (``inference.window_grid``):

- ``roi`` (SegVol): MONAI's sliding-window grid over the ROI alone; an ROI shorter than the window is zero padded
  on both sides (half before, the rest after) and the window sees only the ROI (zeros elsewhere).
- ``volume``: one grid over the whole volume (zero padded at the end where it is shorter than a window), windows
  that overlap the ROI; every query of a volume then lands on the same windows, so each is encoded once.

A :class:`Window` says both things: where its first voxel lies in the volume (negative where padded before) and
which part of the volume it may see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from segevo.data.prompts import bounding_box

Array = TypeVar("Array", torch.Tensor, np.ndarray)
Box = tuple[tuple[int, int], ...]  # (start, end exclusive) per axis


@dataclass(frozen=True)
class Window:
    origin: tuple[int, ...]  # the window's first voxel in volume coordinates
    region: Box  # the part of the volume the window sees; zeros elsewhere


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """MONAI's sliding-window grid on one axis: stride ``window * (1 - overlap)``, the last window flush with
    the end; ``size`` is at least ``window`` (the caller pads)."""
    if size <= window:
        return [0]
    stride = max(int(window * (1 - overlap)), 1)
    n = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def grow_roi(mask: np.ndarray, window: Sequence[int], rule: str = "clip") -> Box | None:
    """The zoom-in ROI of a coarse ``mask`` under ``rule`` (``clip`` or ``shift``), None when it is empty."""
    box = bounding_box(mask)
    if box is None:
        return None
    roi = []
    for n, w, lo, hi in zip(mask.shape, window, box[:3].astype(int), box[3:].astype(int), strict=True):
        start, end = int(lo), int(hi) + 1
        deficit = w - (end - start)
        if deficit > 0 and rule == "clip":
            start, end = max(0, start - deficit // 2), min(n, end + deficit // 2)
        elif deficit > 0:
            start = max(0, min(start - deficit // 2, n - w))
            end = min(n, start + w)
        roi.append((start, end))
    return tuple(roi)


def plan_windows(shape: Sequence[int], roi: Box, window: Sequence[int], overlap: float, grid: str) -> list[Window]:
    """The windows that cover ``roi`` on the ``grid`` (``roi`` or ``volume``), in MONAI's (C) order."""
    axes: list[list[int]] = []
    if grid == "roi":
        for w, (s, e) in zip(window, roi, strict=True):
            size = e - s
            before = max(w - size, 0) // 2
            axes.append([s - before + a for a in window_starts(max(size, w), w, overlap)])
        region = roi
    else:
        for n, w, (s, e) in zip(shape, window, roi, strict=True):
            axes.append([a for a in window_starts(max(n, w), w, overlap) if a < e and a + w > s])
        region = tuple((0, int(n)) for n in shape)
    return [Window((a, b, c), region) for a in axes[0] for b in axes[1] for c in axes[2]]


def window_crop(array: Array, win: Window, size: Sequence[int]) -> Array:
    """The window's view of a (D, H, W) tensor or array: its part inside the window's region, zeros elsewhere."""
    lo = [max(o, r0) for o, (r0, _) in zip(win.origin, win.region, strict=True)]
    hi = [min(o + w, r1) for o, w, (_, r1) in zip(win.origin, size, win.region, strict=True)]
    if all(a == o for a, o in zip(lo, win.origin, strict=True)) and \
            all(b - a == w for a, b, w in zip(lo, hi, size, strict=True)):
        return array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    out = array.new_zeros(tuple(size)) if isinstance(array, torch.Tensor) else np.zeros(tuple(size), array.dtype)
    if all(a < b for a, b in zip(lo, hi, strict=True)):
        inner = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, win.origin, strict=True))
        out[inner] = array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    return out


def overlap_slices(win: Window, size: Sequence[int], roi: Box) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where a window's output lands: the part of the window inside the ROI, as slices in ROI coordinates and in
    window coordinates (None when the window misses the ROI)."""
    lo = [max(o, s) for o, (s, _) in zip(win.origin, roi, strict=True)]
    hi = [min(o + w, e) for o, w, (_, e) in zip(win.origin, size, roi, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return None
    in_roi = tuple(slice(a - s, b - s) for a, b, (s, _) in zip(lo, hi, roi, strict=True))
    in_win = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, win.origin, strict=True))
    return in_roi, in_win
