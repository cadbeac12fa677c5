"""Model-ready arrays from raw cases, SegVol's way, and the per-case machinery of ``segevo pseudomask`` and
``segevo preprocess``.

Per case, as SegVol's training build and inference do it (reference/segvol.md section 2):

1. read the image as float32 (MONAI's ``LoadImage``), keep one channel of a multi-channel image
   (``preprocess.channel``, default the first);
2. ``ForegroundNormalization``: clip to the [0.05, 99.95] percentiles of the voxels above the volume mean, z-score
   with those voxels' mean and std. M3D-Seg images were written already normalised this way by SegVol's
   authors, so they skip this step (doing it twice is not the identity);
3. ``DimTranspose`` (``np.swapaxes(-1, -3)``: raw (X, Y, Z) -> (D, H, W)), ``MinMaxNormalization`` to [0, 1];
4. ``CropForeground`` of the voxels > 0 (margin 0): the box is kept, so a prediction maps back exactly
   (:func:`to_raw_grid`);
5. labels become class indices (``classes[i - 1]``), cropped like the image, never resized; the zoom-out copies
   at the model ROI use trilinear for the image and nearest neighbour (at voxel centres, torch's
   ``nearest-exact``) for labels and pseudo-masks, a documented deviation from SegVol's ``area`` mode.

Pseudo-masks (SegVol's ``pseudo_mask_process.py``) run on the same normalised, *uncropped* image in raw array
order: resized to ``pseudomask.grid`` with MONAI's default area mode (as SegVol's ``Resized``), 3D
Felzenszwalb-Huttenlocher, the ground truth painted on
top, then the clean-up; ``preprocess`` resizes the result back to the raw array by nearest neighbour and
transposes and crops it like the image.

Every output is written atomically (a case's prep folder is built aside and renamed into place), a case is
skipped when its fingerprint (raw checksum, file stats, the parameters it depends on and the code that makes
it) matches the one stored with its outputs, and a bad case raises :class:`~segevo.data.cases.CaseError`
naming it (or is left out and reported with ``data.skip_bad_cases``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segevo.config import PseudoMaskConfig, SegevoConfig
from segevo.data.cases import Case, CaseError, m3d_mask_shape, read_case_table
from segevo.data.manifest import AXIS_ORDER, PrepCase, write_manifest
from segevo.data.resources import memory_bound_workers
from segevo.data.summary import case_intensity, intensity_stats
from segevo.data.vocabulary import LabelError, check_labels
from segevo.data.volumes import scaled_float32, value_counts
from segevo.io import atomic_write_json, atomic_write_npy, current_umask

VERSION = 1  # bump when the outputs change for a reason the code fingerprint cannot see (a library upgrade)
PSEUDO_INDEX = "index.json"
MANIFEST = "manifest.json"
CASE_META = "case.json"
ARRAYS = ("image", "label", "pseudo", "zoom_image", "zoom_label", "zoom_pseudo", "locations")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# SegVol's intensity and geometry transforms


def foreground_normalize(image: np.ndarray, inplace: bool = False) -> np.ndarray:
    """SegVol's ``ForegroundNormalization`` (float32 in, float32 out, same arithmetic as its numpy code).

    Memory: the voxels above the mean are the one copy made (the percentiles partition it in place after the
    order-sensitive mean and std); ``inplace`` clips into ``image`` itself instead of a new volume.
    """
    flat = image.ravel(order="K")  # no copy, whatever the memory order (nibabel's arrays are Fortran-ordered)
    foreground = flat[flat > np.mean(flat)]
    if foreground.size == 0:
        raise CaseError("image is constant (no voxel above the mean)")
    mean, std = np.mean(foreground), np.std(foreground)
    lower, upper = np.percentile(foreground, [0.05, 99.95], overwrite_input=True)
    del foreground
    out = np.clip(image, lower.astype(image.dtype), upper.astype(image.dtype), out=image if inplace else None)
    out -= mean
    out /= max(std, 1e-8)
    return out


def minmax(image: np.ndarray) -> np.ndarray:
    """SegVol's ``MinMaxNormalization``: ``x - min``, then divided by ``max(max, 1e-8)``; in place if float32."""
    out = image if image.dtype == np.float32 else image.astype(np.float32)
    out -= out.min()
    out /= np.clip(out.max(), 1e-8, None)
    return out


