"""CLIP text tower + SegVol's 512->768 ``dim_align`` projection.

The tower is written out here with transformers' pre-5.6 parameter names
(``clip_text_model.text_model.*``), the layout every SegVol checkpoint uses, so loading never depends on the
installed transformers version. The tower is frozen, as in SegVol; ``dim_align`` is trainable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segevo.config import TextConfig
from segevo.errors import UserError
from segevo.model.tokenizer import load_tokenizer


class CLIPAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled output: the final hidden state at the first end-of-text token (the highest id)."""
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)


class TextEncoder(nn.Module):
    """Class names -> prompt embeddings ``(B, embed_dim)`` via SegVol's template."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.clip_text_model = CLIPTextModel(cfg)
        self.dim_align = nn.Linear(cfg.hidden_size, embed_dim)
        self.clip_text_model.requires_grad_(False)

    def tokenize(self, names: list[str], templates: list[str] | None = None) -> torch.Tensor:
        templates = templates or [self.cfg.template] * len(names)
        prompts = [t.format(name) for t, name in zip(templates, names, strict=True)]
        ids = load_tokenizer(self.cfg.tokenizer_dir)(prompts, padding=True, return_tensors="pt")["input_ids"]
        if ids.shape[1] > self.cfg.max_position_embeddings:
            longest = max(names, key=len)
            raise UserError(f"text prompt too long: {longest[:40]!r} gives {ids.shape[1]} tokens, "
                             f"the text encoder takes {self.cfg.max_position_embeddings}")
        return ids.to(self.dim_align.weight.device)

    def forward(self, names: list[str], templates: list[str] | None = None) -> torch.Tensor:
        """``templates`` gives one template per row (per-modality prompts); default: the configured one."""
        ids = self.tokenize(names, templates)
        # The frozen tower sees a dozen tokens: under autocast, casting its 63M weights would cost more than the
        # maths, and once per call (per expert group at inference), so it runs in its own dtype.
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            pooled = self.clip_text_model.text_model(ids)
        return self.dim_align(pooled.to(self.dim_align.weight.dtype))
