"""Between the raw array grid and the prep grid: the crop box and axis order the manifest keeps per case, so a
prediction on the prep grid lands exactly on the raw NIfTI's voxels (and a raw-grid array can be brought onto
the prep grid to compare). ``segevo predict`` prepares a lone image and pastes its mask back with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segevo.data.cases import CaseError
from segevo.data.manifest import AXIS_ORDER, PrepCase
from segevo.data.preprocess.transforms import crop_slices, foreground_box, normalise_intensity, to_segvol_axes


def prepare_image(image: np.ndarray, normalised: bool = False) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """A raw-order float32 image as the model sees it (steps 2-4 of :mod:`segevo.data.preprocess`): (D, H, W) in [0, 1],
    cropped to the foreground, with the crop's (start, end) to map predictions back."""
    volume = to_segvol_axes(normalise_intensity(image, normalised))
    try:
        start, end = foreground_box(volume)
    except ValueError as err:
        raise CaseError(str(err)) from None
    return np.ascontiguousarray(volume[crop_slices(start, end)]), start, end


def to_raw_grid(prediction: np.ndarray, case: PrepCase, fill: int | float = 0) -> np.ndarray:
    """A volume on the prep grid (``case.shape``, (D, H, W)) back onto the raw array grid: paste it at the crop
    box (``fill`` elsewhere) and undo the axis order. The result lines up with the raw NIfTI's affine."""
    prediction = np.asarray(prediction)
    if prediction.shape != tuple(case.shape):
        raise ValueError(f"{case.key}: prediction shape {prediction.shape} is not the prep shape {tuple(case.shape)}")
    return paste_back(prediction, case.raw_shape, case.crop_start, case.crop_end, case.axis_order, fill)


def paste_back(prediction: np.ndarray, raw_shape: Sequence[int], start: Sequence[int], end: Sequence[int],
               order: Sequence[int] = AXIS_ORDER, fill: int | float = 0) -> np.ndarray:
    """The geometry of :func:`to_raw_grid` for any crop box: paste, then undo the axis order."""
    full = np.full(tuple(raw_shape[a] for a in order), fill, dtype=prediction.dtype)
    full[crop_slices(start, end)] = prediction
    return full.transpose(np.argsort(order))


def from_raw_grid(array: np.ndarray, case: PrepCase) -> np.ndarray:
    """The forward geometry of :func:`to_raw_grid`: a raw-grid array transposed and cropped like the image."""
    array = np.asarray(array)
    if array.shape != tuple(case.raw_shape):
        raise ValueError(f"{case.key}: array shape {array.shape} is not the raw shape {tuple(case.raw_shape)}")
    return array.transpose(tuple(case.axis_order))[crop_slices(case.crop_start, case.crop_end)]
