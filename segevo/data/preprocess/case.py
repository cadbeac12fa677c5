"""One case's arrays in memory: read through the reader registry, then the transforms -- the pseudo-mask of
``segevo pseudomask`` and the model-ready arrays and manifest fields of ``segevo preprocess``. Writing them is
:mod:`segevo.data.preprocess.jobs`' business.

Memory: a worker keeps at most one full-size float32 volume alive (the image is normalised in place and
detached from the read volume), the per-worker bound ``segevo.data.resources`` plans the pool with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segevo.config import PseudoMaskConfig
from segevo.data.cases import Case, CaseError
from segevo.data.manifest import AXIS_ORDER
from segevo.data.preprocess.transforms import (
    class_locations,
    crop_slices,
    foreground_box,
    nearest_index,
    normalise_intensity,
    resize_linear,
    resize_nearest,
    to_segvol_axes,
)
from segevo.data.readers import RawVolume, read_case
from segevo.data.summary import case_intensity, intensity_stats
from segevo.data.volumes import value_counts


def segvol_intensity(vol: RawVolume, consume: bool = False) -> np.ndarray:
    """The image normalised SegVol's way in raw array order: foreground normalisation (unless stored so),
    then min-max to [0, 1]. ``consume`` normalises ``vol.image`` in place and detaches it from ``vol``, so no
    second full-size volume is ever alive (the per-worker memory bound of the stages)."""
    if not consume:
        return normalise_intensity(vol.image, vol.normalised)
    image, vol.image = vol.image, None
    return normalise_intensity(image, vol.normalised, inplace=True)


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


def prepare_arrays(case: Case, roi: Sequence[int], channel: int | str = 0,
                   pseudo: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One case's model-ready arrays (the recipe of :mod:`segevo.data.preprocess`) and the manifest fields
    that describe them.

    ``pseudo`` is the case's pseudo-mask on its FH grid in raw array order (any grid shape).
    """
    if case.label is None:
        raise CaseError(f"{case.key}: has no label")
    vol = read_case(case, channel)
    raw_shape = vol.image.shape
    intensity = case_intensity(intensity_stats(vol.image, vol.label, case.label_map), case.label_map)
    full = to_segvol_axes(segvol_intensity(vol, consume=True))
    start, end = foreground_box(full)
    box = crop_slices(start, end)
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
