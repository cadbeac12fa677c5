"""SegVol: image encoder + prompt encoder + mask decoder + text encoder, with SegVol's prompt conventions.

Conventions (kept because the released weights depend on them):
- ``image`` is ``(B, C, D, H, W)`` at exactly ``roi_size``, values in [0, 1] after SegVol's preprocessing.
- ``boxes`` are ``(B, 6)`` or ``(B, 1, 6)``: ``[d0, h0, w0, d1, h1, w1]`` in voxel indices of the input.
- ``points`` are ``(coords (B, N, 3) as (d, h, w), labels (B, N))`` with 1 positive, 0 negative and -1
  padding; rows with fewer points are padded with label -1.
- ``text`` is one class name per row (or one name for every row), wrapped in the configured template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from segevo.combinations import parts as combination_parts
from segevo.config import ModelConfig
from segevo.model.image_encoder import ImageEncoder
from segevo.model.mask_decoder import MaskDecoder, upsample_logits
from segevo.model.prompt_encoder import PromptEncoder, PromptTensors
from segevo.model.text_encoder import TextEncoder

Points = tuple[torch.Tensor, torch.Tensor]
# (sparse tokens (B', L, C), token mask or None) -> (mask-token delta (B', C) or None, kernel (B', C/8) or None)
Posterior = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor | None, torch.Tensor | None]]
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder", "text_encoder")


@dataclass(frozen=True, eq=False)
class Prompts:
    """One prompt set for a batch: any of one class name per row, (B, 6) boxes, (coords, labels) points."""

    text: str | Sequence[str] | None = None
    boxes: torch.Tensor | None = None
    points: Points | None = None

    def subset(self, combination: str) -> Prompts:
        parts = combination_parts(combination)
        return Prompts(self.text if "text" in parts else None, self.boxes if "box" in parts else None,
                       self.points if "point" in parts else None)


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
        templates: list[str] | None = None,
    ) -> torch.Tensor:
        """Full-resolution logits ``(B, 1, *roi_size)`` for one prompt set per embedding row."""
        b = image_embedding.shape[0]
        names, boxes, points = self._check_prompts(b, text, boxes, points)
        text_embedding = self.text_encoder(names, templates) if names is not None else None
        sparse, dense = self.prompt_encoder(b, points, boxes, text_embedding)
        dense_pe = self.prompt_encoder.get_dense_pe()
        low_res, _ = self.mask_decoder(image_embedding, dense_pe, sparse, dense, text_embedding)
        return upsample_logits(low_res, self.cfg.roi_size)

    def decode_combinations(
        self,
        image_embedding: torch.Tensor,
        requests: Sequence[tuple[str, Prompts]],
        templates: list[str] | None = None,
        posterior: Posterior | None = None,
    ) -> torch.Tensor:
        """Logits ``(K, B, 1, *roi_size)`` for K (combination, prompts) requests in ONE decoder pass.

        A combination such as ``"text+box"`` selects which of its prompts a request uses; requests may share
        one ``Prompts``. Each row equals what ``decode`` gives for that request alone (padded tokens are
        masked out of attention). ``posterior`` maps the rows' sparse tokens to per-row decoder adjustments.
        """
        b, k = image_embedding.shape[0], len(requests)
        if k == 0:
            raise ValueError("no prompt combination given")
        tensors: dict[int, PromptTensors] = {}
        for _, prompts in requests:
            if id(prompts) not in tensors:
                names, boxes, points = self._check_prompts(b, prompts.text, prompts.boxes, prompts.points)
                text_embedding = self.text_encoder(names, templates) if names is not None else None
                tensors[id(prompts)] = (points, boxes, text_embedding)
        sparse, token_mask, text_rows = self.prompt_encoder.embed_combinations(
            [(combo, tensors[id(prompts)]) for combo, prompts in requests], b)
        text_embedding = torch.cat([
            t[2] if t[2] is not None else sparse.new_zeros(b, sparse.shape[-1])
            for t in (tensors[id(p)] for _, p in requests)
        ])
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
            k * b, -1, *self.cfg.feat_shape)
        delta, kernel = posterior(sparse, token_mask) if posterior is not None else (None, None)
        low_res, _ = self.mask_decoder(
            image_embedding.repeat(k, 1, 1, 1, 1), self.prompt_encoder.get_dense_pe(), sparse, dense,
            text_embedding, token_mask=token_mask, text_rows=text_rows, mask_token_delta=delta,
            extra_kernel=kernel,
        )
        logits = upsample_logits(low_res, self.cfg.roi_size)
        return logits.reshape(k, b, *logits.shape[1:])

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