def to_segvol_axes(array: np.ndarray) -> np.ndarray:
    """SegVol's ``DimTranspose`` (``np.swapaxes(-1, -3)``): raw (X, Y, Z) -> (D, H, W) = (Z, Y, X). A view."""
    return np.swapaxes(array, -1, -3)


def foreground_box(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI ``CropForeground`` with ``select_fn = x > 0`` and no margin: (start, end) per axis, end exclusive."""
    mask = image > 0
    start, end = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            raise ValueError("no foreground voxel (> 0 after min-max): the image is constant")
        start.append(int(hit[0]))
        end.append(int(hit[-1]) + 1)
    return tuple(start), tuple(end)


def _box(start: Sequence[int], end: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, e) for s, e in zip(start, end, strict=True))


def resize_linear(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear, ``align_corners=False`` (MONAI's ``Resize(mode='trilinear')``); float32."""
    shape = tuple(int(s) for s in shape)
    if image.shape == shape:
        return np.array(image, dtype=np.float32)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def nearest_index(n: int, m: int) -> np.ndarray:
    """Source index of each of ``m`` output voxels resampling ``n`` by nearest neighbour at voxel centres."""
    return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.intp), n - 1)


def resize_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest neighbour at voxel centres (torch's ``nearest-exact``) over the last ``len(shape)`` axes."""
    shape = tuple(int(s) for s in shape)
    lead = array.ndim - len(shape)
    index = np.ix_(*(nearest_index(n, m) for n, m in zip(array.shape[lead:], shape, strict=True)))
    return array[(*(slice(None),) * lead, *index)]


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
    full[_box(start, end)] = prediction
    return full.transpose(np.argsort(order))


def read_image(path: str | os.PathLike[str], channel: int = 0) -> tuple[np.ndarray, Any]:
    """A NIfTI image for inference: float32 in raw array order, one channel of a 4D file, finite; and the
    nibabel image (affine, header). Every problem is a :class:`CaseError` naming the file."""
    path = Path(path)

    def pick(n: int) -> int:
        if not 0 <= channel < n:
            raise CaseError(f"{path}: channel {channel} is out of range (image has {n} channels)")
        return channel

    data, img = _read_nifti(path, pick)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"{path}: expected a 3D image, got shape {data.shape}")
    if min(data.shape) < 1:
        raise CaseError(f"{path}: empty image, shape {data.shape}")
    return _to_float32(data, path), img


def prepare_image(image: np.ndarray, normalised: bool = False) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """A raw-order float32 image as the model sees it (steps 2-4 of the module docstring): (D, H, W) in [0, 1],
    cropped to the foreground, with the crop's (start, end) to map predictions back."""
    volume = to_segvol_axes(normalise_intensity(image, normalised))
    try:
        start, end = foreground_box(volume)
    except ValueError as err:
        raise CaseError(str(err)) from None
    return np.ascontiguousarray(volume[_box(start, end)]), start, end


def from_raw_grid(array: np.ndarray, case: PrepCase) -> np.ndarray:
    """The forward geometry of :func:`to_raw_grid`: a raw-grid array transposed and cropped like the image."""
    array = np.asarray(array)
    if array.shape != tuple(case.raw_shape):
        raise ValueError(f"{case.key}: array shape {array.shape} is not the raw shape {tuple(case.raw_shape)}")
    return array.transpose(tuple(case.axis_order))[_box(case.crop_start, case.crop_end)]


# --------------------------------------------------------------------------------------------------------------
# Reading and checking one raw case


@dataclass
class RawVolume:
    """One case as read from disk, checked, in raw array order (X, Y, Z)."""

    image: np.ndarray  # float32, finite
    label: np.ndarray | None  # label values of the source's class map (M3D-Seg: channel k -> k + 1)
    affine: np.ndarray
    spacing: tuple[float, float, float]  # (X, Y, Z) in mm
    normalised: bool  # M3D-Seg images are stored foreground-normalised already
    channels: Any = None  # M3D-Seg: the sparse (K, X*Y*Z) mask, for the pseudo-mask overlay (overlaps kept)
    notes: list[str] = field(default_factory=list)


