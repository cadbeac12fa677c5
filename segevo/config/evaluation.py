"""Inference and scoring: zoom-out-zoom-in (``inference``), the evaluation (``evaluate``) and the comparison of
variants (``compare``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from segevo.combinations import ALL as PROMPT_TYPES
from segevo.config.base import _Section


class InferenceConfig(_Section):
    """SegVol's zoom-out-zoom-in (``segevo predict`` and ``segevo evaluate``): a global pass on the volume resized
    to the ROI, then sliding windows of the ROI's size over the coarse mask's bounding box. The defaults are
    SegVol's released procedure; the other values are faster choices (see ``segevo/inference/``)."""

    zoom_in: bool = True
    overlap: float = Field(0.5, ge=0, lt=1)
    window_batch: int = Field(4, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    zoom_out_resize: Literal["nearest-exact", "trilinear"] = "nearest-exact"
    roi_rule: Literal["clip", "shift"] = "clip"
    window_grid: Literal["roi", "volume"] = "roi"
    empty_windows: Literal["run", "skip"] = "run"


class EvaluateConfig(_Section):
    """``segevo evaluate``: which cases, classes and prompts, the metrics' settings and the report."""

    split: Literal["test", "val", "train"] = "test"
    classes: list[str] | None = None
    max_cases: int | None = Field(None, gt=0)
    prompts: tuple[str, ...] = PROMPT_TYPES
    box_jitter: tuple[int, ...] = (0, 1, 5, 10, 50)
    positive_points: int = Field(4, gt=0)
    negative_points: int = Field(3, ge=0)
    nsd_tolerance_mm: float = Field(2.0, ge=0)
    bootstrap: int = Field(2000, ge=100)
    seed: int = 0
    overlays: int = Field(4, ge=0)
    report: str = "reports/eval"

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        unknown = [p for p in self.prompts if p not in PROMPT_TYPES]
        if unknown or not self.prompts:
            raise ValueError(f"prompts must be a non-empty subset of {', '.join(PROMPT_TYPES)}; got {unknown}")
        if any(j < 0 for j in self.box_jitter):
            raise ValueError("box_jitter values are voxels and must be >= 0")
        return self


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class CompareConfig(_Section):
    """The comparison (``segevo evaluate --variants``): named variants, each an overlay in ``overlays`` trained
    into ``models/<name>``, scored on the same cases with the same seeded prompts, and the paired differences of
    every variant against each of ``references``."""

    variants: tuple[str, ...] = ("base", "lora", "moa", "moa+priors", "lora+priors")
    references: tuple[str, ...] = ("base", "lora")
    overlays: str = "configs/variants"
    models: str = "models/variants"
    report: str = "reports/compare"

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        bad = [v for v in self.variants if not VARIANT_NAME.fullmatch(v)]
        if bad or not self.variants:
            raise ValueError(f"variants must be non-empty names of letters, digits and _.+-; got {bad or 'none'}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must not repeat a name")
        missing = [r for r in self.references if r not in self.variants]
        if missing:
            raise ValueError(f"references {missing} are not among the variants {list(self.variants)}")
        return self
