"""SegVol: image encoder + prompt encoder + mask decoder + text encoder, with SegVol's prompt conventions.

Conventions (kept because the released weights depend on them):
- ``image`` is ``(B, C, D, H, W)`` at exactly ``roi_size``, values in [0, 1] after SegVol's preprocessing.
- ``boxes`` are ``(B, 6)`` or ``(B, 1, 6)``: ``[d0, h0, w0, d1, h1, w1]`` in voxel indices of the input.
- ``points`` are ``(coords (B, N, 3) as (d, h, w), labels (B, N))`` with 1 positive, 0 negative and -1
  padding; rows with fewer points are padded with label -1.
- ``text`` is one class name per row (or one name for every row), wrapped in the configured template.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segevo.config import ModelConfig
from segevo.model.image_encoder import ImageEncoder
from segevo.model.mask_decoder import MaskDecoder, upsample_logits
from segevo.model.prompt_encoder import PromptEncoder
from segevo.model.text_encoder import TextEncoder

Points = tuple[torch.Tensor, torch.Tensor]
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder", "text_encoder")


class SegVol(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.image_encoder = ImageEncoder(self.cfg)
        self.prompt_encoder = PromptEncoder(self.cfg)
        self.mask_decoder = MaskDecoder(self.cfg)
        self.text_encoder = TextEncoder(self.cfg.text, self.cfg.embed_dim)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image embedding ``(B, C, *feat_shape)``; one pass serves any number of prompt sets."""
        self._check_image(image)
        return self._encode(image)

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.image_encoder(image)
        return tokens.transpose(1, 2).reshape(image.shape[0], -1, *self.cfg.feat_shape)

    def decode(
        self,
        image_embedding: torch.Tensor,
        text: str | Sequence[str] | None = None,
        boxes: torch.Tensor | None = None,
        points: Points | None = None,
    ) -> torch.Tensor:
        """Full-resolution logits ``(B, 1, *roi_size)`` for one prompt set per embedding row."""
        b = image_embedding.shape[0]
        names, boxes, points = self._check_prompts(b, text, boxes, points)
        text_embedding = self.text_encoder(names) if names is not None else None
        sparse, dense = self.prompt_encoder(b, points, boxes, text_embedding)
        dense_pe = self.prompt_encoder.get_dense_pe()
        low_res, _ = self.mask_decoder(image_embedding, dense_pe, sparse, dense, text_embedding)
        return upsample_logits(low_res, self.cfg.roi_size)

    def forward(
        self,
        image: torch.Tensor,
        text: str | Sequence[str] | None = None,
        boxes: torch.Tensor | None = None,
        points: Points | None = None,
    ) -> torch.Tensor:
        self._check_image(image)
        self._check_prompts(image.shape[0], text, boxes, points)  # fail before the encoder pass
        return self.decode(self._encode(image), text, boxes, points)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (buffers excluded), in the order of SegVol's checkpoints."""
        return {part: sum(p.numel() for p in getattr(self, part).parameters()) for part in PARTS}

    def _check_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
        if image.dim() != 5:
            raise ValueError(f"image must be 5-D (B, C, D, H, W), got shape {tuple(image.shape)}")
        expected = (self.cfg.in_channels, *self.cfg.roi_size)
        if tuple(image.shape[1:]) != expected or image.shape[0] < 1:
            raise ValueError(f"image must have shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(image.shape)}: resize to the model's roi_size first")
        if not image.is_floating_point():
            raise ValueError(f"image must be a floating-point tensor, got {image.dtype}")
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or Inf values")

    def _check_prompts(
        self,
        b: int,
        text: str | Sequence[str] | None,
        boxes: torch.Tensor | None,
        points: Points | None,
    ) -> tuple[list[str] | None, torch.Tensor | None, Points | None]:
        if text is None and boxes is None and points is None:
            raise ValueError("no prompt given: pass at least one of text, boxes or points")
        return _check_text(b, text), _check_boxes(b, boxes), _check_points(b, points)


def _check_text(b: int, text: str | Sequence[str] | None) -> list[str] | None:
    if text is None:
        return None
    names = [text] * b if isinstance(text, str) else list(text)
    if len(names) != b:
        raise ValueError(f"text has {len(names)} entries for a batch of {b}: give one class name per row")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"text entries must be non-empty strings, got {name!r}")
    return names


def _check_boxes(b: int, boxes: torch.Tensor | None) -> torch.Tensor | None:
    if boxes is None:
        return None
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"boxes must be a torch.Tensor of shape (B, 6), got {type(boxes).__name__}")
    if boxes.dim() == 3 and boxes.shape[1] == 1:
        boxes = boxes[:, 0]
    if boxes.dim() != 2 or boxes.shape != (b, 6):
        raise ValueError(f"boxes must have shape ({b}, 6) as [d0, h0, w0, d1, h1, w1], got {tuple(boxes.shape)}")
    boxes = boxes.float()
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or Inf")
    if (boxes[:, :3] > boxes[:, 3:]).any():
        raise ValueError("boxes must be [d0, h0, w0, d1, h1, w1] with each start <= end")
    return boxes


def _check_points(b: int, points: Points | None) -> Points | None:
    if points is None:
        return None
    if not (isinstance(points, tuple | list) and len(points) == 2
            and all(isinstance(t, torch.Tensor) for t in points)):
        raise ValueError("points must be a pair (coords (B, N, 3), labels (B, N)) of tensors")
    coords, labels = points
    if coords.dim() != 3 or coords.shape[0] != b or coords.shape[2] != 3 or coords.shape[1] < 1:
        raise ValueError(f"point coords must have shape ({b}, N>=1, 3) as (d, h, w), got {tuple(coords.shape)}")
    if labels.shape != coords.shape[:2]:
        raise ValueError(f"point labels must have shape {tuple(coords.shape[:2])}, got {tuple(labels.shape)}")
    if not torch.isfinite(coords.float()).all():
        raise ValueError("point coords contain NaN or Inf")
    if not torch.isin(labels, labels.new_tensor([-1, 0, 1])).all():
        raise ValueError("point labels must be 1 (positive), 0 (negative) or -1 (padding)")
    return coords.float(), labels.long()