def _unreadable(path: Path, kind: str, err: BaseException) -> CaseError:
    if path.is_dir():
        return CaseError(f"{path}: is a directory, not a {kind} file")
    if isinstance(err, FileNotFoundError):
        return CaseError(f"{path}: file not found")
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CaseError(f"{path}: corrupt or truncated {kind} ({detail})")


def _read_nifti(path: Path, channel: Callable[[int], int] | None = None) -> tuple[np.ndarray, Any]:
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
        raise _unreadable(path, "NIfTI", err) from None


def _to_float32(data: np.ndarray, path: Path) -> np.ndarray:
    """What MONAI's ``LoadImage`` hands SegVol's transforms. NaN/Inf in the file and finite float64 values that
    overflow float32 are told apart: calling the latter NaN/Inf would send the user looking for what is not there."""
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise CaseError(f"{path}: voxel type {data.dtype} is not a real number")
    if data.dtype.kind == "f":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise CaseError(f"{path}: {bad} NaN/Inf voxels")
    with np.errstate(over="ignore"):
        image = data.astype(np.float32, copy=False)  # in its memory order: no copy for what _read_nifti made
    if not image.flags.writeable or isinstance(image, np.memmap):  # an uncompressed file mapped read-only
        image = np.array(image, order="K")
    if data.dtype != np.float32:
        big = image.size - int(np.count_nonzero(np.isfinite(image)))
        if big:
            raise CaseError(f"{path}: {big} voxels are finite but beyond the float32 range (|value| > "
                            f"{np.finfo(np.float32).max:.3g}), which the model computes in")
    return image


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


def read_case(case: Case, channel: int | str = 0) -> RawVolume:
    """Read and check a case's image and label; every problem is a :class:`CaseError` naming the file."""
    if case.format == "m3d":
        return _read_m3d(case)
    notes: list[str] = []

    def pick(n: int) -> int:
        if not case.channels:
            raise CaseError(f"{case.image}: expected a 3D image, got {n} channels (the case table declares none)")
        index, note = _pick_channel(case, channel, n)
        notes.append(note)
        return index

    data, img = _read_nifti(case.image, pick)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        declared = f" (the case table declares {len(case.channels)} channels)" if case.channels else ""
        raise CaseError(f"{case.image}: expected a 3D image, got shape {data.shape}{declared}")
    if min(data.shape) < 1:
        raise CaseError(f"{case.image}: empty image, shape {data.shape}")
    image = _to_float32(data, case.image)
    del data
    zooms = tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])  # header floats are float32
    label = None
    if case.label is not None:
        label, limg = _read_nifti(case.label)
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


