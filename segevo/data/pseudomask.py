"""SegVol's pseudo-masks: its 3D Felzenszwalb-Huttenlocher variant, the ground-truth overlay and the clean-up.

``felzenszwalb_3d`` gives exactly the partition of SegVol's pure-Python ``_felzenszwalb_python`` (same edge list,
same numpy sort, so equal costs break ties the same way) about 100x faster: numpy builds and sorts the edges,
numba runs the two union-find sweeps. The algorithm is in reference/fh/README.md, the per-case flow in
reference/segvol.md section 2.3.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from scipy import ndimage

from segevo.config import PseudoMaskConfig

_CLEANUP_MARGIN = 2  # opening then closing with the 6-neighbour cross reach 2 voxels past an id's bounding box


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"image must be a non-empty 3D array, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"image must be real-valued, got dtype {image.dtype}")
    bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if bad:
        raise ValueError(f"image has {bad} NaN/Inf voxels")


def _edge_blocks(shape: tuple[int, ...]) -> np.ndarray:
    """SegVol's 5 edge blocks in its order, one row each: (n0, n1, n2, first voxel, step to the other voxel).

    Edge t of a block joins flat voxels ``u = first + i*s1*s2 + j*s2 + k`` and ``u + step``, with (i, j, k) = t
    unravelled over (n0, n1, n2): the C order of ``np.abs(image[hi] - image[lo]).ravel()`` in SegVol's code.
    """
    a, b, c = shape
    return np.array([
        (a, b - 1, c, 0, c),                # +axis1
        (a - 1, b, c, 0, b * c),            # +axis0
        (a - 1, b - 1, c, 0, b * c + c),    # (+axis0, +axis1)
        (a - 1, b - 1, c, c, b * c - c),    # (+axis0, -axis1): (i+1, j, k) with (i, j+1, k)
        (a, b, c - 1, 0, 1),                # +axis2
    ], dtype=np.int64)


def _edge_costs(smooth: np.ndarray) -> np.ndarray:
    """Absolute float32 differences along the 5 directions, concatenated in SegVol's order, widened to float64."""
    s = smooth
    pairs = ((s[:, 1:], s[:, :-1]), (s[1:], s[:-1]), (s[1:, 1:], s[:-1, :-1]), (s[1:, :-1], s[:-1, 1:]),
             (s[:, :, 1:], s[:, :, :-1]))
    costs = np.empty(sum(hi.size for hi, _ in pairs), dtype=np.float64)
    start = 0
    for hi, lo in pairs:
        np.abs(hi - lo, out=costs[start:start + hi.size].reshape(hi.shape))
        start += hi.size
    return costs


def _threshold(costs: np.ndarray, percentile: float) -> float:
    """The percentile of the non-zero costs (numpy's linear interpolation); inf when there are none."""
    nonzero = costs[costs != 0]
    return float(np.percentile(nonzero, percentile)) if nonzero.size else np.inf


@njit(cache=True, nogil=True)
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving: any root choice gives the same partition
        x = parent[x]
    return x


@njit(cache=True, nogil=True)
def _union(parent: np.ndarray, size: np.ndarray, ra: int, rb: int) -> int:
    if size[ra] < size[rb]:
        ra, rb = rb, ra
    parent[rb] = ra
    size[ra] += size[rb]
    return ra


@njit(cache=True, nogil=True)
def _merge_below(costs: np.ndarray, threshold: float, blocks: np.ndarray, plane: int, row: int,
                 parent: np.ndarray, size: np.ndarray) -> int:
    """Step 3: merge along every edge cheaper than ``threshold`` (order-free: connected components); their count."""
    e = 0
    below = 0
    for blk in range(blocks.shape[0]):
        n0, n1, n2, first, step = blocks[blk, 0], blocks[blk, 1], blocks[blk, 2], blocks[blk, 3], blocks[blk, 4]
        for i in range(n0):
            for j in range(n1):
                u0 = first + i * plane + j * row
                for k in range(n2):
                    if costs[e] < threshold:
                        below += 1
                        ra = _find(parent, u0 + k)
                        rb = _find(parent, u0 + k + step)
                        if ra != rb:
                            _union(parent, size, ra, rb)
                    e += 1
    return below


