"""Memory of the data stages: scaled NIfTI read as float32 with get_fdata's values, chunked counts, and a worker
count that the available memory can hold."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from segevo.data.cases import Case
from segevo.data.readers import read_case
from segevo.data.readers.nifti import read_nifti
from segevo.data.resources import PEAK_FACTOR, WORKER_BASE, memory_bound_workers, volume_bytes
from segevo.data.volumes import value_counts


def scaled_ct(path, shape=(20, 16, 12), slope=0.37, inter=-1024.3) -> np.ndarray:
    stored = np.random.default_rng(0).integers(-3000, 3000, size=shape, dtype=np.int16)
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return stored


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_scaled_nifti_is_read_as_float32_with_get_fdata_values(tmp_path, suffix):
    path = tmp_path / f"ct{suffix}"
    stored = scaled_ct(path)
    data, _ = read_nifti(path, channel=lambda n: 0)
    assert data.dtype == np.float32 and data.flags.writeable
    slope, inter = float(np.float32(0.37)), float(np.float32(-1024.3))  # the header stores them as float32
    expected = (stored.astype(np.float64) * slope + inter).astype(np.float32)  # float64, then cast (MONAI)
    assert np.array_equal(data, expected)
    assert np.array_equal(data, nib.load(path).get_fdata().astype(np.float32))


def test_read_case_keeps_one_channel_of_a_4d_image(tmp_path):
    four = np.random.default_rng(1).normal(size=(8, 9, 10, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(four, np.eye(4)), tmp_path / "mr.nii.gz")
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "seg.nii.gz")
    case = Case("s", "c", "p", "MRI", tmp_path / "mr.nii.gz", tmp_path / "seg.nii.gz", {1: "liver"},
                image_sha256="0" * 64, channels=("FLAIR", "T1w", "T2w"))
    vol = read_case(case, "t2w")
    assert vol.image.dtype == np.float32 and np.array_equal(vol.image, four[..., 2])
    assert "kept channel 2 (T2w)" in vol.notes[0]


def test_value_counts_equals_bincount():
    volume = np.random.default_rng(2).integers(0, 7, size=(30, 20, 10), dtype=np.uint8)
    assert np.array_equal(value_counts(volume), np.bincount(volume.ravel()))
    assert np.array_equal(value_counts(np.asfortranarray(volume), minlength=12),
                          np.bincount(volume.ravel(), minlength=12))


def test_workers_bounded_by_memory_and_cores(tmp_path):
    scaled_ct(tmp_path / "small.nii.gz", (10, 10, 10))
    scaled_ct(tmp_path / "big.nii.gz", (100, 100, 50))
    cases = [Case("s", name, name, "CT", tmp_path / f"{name}.nii.gz", None, {}, image_sha256="0" * 64)
             for name in ("small", "big")]
    assert volume_bytes(cases[1]) == 4 * 100 * 100 * 50
    per_worker = int(PEAK_FACTOR * 4 * 100 * 100 * 50) + WORKER_BASE
    assert memory_bound_workers(cases, memory=3 * per_worker + 1, n_cores=16) == 3
    assert memory_bound_workers(cases, memory=100 * per_worker, n_cores=4) == 4
    assert memory_bound_workers(cases, memory=1, n_cores=4) == 1
