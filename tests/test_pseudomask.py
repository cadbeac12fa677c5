"""Pseudo-masks: SegVol's exact FH partition (reference case and a condensed port), overlay, clean-up, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segevo.config import ConfigError, PseudoMaskConfig, parse_config
from segevo.data.pseudomask import cleanse_pseudo_label, combine_gt_fh, felzenszwalb_3d, pseudomask_case


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: the (a, b) label pairs form a bijection."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return a.shape == b.shape and len(pairs) == len(np.unique(a)) == len(np.unique(b))


def segvol_fh(image: np.ndarray, sigma: float, min_size: int, kind: str = "quicksort") -> np.ndarray:
    """SegVol's ``_felzenszwalb_python`` condensed: same edge list, same sort, same two sweeps, same relabel.

    ``kind`` other than numpy's default breaks cost ties another way, to show where that changes the result.
    """
    image = ndimage.gaussian_filter(image, sigma=sigma)
    voxel = np.arange(image.size).reshape(image.shape)
    blocks = [(np.s_[:, 1:], np.s_[:, :-1]), (np.s_[1:], np.s_[:-1]), (np.s_[1:, 1:], np.s_[:-1, :-1]),
              (np.s_[1:, :-1], np.s_[:-1, 1:]), (np.s_[:, :, 1:], np.s_[:, :, :-1])]
    costs = np.hstack([np.abs(image[hi] - image[lo]).ravel() for hi, lo in blocks]).astype(float)
    edges = np.vstack([np.c_[voxel[hi].ravel(), voxel[lo].ravel()] for hi, lo in blocks])
    order = np.argsort(costs, kind=kind)
    edges, costs = edges[order], costs[order]
    threshold = np.percentile(costs[costs != 0], 25)
    parent, size = list(range(image.size)), [1] * image.size

    def find(p: int) -> int:
        while parent[p] != p:
            p = parent[p]
        return p

    def join(a: int, b: int) -> None:
        root, other = min(a, b), max(a, b)
        parent[other] = root
        size[root] += size[other]

    for (u, v), cost in zip(edges.tolist(), costs.tolist(), strict=True):
        a, b = find(u), find(v)
        if a != b and cost < threshold:
            join(a, b)
    for u, v in edges.tolist():
        a, b = find(u), find(v)
        if a != b and (size[a] < min_size or size[b] < min_size):
            join(a, b)
    return np.unique([find(p) for p in range(image.size)], return_inverse=True)[1].reshape(image.shape)


def naive_cleanse(pseudo: np.ndarray, fraction: float) -> np.ndarray:
    """SegVol's ``cleanse_pseudo_label`` line by line, on whole volumes."""
    seg = np.array(pseudo)
    threshold = seg.size * fraction
    for value in np.unique(seg):
        if (seg == value).sum() < threshold:
            seg[seg == value] = -1
    for label in np.unique(seg):
        if label == -1:
            continue
        mask = seg == label
        processed = ndimage.binary_closing(ndimage.binary_opening(mask))
        labeled, n = ndimage.label(processed)
        sizes = ndimage.sum(processed, labeled, range(n + 1))
        for small in np.where(sizes < threshold)[0]:
            processed[labeled == small] = False
        seg[mask] = -1
        seg[processed] = label
    return seg


def smooth_field(shape: tuple[int, ...], seed: int, sigma: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), sigma).astype(np.float32)


def test_same_partition_as_segvol_reference(reference):
    path = reference / "fh" / "case_ct_256x256x32.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    case = np.load(path)
    labels = felzenszwalb_3d(case["image"])
    assert labels.dtype == np.int32 and labels.shape == case["segvol_fh"].shape
    assert labels.max() == 64
    assert same_partition(labels, case["segvol_fh"])
    assert np.array_equal(labels, case["segvol_fh"])  # numbering too: first voxel in C order, as SegVol's


@pytest.mark.parametrize(("seed", "sigma", "levels", "min_size"),
                         [(0, 0.8, None, 20), (1, 0.0, 16, 10), (2, 0.0, 10, 25), (4, 0.0, 10, 10)])
def test_matches_segvol_port_including_ties(seed, sigma, levels, min_size):
    image = smooth_field((10, 12, 8), seed, sigma=1.0)
    if levels is not None:  # few grey levels: costs tie, so only SegVol's exact sort order reproduces step 4
        image = np.floor(image / image.max() * levels)
    expected = segvol_fh(image, sigma, min_size)
    assert np.array_equal(felzenszwalb_3d(image, sigma=sigma, min_size=min_size), expected)
    if levels is not None:  # and the case does tell: another tie order gives another partition
        assert not same_partition(segvol_fh(image, sigma, min_size, kind="stable"), expected)


def test_min_size_respected():
    field = smooth_field((20, 24, 10), 3, sigma=2.0)  # plateaus plus noise: many regions before the second sweep
    image = np.digitize(field, np.quantile(field, [0.2, 0.4, 0.6, 0.8])) + 0.05 * smooth_field(field.shape, 6, 0)
    assert len(np.unique(felzenszwalb_3d(image, min_size=1))) > 100
    labels = felzenszwalb_3d(image, min_size=150)
    sizes = np.bincount(labels.ravel())
    assert sizes.min() >= 150 and len(sizes) > 3
    assert np.array_equal(np.unique(labels), np.arange(len(sizes)))
    assert np.all(felzenszwalb_3d(smooth_field((5, 6, 4), 4), min_size=1000) == 0)  # smaller than min_size: one
    assert np.all(felzenszwalb_3d(np.full((4, 5, 6), 3.0), min_size=2) == 0)  # constant: one region


