"""What a user asks for, and the one place where it is checked.

A :class:`Query` is one object to segment: any of a class name, a box and points, in the voxel coordinates of one
array. :func:`check_query` is the only validation of a query's prompts: ``segevo predict`` (through the
:class:`~segevo.inference.predictor.Predictor`, on the input file's array), ``segevo evaluate`` and
:class:`~segevo.inference.zoom.ZoomInference` (on the model-space volume) all call it, so a bad prompt reads the
same wherever it comes from. Boxes are inclusive ``[d0, h0, w0, d1, h1, w1]``; points are labelled 1 (positive)
or 0 (negative), at least one positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segevo.errors import UserError


class PromptError(UserError):
    """A prompt that cannot apply to the volume (outside it, malformed, or missing)."""


@dataclass(frozen=True)
class Query:
    """One object to segment, in some array's voxel coordinates (axis order of that array); ``task`` selects the
    prior (a class name, a (dataset, class) pair or a task id; None is the null task)."""

    text: str | None = None
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    task: object = None

    @property
    def combination(self) -> str:
        parts = [n for n, v in (("text", self.text), ("box", self.box), ("point", self.points)) if v is not None]
        return "+".join(parts)

    @property
    def name(self) -> str:
        """How the query's label is called in outputs: its class name, else ``object``."""
        return self.text if self.text is not None else "object"


def check_query(query: Query, shape: Sequence[int]) -> Query:
    """The query with float64 boxes and points and int64 labels, or a one-line :class:`PromptError`: no prompt at
    all, an empty class name, a malformed box or point set, or any coordinate outside ``shape``."""
    if query.text is None and query.box is None and query.points is None:
        raise PromptError("a query needs at least one of a class name, a box or points")
    if query.text is not None and (not isinstance(query.text, str) or not query.text.strip()):
        raise PromptError(f"a class name must be a non-empty string, got {query.text!r}")
    limit = np.asarray(shape, dtype=np.float64) - 1
    where = f"the volume of shape {tuple(int(n) for n in shape)} (indices 0..{tuple(int(v) for v in limit)})"
    box = points = labels = None
    if query.box is not None:
        box = np.asarray(query.box, dtype=np.float64).reshape(-1)
        if box.size != 6 or not np.all(np.isfinite(box)):
            raise PromptError(f"box must be 6 finite numbers d0,h0,w0,d1,h1,w1, got {_listed(query.box)}")
        if np.any(box[:3] > box[3:]):
            raise PromptError(f"box {_listed(box)} has a start after its end")
        if np.any(box < 0) or np.any(box[3:] > limit):
            raise PromptError(f"box {_listed(box)} lies outside {where}")
    if query.points is not None:
        points = np.asarray(query.points, dtype=np.float64).reshape(-1, 3)
        labels = (np.ones(len(points), np.int64) if query.point_labels is None
                  else np.asarray(query.point_labels, dtype=np.int64).reshape(-1))
        if len(points) == 0 or len(labels) != len(points):
            raise PromptError("points need one label each and at least one point")
        if not np.all(np.isfinite(points)):
            raise PromptError(f"points must be finite, got {_listed(points)}")
        if not np.all(np.isin(labels, (0, 1))):
            raise PromptError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(labels.tolist()))}")
        outside = np.any((points < 0) | (points > limit), axis=1)
        if outside.any():
            raise PromptError(f"point {_listed(points[outside][0])} lies outside {where}")
        if not np.any(labels == 1):
            raise PromptError("points need at least one positive point (label 1)")
    return Query(query.text, box, points, labels, query.task)


def _listed(values: object) -> str:
    """Coordinates as the user typed them: whole numbers without a trailing ``.0``."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return "[" + ", ".join(f"{v:g}" for v in flat) + "]"
