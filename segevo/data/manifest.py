"""The manifest: the contract between the data stages and training (one row per preprocessed case).

``segevo preprocess`` writes ``<prep>/manifest.json``; the split, the loader, training and evaluation read it.
Each row says where the model-ready arrays are and how to map a prediction back onto the raw NIfTI grid:

- arrays (paths relative to the manifest's folder), all in SegVol's axis order (D, H, W), i.e. the raw array
  transposed by ``axis_order`` = (2, 1, 0), then cropped to the foreground box ``crop_start:crop_end``:
  ``image`` float16 in [0, 1]; ``label`` uint8 class indices (0 background, i + 1 = ``classes[i]``);
  ``pseudo`` int16 pseudo-mask region ids (-1 none) or None; ``zoom_image`` / ``zoom_label`` /
  ``zoom_pseudo``: the same volumes resized to the model's ROI (trilinear / nearest / nearest), for the
  "resize the whole volume" samples; ``locations`` int32 (class, d, h, w) rows, up to 1024 voxels per class;
- ``shape`` (D, H, W) after the crop, ``raw_shape`` of the raw array, ``affine`` of the raw NIfTI (4x4),
  ``spacing`` (D, H, W) in mm;
- ``classes`` in the unified vocabulary, ``voxels`` per class (for balanced sampling), provenance
  (``raw_sha256``) and identity (``source``, ``case_id``, ``patient_id``, ``modality``), what the split must
  honour (``subset``: the source's official list; ``segvol_seen``: in SegVol's training data), and the raw
  image's intensity statistics per class (``intensity``, for the data summary);
- ``notes``: what preprocessing decided for the case (the channel kept of a multi-channel image, voxels in
  several M3D-Seg channels, labelled voxels outside the foreground crop).

``segevo.data.preprocess.geometry.to_raw_grid`` maps a prep-grid volume back onto the raw grid
(``from_raw_grid`` is the forward direction).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

from segevo.errors import UserError
from segevo.io import atomic_write_json, read_json, read_npy

MANIFEST_VERSION = 1
AXIS_ORDER = (2, 1, 0)


class ManifestError(UserError):
    """The manifest is missing, malformed, or points at missing arrays."""


@dataclass(frozen=True)
class PrepCase:
    __pydantic_config__ = ConfigDict(extra="forbid")  # the manifest reader validates rows against these fields

    source: str
    case_id: str
    patient_id: str
    modality: str
    classes: tuple[str, ...]
    image: str
    label: str
    zoom_image: str
    zoom_label: str
    shape: tuple[int, int, int]
    raw_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_end: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    raw_sha256: str
    voxels: dict[str, int] = field(default_factory=dict)
    pseudo: str | None = None
    zoom_pseudo: str | None = None
    locations: str | None = None
    axis_order: tuple[int, int, int] = AXIS_ORDER
    annotation: str = "manual"
    notes: tuple[str, ...] = ()  # what preprocessing had to decide: channel kept, overlaps, voxels cropped away
    subset: str | None = None  # the source's official list (train / val / test), honoured by the split
    segvol_seen: bool = False  # SegVol was trained on this scan (an M3D-Seg train list): never in test by default
    # raw image per class: [voxels, sum, sum of squares, p0.5, p50, p99.5] (segevo.data.summary)
    intensity: dict[str, list[float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.source}/{self.case_id}"

    def path(self, root: Path, name: str) -> Path:
        """Absolute path of one of the case's arrays (``image``, ``label``, ``pseudo``, ...)."""
        rel = getattr(self, name)
        if rel is None:
            raise ManifestError(f"{self.key}: has no {name} array")
        return root / rel


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def write_manifest(path: str | Path, cases: list[PrepCase], meta: dict[str, Any]) -> Path:
    rows = [asdict(c) for c in sorted(cases, key=lambda c: c.key)]
    return atomic_write_json(path, {"version": MANIFEST_VERSION, "meta": meta, "cases": rows})


def read_manifest(path: str | Path) -> tuple[list[PrepCase], dict[str, Any]]:
    """The manifest's cases and meta. Every row is checked against :class:`PrepCase` strictly (types, lengths,
    no unknown keys), so a hand-edited or foreign file fails here, naming the file, row and field."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no manifest (run 'segevo preprocess' first)")
    data = read_json(path, "manifest", ManifestError)
    if data.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest version {data.get('version')!r}, expected {MANIFEST_VERSION}")
    meta = data.get("meta", {})
    if not isinstance(data.get("cases"), list) or not isinstance(meta, dict):
        raise ManifestError(f"{path}: malformed manifest: expected 'cases' (a list) and 'meta' (an object)")
    try:
        cases = _ROWS.validate_json(json.dumps(data["cases"]), strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path}: malformed manifest: cases.{where}: {first['msg']}") from None
    bad = next((c for c in cases if min(c.shape) < 1 or min(c.raw_shape) < 1), None)
    if bad is not None:
        raise ManifestError(f"{path}: malformed manifest: {bad.key}: empty shape {bad.shape} or {bad.raw_shape}")
    return cases, meta


_ROWS = TypeAdapter(list[PrepCase])
_ON_PREP_GRID = ("image", "label", "pseudo")
ARRAYS = ("image", "label", "pseudo", "zoom_image", "zoom_label", "zoom_pseudo", "locations")


def read_prep_array(case: PrepCase, root: Path, name: str, mmap: bool = False) -> Any:
    """One of a case's prepared arrays, checked: readable (not truncated), for the arrays on the prep grid of the
    shape the manifest gives, and finite when read in full; errors name the file and the case."""
    path = case.path(root, name)
    array = read_npy(path, f"prepared {name} array of {case.key}", mmap=mmap)
    if name in _ON_PREP_GRID and tuple(array.shape) != tuple(case.shape):
        raise ManifestError(f"{path}: shape {tuple(array.shape)}, but the manifest gives {tuple(case.shape)} for "
                            f"{case.key} (rerun 'segevo preprocess')")
    if not mmap and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ManifestError(f"{path}: NaN/Inf values in the prepared {name} array of {case.key} "
                            "(rerun 'segevo preprocess')")
    return array


def check_prep_arrays(cases: list[PrepCase], root: Path) -> None:
    """Every array of every case opened memory-mapped (cheap: headers and sizes only), before a run starts."""
    for case in cases:
        for name in ARRAYS:
            if getattr(case, name) is not None:
                read_prep_array(case, root, name, mmap=True)