def _read_m3d(case: Case) -> RawVolume:
    import scipy.sparse

    try:
        data = np.load(case.image, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _unreadable(case.image, "npy image", err) from None
    if data.ndim != 4 or data.shape[0] != 1:
        raise CaseError(f"{case.image}: expected a 3D M3D-Seg image of shape (1, X, Y, Z), got {data.shape}")
    image = _to_float32(data[0], case.image)
    del data
    notes = ["M3D-Seg stores no affine or spacing: identity affine, 1 mm spacing assumed",
             "image stored foreground-normalised by M3D-Seg: only min-max applied"]
    label = mask = None
    if case.label is not None:
        try:
            shape = m3d_mask_shape(case.label)
            mask = scipy.sparse.load_npz(case.label).tocsr()
        except (OSError, ValueError, EOFError, zlib.error) as err:
            raise _unreadable(case.label, "sparse mask", err) from None
        if len(shape) != 4 or shape[1:] != image.shape or mask.shape != (shape[0], image.size):
            raise CaseError(f"{case.label}: mask {mask.shape} (named {shape}) does not fit the image {image.shape}")
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


def segvol_intensity(vol: RawVolume, consume: bool = False) -> np.ndarray:
    """The image normalised SegVol's way in raw array order: foreground normalisation (unless stored so),
    then min-max to [0, 1]. ``consume`` normalises ``vol.image`` in place and detaches it from ``vol``, so no
    second full-size volume is ever alive (the per-worker memory bound of the stages)."""
    if not consume:
        return normalise_intensity(vol.image, vol.normalised)
    image, vol.image = vol.image, None
    return normalise_intensity(image, vol.normalised, inplace=True)


def normalise_intensity(image: np.ndarray, normalised: bool, inplace: bool = False) -> np.ndarray:
    """:func:`segvol_intensity` for a bare array; the input is modified only with ``inplace``."""
    try:
        out = image if normalised else foreground_normalize(image, inplace)
    except ValueError as err:
        raise CaseError(str(err)) from None
    return minmax(out.copy() if out is image and not inplace else out)


# --------------------------------------------------------------------------------------------------------------
# The two per-case jobs


def grid_channels(vol: RawVolume, shape: Sequence[int], label_map: dict[int, str],
                  grid: Sequence[int]) -> np.ndarray:
    """Binary ground truth (K, *grid), one channel per class-map value in order, resized by nearest neighbour."""
    values = sorted(label_map)
    grid = tuple(grid)
    if vol.channels is not None:  # M3D-Seg: the stored channels, overlaps and all
        mask = vol.channels
        out = np.zeros((max(values) if values else 0, *grid), dtype=bool)
        index = np.ix_(*(nearest_index(n, m) for n, m in zip(shape, grid, strict=True)))
        dense = np.zeros(int(np.prod(shape)), dtype=bool)
        for k in range(min(mask.shape[0], out.shape[0])):
            dense[:] = False
            dense[mask.indices[mask.indptr[k]:mask.indptr[k + 1]]] = True
            out[k] = dense.reshape(tuple(shape))[index]
        return out
    small = resize_nearest(vol.label, grid)
    return np.stack([small == v for v in values]) if values else np.zeros((0, *grid), dtype=bool)


def pseudo_mask(case: Case, cfg: PseudoMaskConfig, channel: int | str = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """SegVol's pseudo-mask of one labelled case: int16 ids on ``cfg.grid`` (raw array order), -1 = none."""
    from segevo.data.pseudomask import cleanse_pseudo_label, pseudomask_case, resize_area

    if case.label is None:
        raise CaseError(f"{case.key}: has no label; pseudo-masks need the ground truth painted on top")
    vol = read_case(case, channel)
    grid = tuple(cfg.grid)
    shape = vol.image.shape
    image = resize_area(segvol_intensity(vol, consume=True), grid)
    channels = grid_channels(vol, shape, case.label_map, grid)
    del vol
    raw = pseudomask_case(image, channels, cfg)
    cleaned = cleanse_pseudo_label(raw, cfg.cleanup_fraction)
    if cleaned.max() >= np.iinfo(np.int16).max:
        raise CaseError(f"{case.key}: {int(cleaned.max()) + 1} pseudo-mask ids do not fit int16 "
                        f"(raise pseudomask.min_size or lower pseudomask.grid)")
    ids = np.unique(cleaned)
    info = {"ids": int(np.count_nonzero(ids >= 0)), "dropped_fraction": round(float(np.mean(cleaned < 0)), 6)}
    return cleaned.astype(np.int16), info


def class_locations(label: np.ndarray, per_class: int = 1024, seed: int = 0) -> np.ndarray:
    """Up to ``per_class`` random voxels of every class as (class, d, h, w) rows (int32): the loader centres
    positive crops on them in O(1) instead of searching a 512x512x300 label map for a small organ."""
    flat = np.flatnonzero(label)
    values = label.ravel()[flat]
    order = np.argsort(values, kind="stable")
    bounds = np.cumsum(np.bincount(values, minlength=int(label.max()) + 1))
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(1, len(bounds)):
        members = order[bounds[k - 1] : bounds[k]]
        if members.size:
            pick = flat[members if members.size <= per_class else rng.choice(members, per_class, replace=False)]
            rows.append(np.column_stack([np.full(pick.size, k), *np.unravel_index(pick, label.shape)]))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def prepare_arrays(case: Case, roi: Sequence[int], channel: int | str = 0,
                   pseudo: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One case's model-ready arrays (see the module docstring) and the manifest fields that describe them.

    ``pseudo`` is the case's pseudo-mask on its FH grid in raw array order (any grid shape).
    """
    if case.label is None:
        raise CaseError(f"{case.key}: has no label")
    vol = read_case(case, channel)
    raw_shape = vol.image.shape
    intensity = case_intensity(intensity_stats(vol.image, vol.label, case.label_map), case.label_map)
    full = to_segvol_axes(segvol_intensity(vol, consume=True))
    start, end = foreground_box(full)
    box = _box(start, end)
    image = np.ascontiguousarray(full[box])
    del full  # from here on only the cropped volume is alive
    classes = tuple(dict.fromkeys(case.label_map[v] for v in sorted(case.label_map)))  # merged values: one class
    if len(classes) > 255:
        raise CaseError(f"{case.key}: {len(classes)} classes do not fit a uint8 label map")
    lut = np.zeros(max(case.label_map) + 1, dtype=np.uint8)
    for value, name in case.label_map.items():
        lut[value] = classes.index(name) + 1
    raw_label = to_segvol_axes(vol.label)
    label = lut[raw_label[box]]
    counts = value_counts(label, minlength=len(classes) + 1)
    voxels = {name: int(counts[i + 1]) for i, name in enumerate(classes)}
    lost = int(np.count_nonzero(raw_label)) - int(counts[1:].sum())
    notes = list(vol.notes)
    if not any(voxels.values()):
        raise CaseError(f"{case.label}: every labelled voxel lies outside the image's foreground box")
    if lost:
        notes.append(f"{lost} labelled voxels lie outside the foreground crop and are dropped")
    roi = tuple(int(r) for r in roi)
    arrays: dict[str, np.ndarray] = {
        "image": image.astype(np.float16),
        "label": label,
        "zoom_image": resize_linear(image, roi).astype(np.float16),
        "zoom_label": resize_nearest(label, roi),
    }
    arrays["locations"] = class_locations(label)
    if pseudo is not None:
        # nearest from the FH grid straight onto the cropped, transposed raw grid: (X, Y, Z) index per raw axis
        index = [nearest_index(n, m) for n, m in zip(pseudo.shape, raw_shape, strict=True)]
        d, h, w = (index[2][start[0]:end[0]], index[1][start[1]:end[1]], index[0][start[2]:end[2]])
        arrays["pseudo"] = np.ascontiguousarray(pseudo[np.ix_(w, h, d)].transpose(2, 1, 0)).astype(np.int16)
        arrays["zoom_pseudo"] = resize_nearest(arrays["pseudo"], roi)
    spacing = tuple(float(vol.spacing[a]) for a in AXIS_ORDER)
    fields = {"classes": classes, "shape": tuple(int(s) for s in image.shape), "raw_shape": tuple(raw_shape),
              "crop_start": start, "crop_end": end, "spacing": spacing,
              "affine": tuple(tuple(float(x) for x in row) for row in vol.affine), "voxels": voxels,
              "notes": tuple(notes), "intensity": intensity}
    return arrays, fields


# --------------------------------------------------------------------------------------------------------------
# Fingerprints, atomic writes, the process pool


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(*modules: str) -> str:
    """SHA256 of the modules' code, blind to comments, docstrings and formatting: edits that cannot change an
    output do not force a rerun of every case."""
    import importlib.util

    h = hashlib.sha256(f"segevo-preprocess-{VERSION}".encode())
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"module {name} not found")
        tree = _strip_docstrings(ast.parse(Path(spec.origin).read_text()))
        h.update(name.encode() + ast.dump(tree).encode())
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_stats(*paths: Path | None) -> list[Any]:
    out = []
    for p in paths:
        if p is None:
            out.append(None)
            continue
        try:
            st = p.stat()
            out.append([st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            out.append("missing")
    return out


def _case_identity(case: Case, base: Path) -> dict[str, Any]:
    """What a case's outputs depend on; paths relative to the case table, so the data root can move."""
    files = [None if p is None else os.path.relpath(p, base) for p in (case.image, case.label)]
    return {"key": case.key, "format": case.format, "image_sha256": case.image_sha256,
            "label_map": {str(k): v for k, v in sorted(case.label_map.items())}, "channels": list(case.channels),
            "files": files, "stats": _file_stats(case.image, case.label)}


def _pool_context() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported the heavy modules once, so each worker starts in milliseconds instead of
    importing torch and numba again; never a plain fork of this process (its torch/numba threads would not
    survive it). Spawn where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["segevo.data.preprocess", "segevo.data.pseudomask"])
    return ctx


def _init_worker() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@dataclass
class StageReport:
    """What a stage run did: outputs (key -> row), how many were computed, and the cases left out."""

    outputs: dict[str, Any]
    computed: int
    reused: int
    skipped: list[dict[str, str]]
    unlabelled: int
    path: Path
    notes: dict[str, list[str]] = field(default_factory=dict)


def _run_jobs(jobs: list[tuple[str, Callable[..., Any], tuple]], workers: int, desc: str, skip_bad: bool,
              on_result: Callable[[str, Any], None]) -> list[dict[str, str]]:
    """Run ``fn(*args)`` per job, in a process pool when ``workers > 1``; bad cases raise or are collected."""
    skipped: list[dict[str, str]] = []

    def failed(key: str, err: BaseException) -> None:
        if isinstance(err, BrokenProcessPool):
            raise RuntimeError(f"{key}: a worker process died (out of memory? lower preprocess.workers or pass "
                               f"--workers)") from err
        if not isinstance(err, CaseError):
            raise RuntimeError(f"{key}: unexpected {type(err).__name__}: {err}") from err
        message = str(err) if str(err).startswith(key) else f"{key}: {err}"
        if not skip_bad:
            raise CaseError(f"{message} (set data.skip_bad_cases: true to leave such cases out)") from None
        log.warning("skipped %s", message)
        source, case_id = key.split("/", 1)
        skipped.append({"source": source, "case_id": case_id, "reason": message})

    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=None)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for key, fn, args in jobs:
                try:
                    result = fn(*args)
                except Exception as err:
                    failed(key, err)
                else:
                    on_result(key, result)
                bar.update()
            return skipped
        ctx = _pool_context()
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                 initializer=_init_worker) as pool:
            pending: dict[Future, str] = {pool.submit(fn, *args): key for key, fn, args in jobs}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        key = pending.pop(fut)
                        err = fut.exception()
                        if err is not None:
                            failed(key, err)
                        else:
                            on_result(key, fut.result())
                        bar.update()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    return skipped


