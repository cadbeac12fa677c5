"""SegVol's zoom-out-zoom-in inference on one preprocessed volume, for any prompt type, batched.

The defaults reproduce SegVol's released procedure (``forward_test`` of the HF code, pinned by
``reference/parity/zoom_case.npz``); each step names the ``inference`` option that swaps in a faster choice.

1. **Zoom-out**: the whole (cropped, (D, H, W), [0, 1]) volume is resized to the model ROI (``zoom_out_resize``:
   SegVol's ``nearest-exact``, or ``trilinear``) and segmented once; every query's prompts are mapped into that
   grid, and all queries share one encoder pass (the prior fusion runs once per distinct task; queries are
   decoded a block at a time, which bounds the memory of volumes with hundreds of queries). The logits go back
   to the volume by nearest neighbour.
2. **ROI** (``roi_rule``): the coarse mask's bounding box grown towards the window size, clipped to the volume
   (SegVol) or shifted inside it (see :mod:`segevo.inference.windows`).
3. **Zoom-in** (``window_grid``): windows of the ROI size with ``overlap`` over the ROI (SegVol), or on one grid
   over the whole volume shared by the volume's queries. Each window gets its own prompts: the text as given,
   the user's points inside it, and a box: the user's box when one window covers the ROI, otherwise the box of
   the coarse mask inside the window (SegVol's rule; point queries get that box too). A window whose box would
   be empty gets SegVol's box of -1s (``empty_windows: run``) or is skipped (``skip``). Windows are encoded in
   batches of ``window_batch``, their tokens cached for the other queries of the volume, and averaged where
   they overlap (constant blending).
4. The zoom-in logits **replace** the global ones inside the ROI where windows ran; the mask is ``logits > 0``.

SegVol runs in fp32 (``precision``; ``bf16`` autocast is the faster option). Prompts are in the volume's voxel
coordinates (D, H, W): boxes inclusive ``[d0, h0, w0, d1, h1, w1]``, points labelled 1 or 0. SegVol's point
mode samples points at random from the rasterised positive points in each window; here a window takes the
user's points inside it (deterministic, negatives kept), and a query may combine a box with points.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segevo.config import InferenceConfig
from segevo.data.prompts import bounding_box
from segevo.errors import UserError
from segevo.inference.prompts import Query, check_query
from segevo.inference.windows import Box, Window, grow_roi, overlap_slices, plan_windows, window_crop
from segevo.model.adapted import AdaptedSegVol
from segevo.model.segvol import Prompts

NO_BOX = np.full(6, -1.0)  # SegVol's box for a window where the coarse mask is empty


def to_volume(low: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zoom-out logits (ROI grid) back on the volume's grid, by nearest neighbour as SegVol does."""
    return F.interpolate(low[None, None], size=tuple(shape), mode="nearest")[0, 0]


