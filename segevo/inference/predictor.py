"""The library's one entry to segmentation (after nnU-Net's ``nnUNetPredictor``): a model, the ``inference``
options and a device, used by ``segevo predict`` and ``segevo evaluate`` alike.

Two doors:

- **file space** (:meth:`Predictor.predict_file`, :meth:`Predictor.predict_array`): a NIfTI file or a raw array
  and queries in that array's own voxel coordinates (what a viewer shows). The image gets SegVol's intensity
  normalisation, axis transposition and foreground crop (:func:`segevo.data.preprocess.geometry.prepare_image`), the
  prompts the same geometry (:func:`to_model`), and the masks come back on the input's exact grid as one label
  map (query i is label i, overlaps going to the most confident query), ready to write as NIfTI on the input's
  affine (:meth:`Prediction.save`).
- **model space** (:meth:`Predictor.run`): an already preprocessed (D, H, W) volume in [0, 1] and queries in
  its coordinates, one :class:`~segevo.inference.zoom.QueryResult` (logits, mask) per query: what evaluation
  runs on prepared cases.

Prompts are checked once, by :func:`~segevo.inference.prompts.check_query`: against the input array in file
space, against the volume in model space.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segevo.config import AdaptersConfig, InferenceConfig, ModelConfig, PriorsConfig
from segevo.data.manifest import AXIS_ORDER
from segevo.inference.prompts import PromptError, Query, check_query
from segevo.inference.zoom import QueryResult, ZoomInference
from segevo.model.adapted import AdaptedSegVol


def load_for_inference(model_cfg: ModelConfig, adapter: str | None = None, weights: str | None = None,
                       trust_pickle: bool = False, seed: int | None = None) -> AdaptedSegVol:
    """An adapter checkpoint on its base (``weights``, else the base it records), or plain SegVol (no experts,
    no priors: every modality gets the base model) from ``weights``, else the random base ``seed`` makes."""
    from segevo import load_model
    from segevo.model.adapter_io import build_from_adapters, seeded_base

    if adapter is not None:
        return build_from_adapters(adapter, weights, trust_pickle)
    if weights is None and seed is not None:
        base = seeded_base(model_cfg, seed)
    else:
        base = load_model(weights, model_cfg, trust_pickle=trust_pickle)
    model = AdaptedSegVol(base, AdaptersConfig(enabled=False, fallback="CT"), PriorsConfig(enabled=False)).eval()
    model.base_origin = {"weights": str(weights) if weights else None, "seed": None if weights else seed}
    return model


def to_model(query: Query, start: Sequence[int], end: Sequence[int], order: Sequence[int] = AXIS_ORDER) -> Query:
    """A checked file-space query on the model-space volume: SegVol's axis order, minus the foreground crop's
    start; a box is cut to the crop (an error if nothing of it is left), points are moved onto it. The class name
    is the prior's task unless the query names one."""
    order = list(order)
    lo, size = np.asarray(start), np.asarray(end) - np.asarray(start)
    box = points = None
    if query.box is not None:
        b = np.concatenate([query.box[:3][order], query.box[3:][order]]) - np.concatenate([lo, lo])
        if np.any(b[3:] < 0) or np.any(b[:3] > size - 1):
            raise PromptError(f"box {query.box.tolist()} covers only background: it lies outside the image's "
                              "non-zero region")
        box = np.concatenate([np.maximum(b[:3], 0), np.minimum(b[3:], size - 1)])
    if query.points is not None:
        points = np.clip(query.points[:, order] - lo, 0, size - 1)
    task = query.task if query.task is not None else query.text
    return Query(query.text, box, points, query.point_labels, task)


