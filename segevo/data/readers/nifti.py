"""NIfTI (``.nii``, ``.nii.gz``): the case table's default format, and the only one ``segevo predict`` reads,
because the mask it writes reuses the image's header and affine.

Images are read as float32 straight from the stored type, slab by slab (:func:`~segevo.data.volumes.scaled_float32`),
with one channel of a 4D file picked by the case table's channel names or an index.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segevo.data.cases import Case, CaseError
from segevo.data.readers.base import RawVolume, to_float32, unreadable
from segevo.data.vocabulary import LabelError, check_labels
from segevo.data.volumes import scaled_float32, value_counts


class NiftiReader:
    format = "nifti"
    suffixes = (".nii.gz", ".nii")

    def check(self, case: Case) -> list[str]:
        import nibabel as nib

        image = nib.load(case.image)
        want = 4 if case.channels else 3
        if image.ndim != want or (case.channels and image.shape[3] != len(case.channels)):
            raise CaseError(f"{case.image}: expected a {want}D image"
                            + (f" with {len(case.channels)} channels" if case.channels else "")
                            + f", got shape {image.shape}")
        if case.label is None:
            return []
        label = nib.load(case.label)
        if label.shape != image.shape[:3]:
            raise CaseError(f"{case.label}: label shape {label.shape} differs from the image's {image.shape[:3]}")
        if not np.allclose(label.affine, image.affine, atol=1e-3, rtol=1e-4):
            raise CaseError(f"{case.label}: label affine differs from the image's (a different voxel grid)")
        data = np.asanyarray(label.dataobj)
        if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.round(data))):
            raise CaseError(f"{case.label}: label map holds non-integer values")
        return check_labels(f"{case.key} ({case.label})", np.unique(data), case.label_map)

    def read(self, case: Case, channel: int | str = 0) -> RawVolume:
        """Read and check a case's image and label; every problem is a :class:`CaseError` naming the file."""
        notes: list[str] = []

        def pick(n: int) -> int:
            if not case.channels:
                raise CaseError(f"{case.image}: expected a 3D image, got {n} channels (the case table declares "
                                f"none)")
            index, note = _pick_channel(case, channel, n)
            notes.append(note)
            return index

        data, img = read_nifti(case.image, pick)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            declared = f" (the case table declares {len(case.channels)} channels)" if case.channels else ""
            raise CaseError(f"{case.image}: expected a 3D image, got shape {data.shape}{declared}")
        if min(data.shape) < 1:
            raise CaseError(f"{case.image}: empty image, shape {data.shape}")
        image = to_float32(data, case.image)
        del data
        zooms = tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])  # header floats are float32
        label = None
        if case.label is not None:
            label, limg = read_nifti(case.label)
            if label.ndim == 4 and label.shape[3] == 1:
                label = label[..., 0]
            if label.shape != image.shape:
                raise CaseError(f"{case.label}: label shape {label.shape} differs from the image's {image.shape}")
            if not np.allclose(limg.affine, img.affine, atol=1e-3, rtol=1e-4):
                raise CaseError(f"{case.label}: label affine differs from the image's (a different voxel grid)")
            label, values = _integer_labels(label, case.label)
            try:
                check_labels(str(case.label), values, case.label_map)
            except LabelError as err:
                raise CaseError(str(err)) from None
            if not np.any(values):
                raise CaseError(f"{case.label}: label map is empty (no structure labelled)")
        return RawVolume(image, label, np.asarray(img.affine, dtype=np.float64), zooms, False, notes=notes)

    def read_image(self, path: Path, channel: int = 0) -> tuple[np.ndarray, Any]:
        """A NIfTI image for inference: float32 in raw array order, one channel of a 4D file, finite; and the
        nibabel image (affine, header). Every problem is a :class:`CaseError` naming the file."""
        def pick(n: int) -> int:
            if not 0 <= channel < n:
                raise CaseError(f"{path}: channel {channel} is out of range (image has {n} channels)")
            return channel

        data, img = read_nifti(path, pick)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise CaseError(f"{path}: expected a 3D image, got shape {data.shape}")
        if min(data.shape) < 1:
            raise CaseError(f"{path}: empty image, shape {data.shape}")
        return to_float32(data, path), img


def read_nifti(path: Path, channel: Callable[[int], int] | None = None) -> tuple[np.ndarray, Any]:
    """The voxels and the nibabel image. With ``channel`` (the image, not a label map) the result is float32
    straight from the stored type (never the float64 that scaled NIfTI gives by default), and of a 4D file only
    the channel ``channel(n_channels)`` picks is read."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
        if channel is None:
            return np.asanyarray(img.dataobj), img
        if len(img.shape) == 4 and img.shape[3] > 1:
            return np.asarray(img.dataobj[..., channel(img.shape[3])], dtype=np.float32), img
        return scaled_float32(img.dataobj), img
    except CaseError:
        raise
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError, MemoryError) as err:
        raise unreadable(path, "NIfTI", err) from None


def _pick_channel(case: Case, channel: int | str, n: int) -> tuple[int, str]:
    names = list(case.channels) if len(case.channels) == n else [f"channel {i}" for i in range(n)]
    if isinstance(channel, str):
        lowered = [c.lower() for c in names]
        if channel.lower() not in lowered:
            raise CaseError(f"{case.image}: preprocess.channel {channel!r} is not one of its channels "
                            f"({', '.join(names)})")
        index = lowered.index(channel.lower())
    else:
        if not 0 <= channel < n:
            raise CaseError(f"{case.image}: preprocess.channel {channel} is out of range (image has {n} channels)")
        index = channel
    return index, f"kept channel {index} ({names[index]}) of {n} ({', '.join(names)})"


def _integer_labels(label: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label map as unsigned integers (uint8 when the values allow) and its distinct values."""
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise CaseError(f"{path}: label map holds non-integer values")
    elif label.dtype.kind not in "iub":
        raise CaseError(f"{path}: label voxel type {label.dtype} is not an integer")
    low, high = label.min(), label.max()
    if low < 0:
        raise CaseError(f"{path}: label map holds negative values (min {low})")
    if label.dtype.kind != "u" or label.dtype.itemsize > 2:
        if high > np.iinfo(np.uint16).max:
            label = label.astype(np.int64) if label.dtype.kind == "f" else label
            return label, np.unique(label)
        label = label.astype(np.uint8 if high <= 255 else np.uint16, order="C")
    label = np.ascontiguousarray(label)
    return label, np.flatnonzero(value_counts(label))
