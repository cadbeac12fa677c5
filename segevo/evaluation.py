"""Evaluation on held-out cases: prompts from the ground truth, zoom-out-zoom-in, Dice and NSD per (case, class,
prompt), then summaries with bootstrap confidence intervals over cases.

Prompts come from each class's ground truth on the prep grid: its bounding box (no jitter, like SegVol's test
prompts) and ``positive_points`` points inside it plus ``negative_points`` outside, drawn with a generator seeded
by (seed, case, class), so every prompt type of a class sees the same box and points and reruns are identical.
The box-jitter ablation moves each box coordinate by a uniform integer in [-j, j] voxels (the prototype's
"±j" perturbation), clipped to the volume. Only classes present in a case are scored (an absent class has no
box or point to give); :data:`segevo.metrics.EMPTY_RULE` covers empty predictions.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from segevo.combinations import parts as combination_parts
from segevo.config import EvaluateConfig
from segevo.data.manifest import PrepCase
from segevo.data.prompts import bounding_box, sample_points
from segevo.inference import Predictor, Query
from segevo.metrics import bootstrap_ci, case_values, dice, nsd


@dataclass(frozen=True)
class Sample:
    """What one query of a case measures: its class, its prompt type and its box jitter."""

    structure: str
    prompt: str
    jitter: int = 0

    @property
    def variant(self) -> str:
        return self.prompt if not self.jitter else f"{self.prompt}±{self.jitter}"


def perturb_box(box: np.ndarray, voxels: int, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Each coordinate moved by a uniform integer in [-voxels, voxels], kept in the volume and ordered."""
    if voxels <= 0:
        return box
    moved = box + rng.integers(-voxels, voxels + 1, size=6)
    limit = np.array(shape, dtype=np.float64) - 1
    lo, hi = np.clip(moved[:3], 0, limit), np.clip(moved[3:], 0, limit)
    return np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)]).astype(np.float32)


def case_rng(seed: int, key: str, structure: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode()), zlib.crc32(structure.encode())])


def case_queries(case: PrepCase, label: np.ndarray, cfg: EvaluateConfig) -> list[tuple[Sample, Query]]:
    """Every (class, prompt variant) query of one case, prompts from its ground truth."""
    wanted = [c for c in case.classes if case.voxels.get(c, 0) > 0 and (cfg.classes is None or c in cfg.classes)]
    out: list[tuple[Sample, Query]] = []
    for structure in wanted:
        truth = label == case.classes.index(structure) + 1
        if not truth.any():
            continue
        rng = case_rng(cfg.seed, case.key, structure)
        box = bounding_box(truth)
        n = cfg.positive_points + cfg.negative_points
        coords, labels = sample_points(truth, cfg.positive_points, cfg.negative_points, n, rng)
        keep = labels >= 0
        points, point_labels = coords[keep], labels[keep]
        task = (case.source, structure)
        for prompt in cfg.prompts:
            parts = combination_parts(prompt)
            out.append((Sample(structure, prompt), Query(
                structure if "text" in parts else None, box if "box" in parts else None,
                points if "point" in parts else None, point_labels if "point" in parts else None, task)))
        for j in (j for j in cfg.box_jitter if j > 0):
            out.append((Sample(structure, "text+box", j),
                        Query(structure, perturb_box(box, j, label.shape, rng), task=task)))
    return out


def evaluate_case(predictor: Predictor, case: PrepCase, image: np.ndarray, label: np.ndarray, cfg: EvaluateConfig,
                  keep: Callable[[Sample], bool] | None = None) -> tuple[list[dict], dict[Sample, np.ndarray]]:
    """Metric rows for every query of a case, plus the masks of the samples ``keep`` selects (for overlays)."""
    from segevo.data.cases import base_modality

    queries = case_queries(case, label, cfg)
    rows, kept = [], {}
    results = predictor.run(image, case.modality, [q for _, q in queries])
    structure, truth = None, None  # a class's queries come in a run: one mask at a time, built once
    for (sample, _), result in zip(queries, results, strict=True):
        if sample.structure != structure:
            structure, truth = sample.structure, label == case.classes.index(sample.structure) + 1
        pred = result.mask
        rows.append({
            "case": case.key, "source": case.source, "modality": base_modality(case.modality),
            "class": sample.structure, "prompt": sample.prompt, "jitter": sample.jitter,
            "dice": dice(pred, truth),
            # the jitter ablation reports Dice only: NSD's surface distances are the slow part of evaluation
            "nsd": nsd(pred, truth, case.spacing, cfg.nsd_tolerance_mm) if not sample.jitter else None,
            "predicted_voxels": int(pred.sum()), "truth_voxels": int(truth.sum()),
            "windows": result.windows, "seconds": round(result.seconds, 4),
        })
        if keep is not None and keep(sample):
            kept[sample] = pred
    return rows, kept


def evaluate_case_models(predictors: Mapping[str, Predictor], case: PrepCase, image: np.ndarray, label: np.ndarray,
                         cfg: EvaluateConfig, base_keys: Mapping[str, str | None]) -> list[dict]:
    """Metric rows of one case for several models (``variant`` names them), the volume loaded once by the caller.

    A model whose rows of this case's modality compute exactly its base SegVol (:meth:`computes_base`) shares
    them with every other such model on the same base (``base_keys``: equal strings mean provably equal base
    weights, None unknown): they are computed once and copied, marked ``reused_from``.
    """
    rows: list[dict] = []
    computed: dict[str, tuple[str, list[dict]]] = {}
    for name, predictor in predictors.items():
        key = base_keys.get(name) if predictor.model.computes_base(case.modality) else None
        if key is not None and key in computed:
            source, done = computed[key]
            rows.extend({**r, "variant": name, "reused_from": source} for r in done)
            continue
        case_rows, _ = evaluate_case(predictor, case, image, label, cfg)
        case_rows = [{**r, "variant": name, "reused_from": None} for r in case_rows]
        if key is not None:
            computed[key] = (name, case_rows)
        rows.extend(case_rows)
    return rows


def _case_means(rows: Iterable[dict], metric: str) -> list[float]:
    """One value per case (:func:`segevo.metrics.case_values`), in case order."""
    return [v for _, v in sorted(case_values(rows, metric).items())]


def summarise(rows: Sequence[dict], keys: Sequence[str], n_resamples: int, seed: int) -> list[dict]:
    """Mean Dice and NSD with bootstrap 95% CIs over cases, per group of ``keys``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for group, members in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        entry = dict(zip(keys, group, strict=True))
        cases = _case_means(members, "dice")
        entry["cases"] = len(cases)
        entry["samples"] = len(members)
        for metric in ("dice", "nsd"):
            values = _case_means(members, metric)
            if not values:
                continue
            mean, lo, hi = bootstrap_ci(values, n_resamples, seed=seed)
            entry.update({metric: round(mean, 4), f"{metric}_lo": round(lo, 4), f"{metric}_hi": round(hi, 4)})
        out.append(entry)
    return out