@dataclass
class Outcome:
    """What one query of a file-space prediction gave: its label's size and how inference went."""

    name: str
    voxels: int
    non_finite: int  # NaN/Inf logits, read as background: the model failing, not an absent structure
    roi: tuple[tuple[int, int], ...] | None
    windows: int
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Prediction:
    """One label map on the input's grid (0 background, i for the i-th query) and what each query gave."""

    labels: np.ndarray
    outcomes: list[Outcome]
    affine: np.ndarray | None = None
    source: Any = None  # the nibabel image it came from (header, qform, sform), if any

    @property
    def names(self) -> dict[str, str]:
        return {str(i): o.name for i, o in enumerate(self.outcomes, start=1)}

    def save(self, out: str | os.PathLike[str]) -> Path:
        """Write the label map as NIfTI (gzip by suffix) on the input's affine, header and orientation codes,
        atomically."""
        import nibabel as nib

        from segevo.io import atomic_write_bytes

        if self.affine is None:
            raise ValueError("this prediction has no affine: give one to predict_array to write NIfTI")
        header = self.source.header.copy() if self.source is not None else nib.Nifti1Header()
        header.set_data_dtype(self.labels.dtype)
        header.set_slope_inter(1, 0)
        nifti = nib.Nifti1Image(self.labels, self.affine, header)
        if self.source is not None:
            nifti.set_qform(self.source.get_qform(), int(self.source.header["qform_code"]))
            nifti.set_sform(self.source.get_sform(), int(self.source.header["sform_code"]))
        return atomic_write_bytes(out, _nifti_bytes(nifti, Path(out)))


class Predictor:
    """A model ready to segment: ``run`` in model space, ``predict_file`` / ``predict_array`` in file space."""

    def __init__(self, model: AdaptedSegVol, options: InferenceConfig | None = None,
                 device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(device).eval()
        self.zoom = ZoomInference(self.model, options, device)

    @classmethod
    def load(cls, model_cfg: ModelConfig, options: InferenceConfig | None = None, adapter: str | None = None,
             weights: str | None = None, trust_pickle: bool = False,
             device: torch.device | str | None = None) -> Predictor:
        """From checkpoints: see :func:`load_for_inference`."""
        return cls(load_for_inference(model_cfg, adapter, weights, trust_pickle), options, device)

    @property
    def options(self) -> InferenceConfig:
        return self.zoom.options

    def run(self, image: np.ndarray, modality: str, queries: Sequence[Query]) -> Iterator[QueryResult]:
        """Model space: ``image`` preprocessed ((D, H, W), [0, 1]), queries in its coordinates; one result per
        query, in order, computed as it is taken."""
        return self.zoom.run(image, modality, queries)

    def predict_file(self, path: str | os.PathLike[str], modality: str, queries: Sequence[Query],
                     channel: int = 0) -> Prediction:
        """File space on a NIfTI file (one ``channel`` of a 4D file): the label map on its grid and affine."""
        from segevo.data.readers import read_image

        raw, img = read_image(path, channel)
        prediction = self.predict_array(raw, modality, queries, affine=img.affine)
        prediction.source = img
        return prediction

    def predict_array(self, array: np.ndarray, modality: str, queries: Sequence[Query],
                      affine: np.ndarray | None = None, normalised: bool = False) -> Prediction:
        """File space on a raw array (file axis order, raw intensities unless ``normalised``)."""
        from segevo.data.preprocess.geometry import paste_back, prepare_image

        checked = [check_query(q, array.shape) for q in queries]
        if not checked:
            raise PromptError("give at least one query")
        volume, start, end = prepare_image(np.asarray(array, dtype=np.float32), normalised)
        labels = np.zeros(volume.shape, dtype=np.uint8 if len(checked) < 256 else np.uint16)
        best = np.full(volume.shape, -np.inf, dtype=np.float32)
        outcomes = []
        model_queries = [to_model(q, start, end) for q in checked]
        for i, (query, result) in enumerate(zip(checked, self.run(volume, modality, model_queries),
                                                strict=True), start=1):
            win = result.mask & (result.logits > best)
            labels[win] = i
            best[win] = result.logits[win]
            bad = int(result.logits.size - np.count_nonzero(np.isfinite(result.logits)))
            outcomes.append(Outcome(query.name, int(result.mask.sum()), bad, result.roi, result.windows,
                                    result.seconds, result.notes))
        return Prediction(paste_back(labels, array.shape, start, end), outcomes, affine)

    def untrained(self, names: Sequence[str]) -> dict[str, list[str]]:
        """The class names outside the model's task vocabulary (they run with the null task prior), each with
        the closest trained names; empty for a model without priors."""
        if self.model.priors is None:
            return {}
        return {n: list(self.model.tasks.closest(n)) for n in names if self.model.tasks.id(None, n) == 0}


def _nifti_bytes(nifti: Any, out: Path) -> bytes:
    """Serialise in memory (gzip by suffix) so the file lands atomically."""
    import gzip
    import io

    raw = nifti.to_bytes()
    if not out.name.endswith(".gz"):
        return raw
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(raw)
    return buffer.getvalue()
