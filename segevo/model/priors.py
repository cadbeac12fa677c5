"""Context priors after HERMES: learnable task and modality prior tokens fused with the image tokens, turned
into a posterior prototype that adapts SegVol's mask decoder.

- Tasks are (dataset, class) pairs; id 0 is the null task ("unknown"), so priors never need a text prompt:
  the task comes from the sample's label (or the null token when it is unknown).
- The fusion block is two-way: prior tokens attend to the image tokens, then image tokens attend to the
  priors; every token carries a learnable source embedding (image, task, modality, spatial prompt).
- Per decoder row, the fused task tokens also attend to that row's prompt tokens, and an MLP turns them into
  the posterior prototype: added to mask token 0 (``additive``) or used as an extra dynamic kernel on the
  upscaled features (``multiplicative``, HERMES' prototype x feature product).
- Both paths into SegVol pass through zero-initialised gates, so at initialisation the output is SegVol's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segevo.config import PriorsConfig

IMAGE, TASK, MODALITY, PROMPT = range(4)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"priors.num_heads {num_heads} does not divide the model width {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PriorFusionBlock(nn.Module):
    """Pre-norm two-way block: priors <- image, priors MLP, then (optionally) image <- priors."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, fuse_image: bool):
        super().__init__()
        self.norm_p = nn.LayerNorm(dim)
        self.norm_img = nn.LayerNorm(dim)
        self.prior_from_image = CrossAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.image_from_prior = CrossAttention(dim, num_heads) if fuse_image else None
        self.norm_p2 = nn.LayerNorm(dim) if fuse_image else None

    def forward(self, priors: torch.Tensor, image: torch.Tensor,
                image_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_n = self.norm_img(image + image_source)
        priors = priors + self.prior_from_image(self.norm_p(priors), image_n)
        priors = priors + self.mlp(self.norm_mlp(priors))
        if self.image_from_prior is not None:
            image = image + self.image_from_prior(image_n, self.norm_p2(priors))
        return priors, image


class ContextPriors(nn.Module):
    """Priors live in their own width ``cfg.dim``: image and prompt tokens are projected in, the image update
    and the prototype projected out. This keeps the fusion cheap next to the ViT and the file small."""

    def __init__(self, cfg: PriorsConfig, model_dim: int, n_tasks: int, n_modalities: int):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.dim, cfg.pool_size
        self.task_pool = nn.Parameter(torch.empty(n_tasks, p, dim))
        self.modality_pool = nn.Parameter(torch.empty(n_modalities, p, dim))
        self.source_embedding = nn.Parameter(torch.empty(4, dim))
        for t in (self.task_pool, self.modality_pool, self.source_embedding):
            nn.init.trunc_normal_(t, std=0.02)
        self.image_in = nn.Linear(model_dim, dim)
        self.prompt_in = nn.Linear(model_dim, dim)
        self.blocks = nn.ModuleList(
            PriorFusionBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.fuse_image) for _ in range(cfg.depth)
        )
        # Bias-free, so scaling its small input by gate x row weight scales its output exactly (and a zero
        # weight gives exact zeros) without two extra passes over the full-width image tokens.
        self.image_out = nn.Linear(dim, model_dim, bias=False) if cfg.fuse_image else None
        self.norm_task = nn.LayerNorm(dim)
        self.norm_prompt = nn.LayerNorm(dim)
        self.task_from_prompt = CrossAttention(dim, cfg.num_heads)
        self.norm_post = nn.LayerNorm(dim)
        out = model_dim if cfg.prototype == "additive" else model_dim // 8
        self.posterior_mlp = FeedForward(dim, int(dim * cfg.mlp_ratio), out)
        self.image_gate = nn.Parameter(torch.zeros(1))
        self.prototype_gate = nn.Parameter(torch.zeros(1))

    def fuse(self, tokens: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor,
             row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, N, C) adapted through the gated image path, and the fused task tokens.

        ``row_weight`` (B,) is 1 for rows the priors adapt and 0 for rows that must stay the base model's bit
        for bit. Every row is computed either way, so every prior parameter receives a gradient on every
        rank (DeepSpeed's gradient buckets must match across ranks, whatever rows a rank happens to hold).
        In training, ``task_dropout`` replaces a row's task with the null task (id 0) at random.
        """
        if self.training and self.cfg.task_dropout > 0:
            drop = torch.rand(task_ids.shape, device=task_ids.device) < self.cfg.task_dropout
            task_ids = task_ids.masked_fill(drop, 0)
        src = self.source_embedding
        priors = torch.cat([self.task_pool[task_ids] + src[TASK], self.modality_pool[modality_ids] + src[MODALITY]],
                           dim=1)
        image_in = self.image_in(tokens)
        image = image_in
        for block in self.blocks:
            priors, image = block(priors, image, src[IMAGE])
        if self.image_out is not None:
            scale = (self.image_gate * row_weight.to(self.image_gate.dtype)).reshape(-1, 1, 1)
            tokens = tokens + self.image_out((image - image_in) * scale.to(image.dtype))
        return tokens, priors[:, : self.cfg.pool_size]

    def posterior(self, task_tokens: torch.Tensor, sparse: torch.Tensor, token_mask: torch.Tensor | None,
                  row_samples: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
        """Per decoder row: the gated prototype (additive delta or multiplicative kernel), times ``row_weight``.

        ``row_samples`` maps each decoder row to its sample; rows with weight 0 get exact zeros.
        """
        t = task_tokens.index_select(0, row_samples)
        prompt = self.norm_prompt(self.prompt_in(sparse) + self.source_embedding[PROMPT])
        t = t + self.task_from_prompt(self.norm_task(t), prompt, token_mask)
        proto = self.prototype_gate * self.posterior_mlp(self.norm_post(t).mean(dim=1))
        return proto * row_weight.to(proto.dtype)[:, None]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