def _labelled(cases: Iterable[Case]) -> tuple[list[Case], int]:
    cases = list(cases)
    labelled = [c for c in cases if c.label is not None]
    return labelled, len(cases) - len(labelled)


def _by_size(cases: list[Case]) -> list[Case]:
    """Largest first, so the pool does not end waiting on one big volume."""
    def size(c: Case) -> int:
        try:
            return c.image.stat().st_size
        except OSError:
            return 0

    return sorted(cases, key=size, reverse=True)


def _prune(root: Path, keep: set[Path], pattern: str) -> int:
    """Remove earlier outputs (matched by ``pattern`` under ``root``) of cases no longer produced, and leftovers
    of interrupted runs (dot-prefixed temporary files and folders)."""
    removed = 0
    if not root.is_dir():
        return 0
    for path in root.glob(pattern):
        if path not in keep:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    for source in (p for p in root.iterdir() if p.is_dir()):
        for tmp in source.glob(".*"):
            if ".tmp" in tmp.name or ".old-" in tmp.name:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return removed


# --------------------------------------------------------------------------------------------------------------
# segevo pseudomask


def pseudo_dir(cfg: SegevoConfig) -> Path:
    """Absolute, like every path handed to the workers: they need not share this process's working directory."""
    return Path(cfg.data.root).resolve() / "pseudo"


