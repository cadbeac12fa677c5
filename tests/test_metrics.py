"""Dice, NSD and the bootstrap against hand-computed cases, including empty masks."""

from __future__ import annotations

import numpy as np
import pytest

from segevo.metrics import bootstrap_ci, dice, nsd


def cube(start: int, shape=(8, 8, 8)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[start : start + 3, 2:5, 2:5] = True
    return m


def test_dice_hand_computed():
    a, b = cube(2), cube(3)  # 27 voxels each, 18 shared
    assert dice(a, b) == pytest.approx(2 * 18 / 54, abs=1e-6)
    assert dice(a, a) == pytest.approx(1.0)
    assert dice(a, cube(5)) == 0.0


def test_empty_mask_rule():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert dice(empty, empty) == 1.0 and nsd(empty, empty, (1, 1, 1), 1.0) == 1.0
    assert dice(full, empty) == 0.0 and nsd(full, empty, (1, 1, 1), 1.0) == 0.0
    assert dice(empty, full) == 0.0 and nsd(empty, full, (1, 1, 1), 1.0) == 0.0


def test_nsd_hand_computed_with_spacing():
    # 26 surface voxels per 3x3x3 cube; one slice apart, 16 of each lie on the other's surface: 32 / 52.
    # Each cube's shared-slice centre is 1 voxel (in-plane) from the other's surface, the end slices 1 slice away.
    a, b = cube(2), cube(3)
    assert nsd(a, b, (1, 1, 1), 0.0) == pytest.approx(32 / 52, abs=1e-6)
    assert nsd(a, b, (1, 1, 1), 1.0) == pytest.approx(1.0)
    assert nsd(a, b, (2, 1, 1), 0.5) == pytest.approx(32 / 52, abs=1e-6)
    assert nsd(a, b, (2, 1, 1), 1.5) == pytest.approx(34 / 52, abs=1e-6)  # slices are 2 mm apart
    assert nsd(a, b, (2, 1, 1), 2.0) == pytest.approx(1.0)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="differs"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="3D"):
        dice(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(cube(2), cube(2), (1, 1, 1), -1)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [0.2, 0.9, 0.5, 0.7, 0.1, 0.8]
    first = bootstrap_ci(values, seed=3)
    assert first == bootstrap_ci(values, seed=3)
    assert first != bootstrap_ci(values, seed=4)
    mean, lo, hi = first
    assert mean == pytest.approx(np.mean(values)) and lo < mean < hi and lo >= 0.1 and hi <= 0.9
    assert bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)


def test_bootstrap_refuses_bad_values():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