@dataclass
class QueryResult:
    logits: np.ndarray  # float32 on the volume's grid
    roi: Box | None  # zoom-in region (start, end) per axis, None if nothing was found
    windows: int  # windows run in the zoom-in
    seconds: float
    zoom_out: np.ndarray | None = None  # float32 zoom-out logits on the model's ROI grid
    notes: list[str] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        return self.logits > 0

    @property
    def coarse(self) -> np.ndarray:
        """The zoom-out logits on the volume's grid, as the zoom-in saw them."""
        low = torch.from_numpy(self.zoom_out)
        return to_volume(low, self.logits.shape).numpy()


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
        resize = {"mode": "trilinear", "align_corners": False} if self.options.zoom_out_resize == "trilinear" \
            else {"mode": "nearest-exact"}
        # The expert's merged weights are swapped in only while computing, never across a yield: interleaved
        # generators over one model must not see (or restore) each other's weights.
        with self.model.expert_context(expert), self._autocast():
            x = F.interpolate(volume[None, None], size=self.roi, **resize)
            tokens = self.model.image_tokens(x, [expert])
        cache: dict[Window, torch.Tensor] = {}
        block = 4 * self.options.window_batch  # coarse logits of a block of queries at a time bound the memory
        for first in range(0, len(queries), block):
            rows = list(range(first, min(first + block, len(queries))))
            start = time.perf_counter()
            with self.model.expert_context(expert), self._autocast():
                coarse = self._zoom_out(tokens, volume.shape, expert, modality, [queries[i] for i in rows],
                                        [tasks[i] for i in rows])
            shared = (time.perf_counter() - start) / len(rows)
            for i, low in zip(rows, coarse, strict=True):
                begin = time.perf_counter()
                result = QueryResult(np.empty(0, np.float32), None, 0, 0.0, low.cpu().numpy())
                with self.model.expert_context(expert), self._autocast():
                    logits = to_volume(low, image.shape)
                    if self.options.zoom_in:
                        self._zoom_in(volume, logits, expert, modality, queries[i], tasks[i], cache, result)
                result.logits = logits.float().cpu().numpy()
                result.seconds = shared + time.perf_counter() - begin
                yield result

    # ---- zoom-out -------------------------------------------------------------------------------------------

    def _zoom_out(self, tokens: torch.Tensor, shape: Sequence[int], expert: str, modality: str,
                  queries: list[Query], tasks: list[int]) -> list[torch.Tensor]:
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
            emb, state = self.model.with_priors(tokens, [expert], torch.tensor([task], device=self.device), [modality])
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

    def _zoom_in(self, volume: torch.Tensor, logits: torch.Tensor, expert: str, modality: str, query: Query,
                 task: int, cache: dict[Window, torch.Tensor], result: QueryResult) -> None:
        coarse = (logits > 0).cpu().numpy()
        roi = grow_roi(coarse, self.roi, self.options.roi_rule)
        if roi is None:
            result.notes.append("zoom-out found no foreground: zoom-out result kept")
            return
        result.roi = roi
        windows = plan_windows(volume.shape, roi, self.roi, self.options.overlap, self.options.window_grid)
        single = len(windows) == 1
        jobs: dict[str, list[tuple[Window, Prompts]]] = {}
        for win in windows:
            combo, prompts = self._window_prompts(query, win, coarse, single)
            if combo:
                jobs.setdefault(combo, []).append((win, prompts))
        size = tuple(e - s for s, e in roi)
        total = torch.zeros(size, device=self.device)
        count = torch.zeros(size, device=self.device)
        for combo, items in jobs.items():
            for chunk in range(0, len(items), self.options.window_batch):
                batch = items[chunk : chunk + self.options.window_batch]
                tokens = torch.cat([self._tokens(volume, win, expert, cache) for win, _ in batch])
                b = len(batch)
                emb, state = self.model.with_priors(tokens, [expert] * b, torch.full((b,), task, device=self.device),
                                                     [modality] * b)
                out = self.model.decode(emb, state, [expert] * b, [(combo, _stack([p for _, p in batch]))])
                for (win, _), window in zip(batch, out[0, :, 0], strict=True):
                    places = overlap_slices(win, self.roi, roi)
                    if places is not None:
                        total[places[0]] += window[places[1]].float()
                        count[places[0]] += 1
                result.windows += b
        if not result.windows:
            result.notes.append("no window had a prompt: zoom-out result kept")
            return
        region = logits[roi[0][0] : roi[0][1], roi[1][0] : roi[1][1], roi[2][0] : roi[2][1]]
        covered = count > 0
        region[covered] = (total[covered] / count[covered]).to(region.dtype)

    def _tokens(self, volume: torch.Tensor, win: Window, expert: str,
                cache: dict[Window, torch.Tensor]) -> torch.Tensor:
        """ViT tokens of a window, cached for the other queries of the volume."""
        if win not in cache:
            cache[win] = self.model.image_tokens(window_crop(volume, win, self.roi)[None, None], [expert])
        return cache[win]

    def _window_prompts(self, query: Query, win: Window, coarse: np.ndarray, single: bool) -> tuple[str, Prompts]:
        """The prompts of one window, in its coordinates; the combination is empty when the window is skipped."""
        o = np.array(win.origin, dtype=np.float64)
        w = np.array(self.roi, dtype=np.float64)
        seen_lo = np.array([s for s, _ in win.region], dtype=np.float64)
        seen_hi = np.array([e - 1 for _, e in win.region], dtype=np.float64)
        spatial = query.box is not None or query.points is not None
        box = points = None
        if query.box is not None and single:
            lo = np.maximum(np.maximum(query.box[:3], seen_lo) - o, 0)
            hi = np.minimum(np.minimum(query.box[3:], seen_hi) - o, w - 1)
            box = np.concatenate([lo, hi]) if np.all(lo <= hi) else None
        elif spatial:
            box = bounding_box(window_crop(coarse, win, self.roi))
        if box is None and spatial and self.options.empty_windows == "run":
            box = NO_BOX
        if query.points is not None:
            local = query.points - o
            inside = np.all((local >= 0) & (local <= w - 1), axis=1)
            inside &= np.all((query.points >= seen_lo) & (query.points <= seen_hi), axis=1)
            if np.any(inside & (query.point_labels == 1)):
                coords = np.zeros_like(query.points)
                labels = np.full(len(query.points), -1, dtype=np.int64)
                coords[: inside.sum()] = local[inside]
                labels[: inside.sum()] = query.point_labels[inside]
                points = (self._tensor(coords[None]), torch.as_tensor(labels[None], device=self.device))
        parts = [n for n, v in (("text", query.text), ("box", box), ("point", points)) if v is not None]
        if parts == ["text"] and spatial:
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