def prep_dir(cfg: SegevoConfig) -> Path:
    return Path(cfg.data.root).resolve() / "prep"


def table_path(cfg: SegevoConfig) -> Path:
    return Path(cfg.data.root).resolve() / "raw" / "cases.json"


def pseudo_params(cfg: SegevoConfig) -> dict[str, Any]:
    return {"pseudomask": cfg.pseudomask.model_dump(mode="json"), "channel": cfg.preprocess.channel,
            "channels": cfg.preprocess.channels}


def _pseudo_job(case: Case, cfg: PseudoMaskConfig, channel: int | str, out: Path, fingerprint: str,
                meta: dict[str, Any]) -> dict[str, Any]:
    pseudo, info = pseudo_mask(case, cfg, channel)
    atomic_write_npy(out, pseudo)
    sidecar = {"fingerprint": fingerprint, "grid": list(pseudo.shape), "dtype": "int16", **meta, **info}
    atomic_write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def _reuse_pseudo(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        sidecar = json.loads(out.with_suffix(".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return sidecar if sidecar.get("fingerprint") == fingerprint and out.is_file() else None


def run_pseudomask(cfg: SegevoConfig, workers: int | None = None, force: bool = False) -> StageReport:
    """Pseudo-masks for every labelled case of the case table -> ``<root>/pseudo/<source>/<case_id>.npy`` (int16
    on ``pseudomask.grid``) with a JSON sidecar each, and ``<root>/pseudo/index.json`` listing them."""
    base = table_path(cfg).parent
    table = read_case_table(table_path(cfg))
    cases, unlabelled = _labelled(table.cases)
    root = pseudo_dir(cfg)
    params = pseudo_params(cfg)
    code = code_fingerprint("segevo.data.pseudomask", "segevo.data.preprocess", "segevo.data.volumes")
    outputs: dict[str, Any] = {}
    jobs = []
    for case in _by_size(cases):
        out = root / case.source / f"{case.case_id}.npy"
        fp = _digest({"code": code, "params": params, "case": _case_identity(case, base)})
        done = None if force else _reuse_pseudo(out, fp)
        if done is not None:
            outputs[case.key] = done
        else:
            meta = {"source": case.source, "case_id": case.case_id, "raw_sha256": case.image_sha256, **params}
            jobs.append((case.key, _pseudo_job, (case, cfg.pseudomask, cfg.preprocess.channel_for(case.key), out,
                                                 fp, meta)))
    index = root / PSEUDO_INDEX
    if jobs:
        index.unlink(missing_ok=True)  # never an index naming masks of two different runs
    n = workers or cfg.preprocess.workers or memory_bound_workers(job[2][0] for job in jobs)
    skipped = _run_jobs(jobs, n, "pseudomask", cfg.data.skip_bad_cases, outputs.__setitem__)
    keep = {root / k.split("/", 1)[0] / f"{k.split('/', 1)[1]}{ext}" for k in outputs for ext in (".npy", ".json")}
    _prune(root, keep | {index}, "*/*.*")
    entries = {k: {"path": f"{k}.npy", "fingerprint": v["fingerprint"], "grid": v["grid"], "ids": v.get("ids")}
               for k, v in sorted(outputs.items())}
    atomic_write_json(index, {"version": 1, "code": code, **params, "cases": entries, "skipped": skipped,
                        "unlabelled": unlabelled})
    return StageReport(outputs, len(jobs) - len(skipped), len(outputs) - (len(jobs) - len(skipped)), skipped,
                       unlabelled, index)


def read_pseudo_index(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: no pseudo-mask index; run 'segevo pseudomask' first") from None
    except json.JSONDecodeError as err:
        raise CaseError(f"{path}: not valid JSON ({err})") from None


# --------------------------------------------------------------------------------------------------------------
# segevo preprocess


def _prep_job(case: Case, roi: tuple[int, ...], channel: int | str, pseudo_path: Path | None,
              folder: Path, fingerprint: str) -> PrepCase:
    pseudo = None
    if pseudo_path is not None:
        try:
            pseudo = np.load(pseudo_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise _unreadable(pseudo_path, "pseudo-mask (rerun 'segevo pseudomask')", err) from None
    arrays, fields = prepare_arrays(case, roi, channel, pseudo)
    rel = f"{case.source}/{case.case_id}"
    row = PrepCase(source=case.source, case_id=case.case_id, patient_id=case.patient_id, modality=case.modality,
                   image=f"{rel}/image.npy", label=f"{rel}/label.npy", zoom_image=f"{rel}/zoom_image.npy",
                   zoom_label=f"{rel}/zoom_label.npy", locations=f"{rel}/locations.npy",
                   pseudo=f"{rel}/pseudo.npy" if pseudo is not None else None,
                   zoom_pseudo=f"{rel}/zoom_pseudo.npy" if pseudo is not None else None,
                   raw_sha256=case.image_sha256, annotation=case.annotation, subset=case.subset,
                   segvol_seen=case.segvol_seen, **fields)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide shared data from the other users
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / CASE_META, {"fingerprint": fingerprint, "row": asdict(row)})
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return row


def _reuse_prep(folder: Path, fingerprint: str) -> PrepCase | None:
    try:
        meta = json.loads((folder / CASE_META).read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        from segevo.data.manifest import _tupled

        row = PrepCase(**{k: _tupled(v) if k not in ("voxels", "intensity") else v for k, v in meta["row"].items()})
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    root = folder.parent.parent
    if not all((root / getattr(row, a)).is_file() for a in ARRAYS if getattr(row, a) is not None):
        return None
    return row


def prep_params(cfg: SegevoConfig) -> dict[str, Any]:
    return {"roi_size": list(cfg.model.roi_size), "channel": cfg.preprocess.channel,
            "channels": cfg.preprocess.channels}


def run_preprocess(cfg: SegevoConfig, workers: int | None = None, force: bool = False) -> StageReport:
    """Model-ready arrays for every labelled case -> ``<root>/prep/<source>/<case_id>/*.npy`` and
    ``<root>/prep/manifest.json`` (rows: :class:`~segevo.data.manifest.PrepCase`)."""
    base = table_path(cfg).parent
    table = read_case_table(table_path(cfg))
    cases, unlabelled = _labelled(table.cases)
    index = read_pseudo_index(pseudo_dir(cfg) / PSEUDO_INDEX)
    pseudo_skipped = {f"{s['source']}/{s['case_id']}" for s in index.get("skipped", [])}
    root = prep_dir(cfg)
    params = prep_params(cfg)
    code = code_fingerprint("segevo.data.preprocess", "segevo.data.manifest", "segevo.data.summary",
                            "segevo.data.volumes")
    outputs: dict[str, PrepCase] = {}
    jobs = []
    for case in _by_size(cases):
        entry = index["cases"].get(case.key)
        if entry is None and case.key not in pseudo_skipped:
            raise CaseError(f"{case.key}: no pseudo-mask in {pseudo_dir(cfg) / PSEUDO_INDEX}; "
                            f"run 'segevo pseudomask' again (the case table changed since)")
        folder = root / case.source / case.case_id
        fp = _digest({"code": code, "params": params, "case": _case_identity(case, base),
                      "pseudo": entry and entry["fingerprint"]})
        done = None if force else _reuse_prep(folder, fp)
        if done is not None:
            outputs[case.key] = done
        else:
            pseudo_path = pseudo_dir(cfg) / entry["path"] if entry else None
            jobs.append((case.key, _prep_job, (case, tuple(cfg.model.roi_size),
                                               cfg.preprocess.channel_for(case.key), pseudo_path, folder, fp)))
    manifest = root / MANIFEST
    if jobs:
        manifest.unlink(missing_ok=True)  # a manifest never describes arrays of two different runs
    n = workers or cfg.preprocess.workers or memory_bound_workers(job[2][0] for job in jobs)
    skipped = _run_jobs(jobs, n, "preprocess", cfg.data.skip_bad_cases, outputs.__setitem__)
    _prune(root, {root / k for k in outputs} | {manifest}, "*/*")
    meta = {"code": code, **params, "pseudomask": index.get("pseudomask"), "axis_order": list(AXIS_ORDER),
            "normalisation": "SegVol ForegroundNormalization + DimTranspose + MinMax + CropForeground(>0)",
            "skipped": skipped, "pseudo_skipped": index.get("skipped", []), "unlabelled": unlabelled}
    write_manifest(manifest, list(outputs.values()), meta)
    computed = len(jobs) - len(skipped)
    return StageReport(outputs, computed, len(outputs) - computed, skipped, unlabelled, manifest,
                       {k: list(v.notes) for k, v in outputs.items() if v.notes})
