"""3D ViT image encoder with MONAI 0.9's module and parameter names.

SegVol's checkpoints were written by MONAI 0.9; newer MONAI adds ``norm_cross_attn`` parameters that the
checkpoints lack. Owning these ~100 lines keeps the key layout fixed whatever MONAI version is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segevo.config import ModelConfig


class PatchRearrange(nn.Module):
    """einops ``b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)``: the order the patch Linear was trained on."""

    def __init__(self, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = x.shape
        p1, p2, p3 = self.patch_size
        x = x.reshape(b, c, h // p1, p1, w // p2, p2, d // p3, p3)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (h // p1) * (w // p2) * (d // p3), p1 * p2 * p3 * c)


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.encoder.hidden_size
        n_tokens = 1
        for f in cfg.feat_shape:
            n_tokens *= f
        patch_dim = cfg.in_channels
        for p in cfg.patch_size:
            patch_dim *= p
        self.patch_embeddings = nn.Sequential(PatchRearrange(cfg.patch_size), nn.Linear(patch_dim, width))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_tokens, width))
        self.dropout = nn.Dropout(cfg.encoder.dropout)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.patch_embeddings(x) + self.position_embeddings)


class SelfAttention(nn.Module):
    """MONAI 0.9 SABlock: bias-free qkv laid out ``(qkv heads dim)``."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.drop_output = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(b, n, c)))


class MLPBlock(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(width, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, width)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(F.gelu(self.linear1(x)))))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, mlp_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.mlp = MLPBlock(width, mlp_dim, dropout)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """Returns tokens ``(B, N, C)`` after the final norm, N = prod(roi_size / patch_size)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.encoder
        self.roi_size = cfg.roi_size
        self.in_channels = cfg.in_channels
        self.patch_embedding = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(
            TransformerBlock(e.hidden_size, e.mlp_dim, e.num_heads, e.dropout) for _ in range(e.num_layers)
        )
        self.norm = nn.LayerNorm(e.hidden_size)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
