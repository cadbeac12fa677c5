"""The prior fusion block: the poster's "self- and cross-attention block" between prior tokens and image tokens.

One block, pre-norm, after HERMES' ``PriorAttentionBlock`` with the poster's self-attention added in front:

1. prior tokens attend to each other (a row's task and modality priors together): ``self_attention``;
2. prior tokens attend to the image tokens, then an MLP on the prior side;
3. image tokens attend back to the priors, then an MLP on the image side: ``fuse_image``.

Each step is a residual, so a switched-off step is simply absent (its parameters are not built either, which
keeps adapter checkpoints of an ablation free of dead weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention, queries from ``x``, keys and values from ``context`` (``x`` itself: self-attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"priors.num_heads {num_heads} does not divide the prior width {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(x, context)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, c))

    def scores(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Scaled query-key products (B, heads, N, M) before the softmax: what the analysis of the priors reads."""
        q, k, _ = self._heads(x, context)
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PriorFusionBlock(nn.Module):
    """Priors <-> priors, priors <- image (+ MLP), image <- priors (+ MLP); the switches drop steps 1 and 3."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, self_attention: bool, fuse_image: bool):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = Attention(dim, num_heads) if self_attention else None
        self.norm_p = nn.LayerNorm(dim)
        self.norm_img = nn.LayerNorm(dim)
        self.prior_from_image = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden)
        self.norm_p2 = nn.LayerNorm(dim) if fuse_image else None
        self.image_from_prior = Attention(dim, num_heads) if fuse_image else None
        self.norm_img_mlp = nn.LayerNorm(dim) if fuse_image else None
        self.image_mlp = FeedForward(dim, hidden) if fuse_image else None

    def forward(self, priors: torch.Tensor, image: torch.Tensor,
                image_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attn is not None:
            p = self.norm_self(priors)
            priors = priors + self.self_attn(p, p)
        image_n = self.norm_img(image + image_source)
        priors = priors + self.prior_from_image(self.norm_p(priors), image_n)
        priors = priors + self.mlp(self.norm_mlp(priors))
        if self.image_from_prior is not None:
            image = image + self.image_from_prior(image_n, self.norm_p2(priors))
            image = image + self.image_mlp(self.norm_img_mlp(image))
        return priors, image

    def self_attention_scores(self, priors: torch.Tensor) -> torch.Tensor:
        """Pre-softmax self-attention scores (B, heads, T, T) among prior tokens, as step 1 computes them."""
        if self.self_attn is None:
            raise ValueError("this fusion block has no self-attention (priors.self_attention is off)")
        p = self.norm_self(priors)
        return self.self_attn.scores(p, p)
