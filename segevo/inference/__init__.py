"""Inference: SegVol's zoom-out-zoom-in (:mod:`.zoom`, windows in :mod:`.windows`) behind the library
:class:`Predictor` (:mod:`.predictor`) that ``segevo predict`` and ``segevo evaluate`` share; prompts are checked
in one place (:mod:`.prompts`)."""

from segevo.inference.predictor import Outcome, Prediction, Predictor, load_for_inference, to_model
from segevo.inference.prompts import PromptError, Query, check_query
from segevo.inference.windows import Window, grow_roi, plan_windows, window_starts
from segevo.inference.zoom import QueryResult, ZoomInference

__all__ = ["Outcome", "PromptError", "Prediction", "Predictor", "Query", "QueryResult", "Window", "ZoomInference",
           "check_query", "grow_roi", "load_for_inference", "plan_windows", "to_model", "window_starts"]
