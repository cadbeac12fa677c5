"""SegVol, reimplemented part by part, with strict loading of the released checkpoints."""

from segevo.model.checkpoint import CheckpointError, LoadReport, load_checkpoint
from segevo.model.segvol import PARTS, SegVol

__all__ = ["PARTS", "CheckpointError", "LoadReport", "SegVol", "load_checkpoint"]
