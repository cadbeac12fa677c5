"""M3D-Seg's own format: the image a ``(1, X, Y, Z)`` ``.npy`` stored foreground-normalised, the label a sparse
``(K, X*Y*Z)`` matrix of binary channels whose dense shape is written into its file name. There is no affine
or spacing: identity and 1 mm are assumed (and noted per case)."""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from segevo.data.cases import Case, CaseError
from segevo.data.readers.base import RawVolume, to_float32, unreadable
from segevo.data.vocabulary import LabelError, check_labels


def m3d_mask_shape(path: Path) -> tuple[int, ...]:
    """M3D-Seg writes the dense mask shape into the file name: ``mask_(13, 512, 512, 89).npz``."""
    match = re.fullmatch(r"mask_\(([\d, ]+)\)\.npz", path.name)
    if not match:
        raise CaseError(f"{path}: not an M3D-Seg mask name (expected 'mask_(K, X, Y, Z).npz')")
    return tuple(int(v) for v in match.group(1).split(","))


class M3DReader:
    format = "m3d"
    suffixes = (".npy",)

    def check(self, case: Case) -> list[str]:
        import scipy.sparse

        image = np.load(case.image, mmap_mode="r")
        if image.ndim != 4 or image.shape[0] != 1:
            raise CaseError(f"{case.image}: expected an M3D-Seg image of shape (1, X, Y, Z), got {image.shape}")
        if case.label is None:
            return []
        shape = m3d_mask_shape(case.label)
        if len(shape) != 4 or shape[1:] != image.shape[1:]:
            raise CaseError(f"{case.label}: mask shape {shape} does not fit the image {image.shape}")
        mask = scipy.sparse.load_npz(case.label)
        if mask.shape != (shape[0], int(np.prod(shape[1:]))):
            raise CaseError(f"{case.label}: sparse matrix {mask.shape} does not match the shape in its name {shape}")
        if mask.nnz and not np.all(mask.data == 1):
            raise CaseError(f"{case.label}: mask channels are not binary")
        filled = np.flatnonzero(mask.getnnz(axis=1)) + 1
        return check_labels(f"{case.key} ({case.label})", filled, case.label_map)

    def read(self, case: Case, channel: int | str = 0) -> RawVolume:
        """The image (one channel: ``channel`` does not apply) and the channels flattened to one label map."""
        import scipy.sparse

        try:
            data = np.load(case.image, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise unreadable(case.image, "npy image", err) from None
        if data.ndim != 4 or data.shape[0] != 1:
            raise CaseError(f"{case.image}: expected a 3D M3D-Seg image of shape (1, X, Y, Z), got {data.shape}")
        image = to_float32(data[0], case.image)
        del data
        notes = ["M3D-Seg stores no affine or spacing: identity affine, 1 mm spacing assumed",
                 "image stored foreground-normalised by M3D-Seg: only min-max applied"]
        label = mask = None
        if case.label is not None:
            try:
                shape = m3d_mask_shape(case.label)
                mask = scipy.sparse.load_npz(case.label).tocsr()
            except (OSError, ValueError, EOFError, zlib.error) as err:
                raise unreadable(case.label, "sparse mask", err) from None
            if len(shape) != 4 or shape[1:] != image.shape or mask.shape != (shape[0], image.size):
                raise CaseError(f"{case.label}: mask {mask.shape} (named {shape}) does not fit the image "
                                f"{image.shape}")
            mask.sum_duplicates()
            if mask.nnz and not np.all(mask.data == 1):
                raise CaseError(f"{case.label}: mask channels are not binary")
            filled = np.flatnonzero(mask.getnnz(axis=1)) + 1
            try:
                check_labels(str(case.label), filled, case.label_map)
            except LabelError as err:
                raise CaseError(str(err)) from None
            if filled.size == 0:
                raise CaseError(f"{case.label}: label map is empty (no structure labelled)")
            flat = np.zeros(image.size, dtype=np.uint8 if shape[0] < 255 else np.uint16)
            for k in range(mask.shape[0]):  # later channels win where channels overlap
                flat[mask.indices[mask.indptr[k]:mask.indptr[k + 1]]] = k + 1
            overlap = int(np.count_nonzero(np.bincount(mask.indices, minlength=image.size) > 1))
            if overlap:
                notes.append(f"{overlap} voxels lie in several mask channels: the later channel wins")
            label = flat.reshape(image.shape)
        return RawVolume(image, label, np.eye(4), (1.0, 1.0, 1.0), True, channels=mask, notes=notes)

    def read_image(self, path: Path, channel: int = 0) -> tuple[np.ndarray, Any]:
        raise CaseError(f"{path}: M3D-Seg arrays carry no affine to write a mask against; convert the image to "
                        f"NIfTI first")