def test_combine_gt_fh_overlays_channels_in_order():
    fh = np.zeros((4, 4, 4), dtype=np.int32)
    fh[2:] = 5
    gt = np.zeros((3, 4, 4, 4), dtype=np.uint8)
    gt[0, :2, :2] = 1
    gt[2, 1:3, 1:3] = 1  # overlaps channel 0: the later channel wins
    out = combine_gt_fh(fh, gt)
    assert out.dtype == np.int32 and fh.max() == 5  # input untouched
    assert out[0, 0, 0] == 6 and out[1, 1, 1] == 8 and out[2, 2, 2] == 8 and out[3, 3, 3] == 5
    assert 7 not in out  # the empty channel still takes its id
    with pytest.raises(ValueError, match="ground truth must be"):
        combine_gt_fh(fh, gt[:, :3])


@pytest.mark.parametrize("seed", range(4))
def test_cleanse_equals_naive_segvol(seed):
    shape = (18, 20, 14)
    pseudo = np.digitize(smooth_field(shape, seed, sigma=2.0), np.linspace(0.35, 0.65, 7)).astype(np.int32)
    rng = np.random.default_rng(seed)
    pseudo[rng.random(shape) < 0.03] = 9  # specks: a small id dropped outright
    pseudo[rng.random(shape) < 0.01] = -1
    expected = naive_cleanse(pseudo, 0.004)
    out = cleanse_pseudo_label(pseudo, 0.004)
    assert np.array_equal(out, expected)
    assert 9 not in out and len(np.unique(out)) > 2
    kept = (pseudo >= 0) & (pseudo != 9)
    assert np.any(kept & (out >= 0) & (out != pseudo))  # closings claimed other ids' voxels: the order matters


def test_cleanse_rejects_unsigned():
    with pytest.raises(ValueError, match="signed integer or float"):
        cleanse_pseudo_label(np.zeros((3, 3, 3), dtype=np.uint8))


def test_pseudomask_case_on_grid():
    image = smooth_field((24, 20, 12), 5)
    labels = np.zeros((2, 24, 20, 12), dtype=np.uint8)
    labels[0, 4:12, 4:10, 2:8] = 1
    labels[1, 16:20, 12:16, 6:10] = 1
    out = pseudomask_case(image, labels, PseudoMaskConfig(grid=(12, 10, 6), min_size=20))
    assert out.shape == (12, 10, 6) and out.dtype == np.int32
    # nearest at voxel centres halves each axis exactly: output voxel m reads input voxel 2m + 1
    assert np.array_equal(out == out.max() - 1, np.pad(np.ones((4, 3, 3), bool), ((2, 6), (2, 5), (1, 2))))
    assert np.array_equal(out == out.max(), np.pad(np.ones((2, 2, 2), bool), ((8, 2), (6, 2), (3, 1))))
    same = PseudoMaskConfig(grid=image.shape, min_size=20)  # on its own grid: FH then overlay, nothing resized
    assert np.array_equal(pseudomask_case(image, labels, same), combine_gt_fh(felzenszwalb_3d(image, min_size=20),
                                                                             labels))


@pytest.mark.parametrize(
    ("image", "labels", "message"),
    [
        (np.zeros((8, 8)), np.zeros((1, 8, 8)), "non-empty 3D"),
        (np.zeros((8, 8, 0)), np.zeros((1, 8, 8, 0)), "non-empty 3D"),
        (np.full((8, 8, 8), np.nan), np.zeros((1, 8, 8, 8)), "512 NaN/Inf"),
        (np.concatenate([np.full((1, 8, 8), -np.inf), np.zeros((7, 8, 8))]), np.zeros((1, 8, 8, 8)), "64 NaN/Inf"),
        (np.zeros((8, 8, 8)), np.zeros((1, 8, 8, 7)), r"label channels must be \(K, \*\(8, 8, 8\)\)"),
        (np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), "label channels must be"),
        (np.zeros((8, 8, 8)), np.full((1, 8, 8, 8), 2), "binary"),
        (np.zeros((8, 8, 8), dtype=bool), np.zeros((1, 8, 8, 8)), "real-valued"),
    ],
)
def test_bad_input(image, labels, message):
    with pytest.raises(ValueError, match=message):
        pseudomask_case(image, labels, PseudoMaskConfig(grid=(4, 4, 4)))


def test_config_section():
    cfg = parse_config({}).pseudomask
    assert (cfg.sigma, cfg.min_size, cfg.percentile, cfg.grid, cfg.cleanup_fraction) == (0.8, 1000, 25.0,
                                                                                          (256, 256, 32), 0.001)
    with pytest.raises(ConfigError, match="pseudomask: .*grid"):
        parse_config({"pseudomask": {"grid": [256, 0, 32]}})
    with pytest.raises(ConfigError, match=r"pseudomask\.percentile"):
        parse_config({"pseudomask": {"percentile": 0}})
