"""One registry of image readers (after nnU-Net's ``reader_writer_registry``): every decision about a raw file's
format is made here, by the case table's ``format`` value (the data stages) or by a file's ending (predict).

- ``segevo download`` checks each case with :func:`validate` (cheap: shapes, affines, label values);
- ``segevo pseudomask`` and ``segevo preprocess`` read it with :func:`read_case` (:class:`RawVolume`, float32,
  raw array order);
- ``segevo predict`` reads a lone image with :func:`read_image`.

A new format is a sibling module with a class that satisfies :class:`~segevo.data.readers.base.ImageReader`,
added to ``READERS``. Formats that sources convert at download time (MetaImage, DICOM series -> NIfTI) are
in :mod:`segevo.data.formats`; they never reach the case table.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from segevo.data.cases import Case, CaseError
from segevo.data.readers.base import ImageReader, RawVolume
from segevo.data.readers.m3d import M3DReader
from segevo.data.readers.nifti import NiftiReader

READERS: dict[str, ImageReader] = {r.format: r for r in (NiftiReader(), M3DReader())}
DEFAULT = "nifti"  # what a file no reader claims by its ending is tried as (nibabel also reads by content)

__all__ = ["READERS", "ImageReader", "RawVolume", "read_case", "read_image", "reader", "reader_for_path",
           "validate"]


def reader(format: str) -> ImageReader:
    """The reader of a case table ``format``."""
    try:
        return READERS[format]
    except KeyError:
        raise CaseError(f"unknown image format {format!r} (known: {', '.join(READERS)})") from None


def reader_for_path(path: str | os.PathLike[str]) -> ImageReader:
    """The reader whose file endings match ``path`` (the longest ending wins), else the default (NIfTI)."""
    name = Path(path).name.lower()
    matches = [(len(s), r) for r in READERS.values() for s in r.suffixes if name.endswith(s)]
    return max(matches, key=lambda m: m[0])[1] if matches else READERS[DEFAULT]


def validate(case: Case) -> Case:
    """Open the case's files and check them; returns the case with the classes present filled in."""
    for p in (case.image, case.label):
        if p is not None and not p.is_file():
            raise CaseError(f"{p}: file not found")
    present = reader(case.format).check(case)
    if case.label is not None and not present:
        raise CaseError(f"{case.label}: label map is empty (no structure labelled)")
    return dataclasses.replace(case, labels_present=tuple(dict.fromkeys(present)))  # merged classes: once


def read_case(case: Case, channel: int | str = 0) -> RawVolume:
    """Read and check a case's image and label; every problem is a :class:`CaseError` naming the file."""
    return reader(case.format).read(case, channel)


def read_image(path: str | os.PathLike[str], channel: int = 0) -> tuple[np.ndarray, Any]:
    """An image outside any case table (predict): float32 in raw array order, and its format's image object
    (for NIfTI the nibabel image, whose affine and header the written mask reuses)."""
    return reader_for_path(path).read_image(Path(path), channel)