@njit(cache=True, nogil=True)
def _compact(parent: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region id per voxel, numbered by first voxel in C order, and region sizes.

    Step 4 then runs its union-find over regions, not voxels: those arrays stay in cache.
    """
    region = np.empty(parent.size, dtype=np.int64)
    ids = np.full(parent.size, -1, dtype=np.int64)
    sizes = np.empty(parent.size, dtype=np.int64)
    n = 0
    for v in range(parent.size):
        r = _find(parent, v)
        if ids[r] < 0:
            ids[r] = n
            sizes[n] = size[r]
            n += 1
        region[v] = ids[r]
    return region, sizes[:n].copy()


@njit(cache=True, nogil=True)
def _edge_regions(region: np.ndarray, blocks: np.ndarray, plane: int, row: int, packed: np.ndarray) -> None:
    """Fill ``packed``: per edge, in edge-list order, its two region ids as ``a << 32 | b``; -1 inside one region."""
    e = 0
    for blk in range(blocks.shape[0]):
        n0, n1, n2, first, step = blocks[blk, 0], blocks[blk, 1], blocks[blk, 2], blocks[blk, 3], blocks[blk, 4]
        for i in range(n0):
            for j in range(n1):
                u0 = first + i * plane + j * row
                for k in range(n2):
                    a = region[u0 + k]
                    b = region[u0 + k + step]
                    packed[e] = -1 if a == b else (a << 32) | b
                    e += 1


@njit(cache=True, nogil=True)
def _merge_small(order: np.ndarray, start: int, packed: np.ndarray, min_size: int,
                 parent: np.ndarray, size: np.ndarray) -> None:
    """Step 4: SegVol's second sweep over the region graph, in sorted-edge order from ``start``.

    Every edge before ``start`` lies inside a region. Stops once no region is below ``min_size``: regions only
    grow, so no later edge could merge anything.
    """
    pairs = np.empty(order.size - start, dtype=np.int64)
    for idx in range(pairs.size):  # gather first: independent loads overlap, the merge loop below reads in order
        pairs[idx] = packed[order[start + idx]]
    small = 0
    for r in range(size.size):
        if size[r] < min_size:
            small += 1
    for idx in range(pairs.size):
        if small == 0:
            break
        if pairs[idx] < 0:
            continue
        ra = _find(parent, pairs[idx] >> 32)
        rb = _find(parent, pairs[idx] & 0xFFFFFFFF)
        if ra == rb:
            continue
        small_a = size[ra] < min_size
        small_b = size[rb] < min_size
        if small_a or small_b:
            small -= small_a + small_b
            if size[_union(parent, size, ra, rb)] < min_size:
                small += 1


@njit(cache=True, nogil=True)
def _relabel(parent: np.ndarray) -> np.ndarray:
    """Ids 0..R-1 in order of each set's first element."""
    labels = np.empty(parent.size, dtype=np.int32)
    ids = np.full(parent.size, -1, dtype=np.int32)
    n = 0
    for v in range(parent.size):
        r = _find(parent, v)
        if ids[r] < 0:
            ids[r] = n
            n += 1
        labels[v] = ids[r]
    return labels


def felzenszwalb_3d(image: np.ndarray, sigma: float = 0.8, min_size: int = 1000,
                    percentile: float = 25.0) -> np.ndarray:
    """SegVol's 3D Felzenszwalb-Huttenlocher: int32 region ids 0..R-1 (0 is a region, not background).

    Ids are numbered by first voxel in C order, as SegVol's are (its roots are each region's first voxel). The
    image is smoothed as float32, as SegVol's resized arrays are. Deviation: a constant image (no non-zero edge
    cost, where SegVol's percentile of nothing raises) is one region.
    """
    image = np.asarray(image)
    _check_image(image)
    smooth = ndimage.gaussian_filter(image.astype(np.float32, copy=False), sigma=sigma)
    costs = _edge_costs(smooth)
    blocks = _edge_blocks(image.shape)
    plane, row = image.shape[1] * image.shape[2], image.shape[2]
    with ThreadPoolExecutor(max_workers=1) as pool:
        # numpy's default (unstable) sort, on the whole edge list: step 4 needs SegVol's exact tie order. It is
        # the slowest step and releases the GIL, so steps 3 and the region graph are built meanwhile.
        sorting = pool.submit(np.argsort, costs)
        threshold = _threshold(costs, percentile)
        parent = np.arange(image.size, dtype=np.int64)
        size = np.ones(image.size, dtype=np.int64)
        below = _merge_below(costs, threshold, blocks, plane, row, parent, size)
        region, sizes = _compact(parent, size)
        packed = np.empty(costs.size, dtype=np.int64)
        _edge_regions(region, blocks, plane, row, packed)
        order = sorting.result()
    merged = np.arange(sizes.size, dtype=np.int64)
    _merge_small(order, below, packed, min_size, merged, sizes)
    return _relabel(merged)[region].reshape(image.shape)


def combine_gt_fh(fh: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """SegVol's overlay: voxels where ``gt[k] == 1`` get id ``max(fh) + 1 + k``; later channels win overlaps.

    Every channel takes an id whether or not it is present, so an id always names the same class channel.
    """
    fh, gt = np.asarray(fh), np.asarray(gt)
    if gt.ndim != fh.ndim + 1 or gt.shape[1:] != fh.shape:
        raise ValueError(f"ground truth must be (K, *{fh.shape}), got shape {gt.shape}")
    out = fh.astype(np.int32)
    first = int(fh.max()) + 1
    for k in range(gt.shape[0]):
        out[gt[k] == 1] = first + k
    return out


def cleanse_pseudo_label(pseudo: np.ndarray, fraction: float = 0.001) -> np.ndarray:
    """SegVol's training-time clean-up, returned as a new array; -1 marks dropped voxels.

    Ids covering fewer than ``fraction`` of the voxels become -1. Then, id by id in ascending order on the current
    array: opening, closing, drop components below the same threshold, and write the result back over the id's
    old voxels. A closing can claim voxels of other ids, so the order matters and is kept. Each id is processed
    inside its bounding box (grown by the operators' reach): its voxels only shrink before its turn.
    """
    out = np.array(pseudo)
    if out.dtype.kind not in "if":
        raise ValueError(f"pseudo label must be signed integer or float, got dtype {out.dtype}")
    threshold = out.size * fraction
    values, inverse, counts = np.unique(out, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(out.shape)
    small = counts < threshold
    out[small[inverse]] = -1
    keep = ~small & (values != -1)
    boxes = ndimage.find_objects(np.where(keep[inverse], inverse + 1, 0), max_label=values.size)
    for idx in np.flatnonzero(keep):
        crop = out[tuple(slice(max(s.start - _CLEANUP_MARGIN, 0), min(s.stop + _CLEANUP_MARGIN, n))
                         for s, n in zip(boxes[idx], out.shape, strict=True))]
        mask = crop == values[idx]
        processed = ndimage.binary_closing(ndimage.binary_opening(mask))
        components, count = ndimage.label(processed)
        big = np.bincount(components.ravel(), minlength=count + 1) >= threshold
        big[0] = False
        crop[mask] = -1
        crop[big[components]] = values[idx]
    return out


def resize_area(image: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """MONAI ``Resize(spatial_size=grid)`` with its default ``mode='area'`` (no anti-aliasing), as SegVol's
    ``pseudo_mask_process.py`` resizes the image before FH: each output voxel is the mean of its adaptive
    average-pooling window (torch ``interpolate(mode='area')``); float32."""
    if image.shape == grid:
        return image.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(t, size=grid, mode="area")[0, 0].numpy()


def _resize_nearest(channels: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Nearest neighbour at voxel centres, per channel (keeps labels binary; SegVol's area mode blends them)."""
    index = [np.minimum(((np.arange(m) + 0.5) * n / m).astype(np.intp), n - 1)
             for n, m in zip(channels.shape[1:], grid, strict=True)]
    return channels[(slice(None), *np.ix_(*index))]


def pseudomask_case(image: np.ndarray, label_channels: np.ndarray,
                    cfg: PseudoMaskConfig | None = None) -> np.ndarray:
    """One case, SegVol's way: int32 pseudo mask on ``cfg.grid`` (FH regions, then ground truth painted on top).

    ``image`` is the intensity-normalised (X, Y, Z) array, ``label_channels`` its binary (K, X, Y, Z) ground truth;
    ``cfg`` defaults to SegVol's settings.
    The image is resized with MONAI's default area mode, as SegVol does; the labels by nearest neighbour, a
    deliberate deviation from SegVol's area mode, which leaves fractional values that its overlay (``== 1``) then
    drops at every organ border.
    """
    image, labels = np.asarray(image), np.asarray(label_channels)
    _check_image(image)
    if labels.ndim != 4 or labels.shape[1:] != image.shape:
        raise ValueError(f"label channels must be (K, *{image.shape}) like the image, got shape {labels.shape}")
    if np.count_nonzero((labels != 0) & (labels != 1)):
        raise ValueError("label channels must be binary (0/1)")
    cfg = cfg or PseudoMaskConfig()
    grid = tuple(cfg.grid)
    fh = felzenszwalb_3d(resize_area(image, grid), cfg.sigma, cfg.min_size, cfg.percentile)
    return combine_gt_fh(fh, _resize_nearest(labels, grid))
