"""The image reader registry: the one place a raw file's format is decided -- by the case table's ``format``
for the data stages (check and full read) and by the file ending for predict."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.sparse

from segevo.data.cases import Case, CaseError
from segevo.data.readers import READERS, read_case, read_image, reader, reader_for_path, validate
from segevo.data.readers.m3d import M3DReader
from segevo.data.readers.nifti import NiftiReader

SHAPE = (6, 5, 4)


def case(fmt: str, image: Path, label: Path) -> Case:
    return Case(source="t", case_id="c1", patient_id="p1", modality="CT", image=image, label=label,
                label_map={1: "liver", 2: "spleen"}, image_sha256="0" * 64, format=fmt)


def nifti_case(tmp_path: Path) -> tuple[Case, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:3, 1:3] = 1
    label[4, 4, 3] = 2
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    return case("nifti", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"), image, label, affine


def m3d_case(tmp_path: Path) -> tuple[Case, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(1, *SHAPE)).astype(np.float32)
    channels = np.zeros((2, *SHAPE), np.uint8)
    channels[0, :2] = 1
    channels[1, 1:3] = 1  # overlaps channel 0 on x == 1: the later channel wins
    np.save(tmp_path / "image.npy", image)
    mask = tmp_path / f"mask_({', '.join(str(n) for n in channels.shape)}).npz"
    scipy.sparse.save_npz(mask, scipy.sparse.csr_matrix(channels.reshape(2, -1)))
    label = np.zeros(SHAPE, np.uint8)
    label[channels[0] == 1] = 1
    label[channels[1] == 1] = 2
    return case("m3d", tmp_path / "image.npy", mask), image[0], label


def test_registered_formats_are_the_case_table_formats(tmp_path):
    assert set(READERS) == {"nifti", "m3d"}
    assert all(r.format == name for name, r in READERS.items())
    c, *_ = nifti_case(tmp_path)
    for fmt in READERS:
        assert case(fmt, c.image, c.label).format == fmt
    with pytest.raises(CaseError, match="t/c1: unknown format 'dicom'"):
        case("dicom", c.image, c.label)
    with pytest.raises(CaseError, match="unknown image format 'dicom'"):
        reader("dicom")


@pytest.mark.parametrize("name, kind", [("scan.nii.gz", NiftiReader), ("SCAN.NII", NiftiReader),
                                        ("image.npy", M3DReader), ("weights.bin", NiftiReader),
                                        ("scan.mha", NiftiReader)])
def test_reader_by_file_ending(name, kind):
    """Endings no reader claims fall to NIfTI, whose reader tells a non-NIfTI file apart by its content."""
    assert isinstance(reader_for_path(name), kind)


def test_nifti_case_read_and_checked(tmp_path):
    c, image, label, affine = nifti_case(tmp_path)
    assert validate(c).labels_present == ("liver", "spleen")
    vol = read_case(c)
    assert vol.image.dtype == np.float32 and np.array_equal(vol.image, image)
    assert np.array_equal(vol.label, label)
    assert np.allclose(vol.affine, affine) and vol.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert not vol.normalised and vol.channels is None


def test_m3d_case_read_and_checked(tmp_path):
    c, image, label = m3d_case(tmp_path)
    assert validate(c).labels_present == ("liver", "spleen")
    vol = read_case(c)
    assert np.array_equal(vol.image, image) and np.array_equal(vol.label, label)
    assert vol.normalised and np.array_equal(vol.affine, np.eye(4)) and vol.spacing == (1.0, 1.0, 1.0)
    assert vol.channels.shape == (2, image.size)
    assert any("later channel wins" in n for n in vol.notes)


def test_lone_image_for_predict(tmp_path):
    c, image, _, affine = nifti_case(tmp_path)
    data, img = read_image(c.image)
    assert np.array_equal(data, image) and np.allclose(img.affine, affine)
    m, *_ = m3d_case(tmp_path)
    with pytest.raises(CaseError, match=r"image\.npy: M3D-Seg arrays carry no affine"):
        read_image(m.image)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 400)
    with pytest.raises(CaseError, match=r"weights\.bin: corrupt or truncated NIfTI"):
        read_image(tmp_path / "weights.bin")
