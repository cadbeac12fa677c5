"""SegVol's zoom-out-zoom-in inference on one preprocessed volume, for any prompt type, batched.

1. **Zoom-out**: the whole (cropped, (D, H, W), [0, 1]) volume is resized to the model ROI and segmented once;
   every query's prompts are mapped into that grid, and all queries share one encoder pass (the prior fusion
   runs once per distinct task; queries are decoded a block at a time, which bounds the memory of volumes
   with hundreds of queries). The logits go back to the volume by nearest neighbour.
2. **ROI**: the bounding box of the coarse mask, grown to at least the window (the ROI size) around its centre,
   shifted inside the volume where the volume allows it (SegVol clips instead, which only loses context).
3. **Zoom-in**: windows of the ROI size with ``overlap`` (MONAI's window grid, laid over the whole volume so
   that the queries of a volume share windows; the volume is zero padded where it is smaller than a window),
   those that overlap the ROI. Each window gets its own prompts: the text as given, the user's
   points that fall inside it, and a box: the user's box when one window covers the ROI, otherwise the box of
   the coarse mask inside the window (SegVol's rule; point queries get that box too). A window left with no
   prompt at all is skipped. Windows are encoded in batches of ``window_batch``, their tokens cached for the
   other queries of the volume, and averaged where they overlap.
4. The zoom-in logits **replace** the global ones inside the ROI where windows ran; the mask is ``logits > 0``.

Prompts are in the volume's voxel coordinates (D, H, W): boxes inclusive ``[d0, h0, w0, d1, h1, w1]``, points
labelled 1 (positive) or 0 (negative).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segevo.config import AdaptersConfig, InferenceConfig, ModelConfig, PriorsConfig
from segevo.data.prompts import bounding_box
from segevo.errors import UserError
from segevo.model.adapted import AdaptedSegVol
from segevo.model.segvol import Prompts


class PromptError(UserError):
    """A prompt that cannot apply to the volume (outside it, malformed, or missing)."""


@dataclass(frozen=True)
class Query:
    """One object to segment, in the volume's (D, H, W) voxel coordinates; ``task`` selects the prior (a class
    name, a (dataset, class) pair or a task id; None is the null task)."""

    text: str | None = None
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    task: object = None

    @property
    def combination(self) -> str:
        parts = [n for n, v in (("text", self.text), ("box", self.box), ("point", self.points)) if v is not None]
        return "+".join(parts)


@dataclass
class QueryResult:
    logits: np.ndarray  # float32 on the volume's grid
    roi: tuple[tuple[int, int], ...] | None  # zoom-in region (start, end) per axis, None if nothing was found
    windows: int  # windows run in the zoom-in
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        return self.logits > 0


def check_query(query: Query, shape: Sequence[int]) -> Query:
    """Validate a query against the volume: clear errors for empty, malformed or out-of-volume prompts."""
    if query.text is None and query.box is None and query.points is None:
        raise PromptError("a query needs at least one of a class name, a box or points")
    limit = np.asarray(shape, dtype=np.float64) - 1
    box = points = labels = None
    if query.box is not None:
        box = np.asarray(query.box, dtype=np.float64).reshape(-1)
        if box.size != 6 or not np.all(np.isfinite(box)):
            raise PromptError(f"box must be 6 finite numbers d0,h0,w0,d1,h1,w1, got {query.box!r}")
        if np.any(box[:3] > box[3:]):
            raise PromptError(f"box {box.tolist()} has a start after its end")
        if np.any(box[3:] < 0) or np.any(box[:3] > limit):
            raise PromptError(f"box {box.tolist()} lies outside the volume of shape {tuple(shape)}")
        box = np.concatenate([np.clip(box[:3], 0, limit), np.clip(box[3:], 0, limit)])
    if query.points is not None:
        points = np.asarray(query.points, dtype=np.float64).reshape(-1, 3)
        labels = (np.ones(len(points), np.int64) if query.point_labels is None
                  else np.asarray(query.point_labels, dtype=np.int64).reshape(-1))
        if len(points) == 0 or len(labels) != len(points):
            raise PromptError("points need one label each and at least one point")
        if not np.all(np.isin(labels, (0, 1))):
            raise PromptError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(labels))}")
        outside = np.any((points < 0) | (points > limit), axis=1)
        if outside.any():
            raise PromptError(f"point {points[outside][0].tolist()} lies outside the volume of shape {tuple(shape)}")
        if not np.any(labels == 1):
            raise PromptError("points need at least one positive point (label 1)")
    return Query(query.text, box, points, labels, query.task)


def load_for_inference(model_cfg: ModelConfig, adapter: str | None = None, weights: str | None = None,
                       trust_pickle: bool = False) -> AdaptedSegVol:
    """The model ``predict`` and ``evaluate`` run: an adapter checkpoint on its base (``weights``, else the base it
    records), or plain SegVol from ``weights`` (no experts, no priors: every modality gets the base model)."""
    from segevo import load_model
    from segevo.model.adapter_io import build_from_adapters

    if adapter is not None:
        return build_from_adapters(adapter, weights, trust_pickle)
    base = load_model(weights, model_cfg, trust_pickle=trust_pickle)
    return AdaptedSegVol(base, AdaptersConfig(enabled=False, fallback="CT"), PriorsConfig(enabled=False)).eval()


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """MONAI's sliding-window grid on one axis: stride ``window * (1 - overlap)``, the last window flush with
    the end; ``size`` is at least ``window`` (the caller pads)."""
    if size <= window:
        return [0]
    stride = max(int(window * (1 - overlap)), 1)
    n = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def grow_roi(mask: np.ndarray, window: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """Bounding box (start, end exclusive) of ``mask`` grown to at least ``window`` per axis, kept in the volume."""
    box = bounding_box(mask)
    if box is None:
        return None
    roi = []
    for n, w, lo, hi in zip(mask.shape, window, box[:3], box[3:], strict=True):
        start, end = int(lo), int(hi) + 1
        if end - start < w:
            start -= (w - (end - start)) // 2
            start = max(0, min(start, n - w))
            end = min(n, start + w)
        roi.append((start, end))
    return tuple(roi)


class ZoomInference:
    """Zoom-out-zoom-in with one model on one device; ``run`` yields one result per query, in order."""

    def __init__(self, model: AdaptedSegVol, options: InferenceConfig | None = None,
                 device: torch.device | str | None = None):
        self.model = model.eval()
        self.options = options or InferenceConfig()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.roi = tuple(int(r) for r in model.base.cfg.roi_size)

    def _task_id(self, task: object) -> int:
        if task is None or isinstance(task, int):
            return int(task or 0)
        return int(self.model.task_ids([task], 1, self.device)[0])

    def _autocast(self):
        if self.options.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def run(self, image: np.ndarray, modality: str, queries: Sequence[Query]) -> Iterator[QueryResult]:
        """Segment every query in ``image`` ((D, H, W), values in [0, 1]) of the given modality."""
        image = np.asarray(image)
        if image.ndim != 3 or min(image.shape) < 1:
            raise UserError(f"expected a 3D (D, H, W) volume, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise UserError("volume contains NaN/Inf voxels")
        queries = [check_query(q, image.shape) for q in queries]
        expert = self.model.experts_of(modality, 1)[0]
        volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
        tasks = [self._task_id(q.task) for q in queries]
        # The expert's merged weights are swapped in only while computing, never across a yield: interleaved
        # generators over one model must not see (or restore) each other's weights.
        with self.model.expert_context(expert), self._autocast():
            x = F.interpolate(volume[None, None], size=self.roi, mode="trilinear", align_corners=False)
            tokens = self.model.image_tokens(x, [expert])
        cache: dict[tuple[int, ...], torch.Tensor] = {}
        block = 4 * self.options.window_batch  # coarse logits of a block of queries at a time bound the memory
        for first in range(0, len(queries), block):
            rows = list(range(first, min(first + block, len(queries))))
            start = time.perf_counter()
            with self.model.expert_context(expert), self._autocast():
                coarse = self._zoom_out(tokens, volume.shape, expert, [queries[i] for i in rows],
                                        [tasks[i] for i in rows])
            shared = (time.perf_counter() - start) / len(rows)
            for i, low in zip(rows, coarse, strict=True):
                begin = time.perf_counter()
                result = QueryResult(logits=np.empty(0, np.float32), roi=None, windows=0, seconds=0.0)
                with self.model.expert_context(expert), self._autocast():
                    logits = F.interpolate(low[None, None], size=image.shape, mode="nearest-exact")[0, 0]
                    if self.options.zoom_in:
                        self._zoom_in(volume, logits, expert, queries[i], tasks[i], cache, result)
                result.logits = logits.float().cpu().numpy()
                result.seconds = shared + time.perf_counter() - begin
                yield result

    # ---- zoom-out -------------------------------------------------------------------------------------------

    def _zoom_out(self, tokens: torch.Tensor, shape: Sequence[int], expert: str, queries: list[Query],
                  tasks: list[int]) -> list[torch.Tensor]:
        """Global logits at the ROI size, one per query, from the resized volume's tokens: one decoder batch
        per task (the prior fusion runs once per distinct task). Where the priors do not act (an identity expert),
        the task changes nothing, so the queries are batched exactly as plain SegVol batches them: a row's bits
        depend on its batch on some BLAS kernels, and identity rows must be SegVol's bit for bit."""
        scale = np.array(self.roi, dtype=np.float64) / np.array(shape, dtype=np.float64)
        out: list[torch.Tensor | None] = [None] * len(queries)
        if not self.model.priors_apply(expert):
            tasks = [0] * len(tasks)
        for task in dict.fromkeys(tasks):
            members = [i for i, t in enumerate(tasks) if t == task]
            emb, state = self.model.with_priors(tokens, [expert], torch.tensor([task], device=self.device))
            for chunk in range(0, len(members), self.options.window_batch):
                rows = members[chunk : chunk + self.options.window_batch]
                requests = [(queries[i].combination, self._scaled_prompts(queries[i], scale)) for i in rows]
                logits = self.model.decode(emb, state, [expert], requests)
                for i, row in zip(rows, logits, strict=True):
                    out[i] = row[0, 0].float()
        return out  # type: ignore[return-value]

    def _scaled_prompts(self, query: Query, scale: np.ndarray) -> Prompts:
        """A query's prompts in the zoomed-out grid (continuous voxel coordinates; box edges map as edges)."""
        boxes = points = None
        if query.box is not None:
            lo = query.box[:3] * scale
            hi = (query.box[3:] + 1) * scale - 1
            boxes = self._tensor(np.concatenate([lo, np.maximum(hi, lo)])[None])
        if query.points is not None:
            coords = (query.points + 0.5) * scale - 0.5
            points = (self._tensor(coords[None]), torch.as_tensor(query.point_labels[None], device=self.device))
        return Prompts([query.text] if query.text is not None else None, boxes, points)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.float32), device=self.device)

    # ---- zoom-in --------------------------------------------------------------------------------------------

    def _zoom_in(self, volume: torch.Tensor, logits: torch.Tensor, expert: str, query: Query, task: int,
                 cache: dict[tuple[int, ...], torch.Tensor], result: QueryResult) -> None:
        coarse = (logits > 0).cpu().numpy()
        roi = grow_roi(coarse, self.roi)
        if roi is None:
            result.notes.append("zoom-out found no foreground: zoom-out result kept")
            return
        result.roi = roi
        origins = self._windows(volume.shape, roi)
        single = len(origins) == 1
        jobs: dict[str, list[tuple[tuple[int, ...], Prompts]]] = {}
        for origin in origins:
            combo, prompts = self._window_prompts(query, origin, coarse, single)
            if combo:
                jobs.setdefault(combo, []).append((origin, prompts))
        size = tuple(e - s for s, e in roi)
        total = torch.zeros(size, device=self.device)
        count = torch.zeros(size, device=self.device)
        for combo, items in jobs.items():
            for chunk in range(0, len(items), self.options.window_batch):
                batch = items[chunk : chunk + self.options.window_batch]
                tokens = torch.cat([self._tokens(volume, o, expert, cache) for o, _ in batch])
                b = len(batch)
                emb, state = self.model.with_priors(tokens, [expert] * b, torch.full((b,), task, device=self.device))
                out = self.model.decode(emb, state, [expert] * b, [(combo, _stack([p for _, p in batch]))])
                for (origin, _), window in zip(batch, out[0, :, 0], strict=True):
                    # the part of the window inside the ROI, in ROI and in window coordinates
                    lo = [max(o, s) for o, (s, _) in zip(origin, roi, strict=True)]
                    hi = [min(o + w, e) for o, w, (_, e) in zip(origin, self.roi, roi, strict=True)]
                    in_roi = tuple(slice(a - s, b - s) for a, b, (s, _) in zip(lo, hi, roi, strict=True))
                    in_win = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))
                    total[in_roi] += window[in_win].float()
                    count[in_roi] += 1
                result.windows += b
        if not result.windows:
            result.notes.append("no window had a prompt: zoom-out result kept")
            return
        region = logits[roi[0][0] : roi[0][1], roi[1][0] : roi[1][1], roi[2][0] : roi[2][1]]
        covered = count > 0
        region[covered] = (total[covered] / count[covered]).to(region.dtype)

    def _windows(self, shape: Sequence[int], roi: tuple[tuple[int, int], ...]) -> list[tuple[int, ...]]:
        """Origins of the windows that overlap the ROI, on one sliding-window grid over the whole (padded) volume:
        the queries of a volume share windows, so each window is encoded once per volume."""
        axes = []
        for n, w, (s, e) in zip(shape, self.roi, roi, strict=True):
            starts = window_starts(max(n, w), w, self.options.overlap)
            axes.append([a for a in starts if a < e and a + w > s])
        return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]

    def _tokens(self, volume: torch.Tensor, origin: tuple[int, ...], expert: str,
                cache: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
        """ViT tokens of the window at ``origin`` (zero padded past the volume), cached for the volume's queries."""
        if origin not in cache:
            crop = volume[tuple(slice(o, o + w) for o, w in zip(origin, self.roi, strict=True))]
            pad = [p for n, w in zip(reversed(crop.shape), reversed(self.roi), strict=True) for p in (0, w - n)]
            window = F.pad(crop, pad) if any(pad) else crop
            cache[origin] = self.model.image_tokens(window[None, None], [expert])
        return cache[origin]

    def _window_prompts(self, query: Query, origin: tuple[int, ...], coarse: np.ndarray,
                        single: bool) -> tuple[str, Prompts]:
        o = np.array(origin, dtype=np.float64)
        w = np.array(self.roi, dtype=np.float64)
        box = points = None
        if query.box is not None and single:
            lo, hi = np.maximum(query.box[:3] - o, 0), np.minimum(query.box[3:] - o, w - 1)
            box = np.concatenate([lo, hi]) if np.all(lo <= hi) else None
        elif query.box is not None or query.points is not None:
            region = coarse[tuple(slice(int(a), int(a) + int(b)) for a, b in zip(o, w, strict=True))]
            box = bounding_box(region)
        if query.points is not None:
            local = query.points - o
            inside = np.all((local >= 0) & (local <= w - 1), axis=1)
            if np.any(inside & (query.point_labels == 1)):
                coords = np.zeros_like(query.points)
                labels = np.full(len(query.points), -1, dtype=np.int64)
                coords[: inside.sum()] = local[inside]
                labels[: inside.sum()] = query.point_labels[inside]
                points = (self._tensor(coords[None]), torch.as_tensor(labels[None], device=self.device))
        parts = [n for n, v in (("text", query.text), ("box", box), ("point", points)) if v is not None]
        if parts == ["text"] and query.text is not None and (query.box is not None or query.points is not None):
            parts = []  # a spatial query whose window has no spatial prompt: nothing to zoom in on
        text = [query.text] if query.text is not None else None
        return "+".join(parts), Prompts(text, self._tensor(box[None]) if box is not None else None, points)


def _stack(prompts: list[Prompts]) -> Prompts:
    """One batched prompt set from per-window (batch 1) prompt sets of the same combination."""
    first = prompts[0]
    text = [p.text[0] for p in prompts] if first.text is not None else None
    boxes = torch.cat([p.boxes for p in prompts]) if first.boxes is not None else None
    points = None
    if first.points is not None:
        points = (torch.cat([p.points[0] for p in prompts]), torch.cat([p.points[1] for p in prompts]))
    return Prompts(text, boxes, points)
