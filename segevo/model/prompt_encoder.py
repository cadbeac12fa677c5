"""SegVol's 3D SAM prompt encoder: points, boxes and a text token become sparse prompt embeddings.

The coordinate handling is SegVol's, quirks included (points are (d, h, w) but normalised as
``d / roi[1], h / roi[0], w / roi[2]``); the released weights were trained that way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segevo.combinations import parts as combination_parts
from segevo.config import ModelConfig

# (points (coords, labels) or None, boxes or None, text embedding or None) for one batch of samples
PromptTensors = tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features. The Gaussian matrix is a checkpoint buffer: loaded, never re-drawn."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of every cell of the token grid, ``(C, *size)``; channel order x=axis1, y=axis0, z=axis2."""
        h, w, d = size
        g = self.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w, d), device=g.device, dtype=g.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        z = (grid.cumsum(dim=2) - 0.5) / d
        return self._pe_encoding(torch.stack([x, y, z], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        scale = coords.new_tensor([image_size[1], image_size[0], image_size[2]])
        return self._pe_encoding((coords / scale).to(self.positional_encoding_gaussian_matrix.dtype))


class PromptEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.embed_dim
        chans = cfg.prompt.mask_in_chans
        self.embed_dim = dim
        self.input_image_size = cfg.roi_size
        self.image_embedding_size = cfg.feat_shape
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0: negative point, 1: positive point, 2/3: box corners.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        # SAM's 2D mask branch: never called by SegVol, kept because the checkpoints hold its weights.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2),
            _LayerNorm2d(chans // 4),
            nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2),
            _LayerNorm2d(chans),
            nn.GELU(),
            nn.Conv2d(chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels.unsqueeze(-1)
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        return emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 3), self.input_image_size)
        corner_ids = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return corners + corner_ids

    def forward(
        self,
        batch_size: int,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        text_embedding: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse tokens ``[points(+pad) | 2 box corners | text]`` and the dense (no-mask) embedding."""
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if text_embedding is not None:
            parts.append(text_embedding.unsqueeze(1))
        sparse = torch.cat(parts, dim=1) if parts else self.no_mask_embed.weight.new_zeros(batch_size, 0,
                                                                                           self.embed_dim)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1,
                                                                         *self.image_embedding_size)
        return sparse, dense


    def embed_combinations(
        self,
        requests: Sequence[tuple[str, PromptTensors]],
        batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Sparse tokens of several prompt combinations (e.g. ``"text+box"``) for one decoder batch.

        ``requests`` pairs a combination with the prompt tensors it draws from (points, boxes, text
        embedding; several requests may share one set). Rows are request-major (row = k * batch_size +
        sample); each holds exactly the tokens ``forward`` would build, right-padded to the longest row.
        Returns the tokens, the (B', L) mask of real tokens (None when nothing is padded) and the (B',)
        text indicator.
        """
        cache: dict[int, tuple] = {}
        rows, has_text = [], []
        for combo, (points, boxes, text_embedding) in requests:
            key = id(points), id(boxes), id(text_embedding)
            if key not in cache:
                cache[key] = (self._embed_points(*points, pad=True) if points is not None else None,
                              self._embed_boxes(boxes) if boxes is not None else None,
                              text_embedding.unsqueeze(1) if text_embedding is not None else None)
            pts_pad, box_tok, text_tok = cache[key]
            parts = combination_parts(combo)
            missing = [p for p, t in (("point", pts_pad), ("box", box_tok), ("text", text_tok))
                       if p in parts and t is None]
            if missing:
                raise ValueError(f"prompt combination {combo!r} needs {', '.join(missing)} prompts")
            toks = []
            if "point" in parts:  # SegVol's padding point only when no box follows
                toks.append(pts_pad[:, :-1] if "box" in parts else pts_pad)
            if "box" in parts:
                toks.append(box_tok)
            if "text" in parts:
                toks.append(text_tok)
            rows.append(torch.cat(toks, dim=1))
            has_text.append("text" in parts)
        length = max(r.shape[1] for r in rows)
        ref = rows[0]
        sparse = torch.cat([F.pad(r, (0, 0, 0, length - r.shape[1])) for r in rows])
        mask = None
        if any(r.shape[1] != length for r in rows):
            mask = torch.cat([torch.arange(length, device=ref.device).expand(batch_size, length) < r.shape[1]
                              for r in rows])
        text_rows = torch.tensor(has_text, device=ref.device).repeat_interleave(batch_size).to(ref.dtype)
        return sparse, mask, text_rows


class _LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]
