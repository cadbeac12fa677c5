"""Context priors after HERMES: learnable task and modality prior tokens fused with the image tokens, turned
into a posterior prototype that adapts SegVol's mask decoder, plus HERMES' modality classification head.

- Tasks are (dataset, class) pairs; id 0 is the null task ("unknown"), so priors never need a text prompt:
  the task comes from the sample's label (or the null token when it is unknown).
- Modality priors are kept per modality *name* (``MRI-T1`` and ``MRI-T2`` have their own pool although they
  share the MRI expert) or, with ``priors.modality_pools: expert``, per expert.
- The fusion blocks (``segevo.model.fusion``) let the priors attend to each other, to the image tokens, and
  the image tokens attend back; every token carries a learnable source embedding (image, task, modality,
  spatial prompt).
- Per decoder row, the fused task tokens also attend to that row's prompt tokens, and an MLP turns them into
  the posterior prototype, which adapts the mask decoder as its kind says (``segevo.model.prototypes``).
- The modality posterior tokens of every block feed a classifier over the modality pools (HERMES' auxiliary
  task), trained with ``priors.modality_loss_weight``.
- Both paths into SegVol (image, prototype) pass through zero-initialised gates, so at initialisation the
  output is SegVol's; each path, the self-attention and the modality head has its own switch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from segevo.config import PriorsConfig
from segevo.model.fusion import Attention, FeedForward, PriorFusionBlock
from segevo.model.prototypes import DecoderInputs, prototype_kind

IMAGE, TASK, MODALITY, PROMPT = range(4)


class Fused(NamedTuple):
    """What the fusion gives the rest of the model: adapted image tokens, the task posterior tokens (for the
    prototype) and the modality logits (for the auxiliary loss; None without the head)."""

    tokens: torch.Tensor
    task_tokens: torch.Tensor
    modality_logits: torch.Tensor | None


class ModalityClassifier(nn.Module):
    """HERMES' modality head: each block's modality posterior tokens concatenated along channels, LayerNorm,
    the mean over the pool, an MLP to one logit per modality pool."""

    def __init__(self, width: int, n_modalities: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = FeedForward(width, width, n_modalities)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens).mean(dim=1))


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
        self.blocks = nn.ModuleList(
            PriorFusionBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.self_attention, cfg.fuse_image)
            for _ in range(cfg.depth)
        )
        # Bias-free, so scaling its small input by gate x row weight scales its output exactly (and a zero
        # weight gives exact zeros) without two extra passes over the full-width image tokens.
        self.image_out = nn.Linear(dim, model_dim, bias=False) if cfg.fuse_image else None
        self.image_gate = nn.Parameter(torch.zeros(1)) if cfg.fuse_image else None
        self.kind = prototype_kind(cfg.prototype)
        if cfg.posterior_prototype:
            self.prompt_in = nn.Linear(model_dim, dim)
            self.norm_task = nn.LayerNorm(dim)
            self.norm_prompt = nn.LayerNorm(dim)
            self.task_from_prompt = Attention(dim, cfg.num_heads)
            self.norm_post = nn.LayerNorm(dim)
            self.posterior_mlp = FeedForward(dim, int(dim * cfg.mlp_ratio), self.kind.width(model_dim))
            self.prototype_gate = nn.Parameter(torch.zeros(1))
        self.modality_head = (ModalityClassifier(dim * cfg.depth, n_modalities)
                              if cfg.modality_loss_weight > 0 else None)

    def fuse(self, tokens: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor,
             row_weight: torch.Tensor) -> Fused:
        """Image tokens (B, N, C) adapted through the gated image path, the task posteriors and modality logits.

        ``row_weight`` (B,) is 1 for rows the priors adapt and 0 for rows that must stay the base model's bit
        for bit. Every row is computed either way, so every prior parameter receives a gradient on every
        rank (DeepSpeed's gradient buckets must match across ranks, whatever rows a rank happens to hold).
        In training, ``task_dropout`` replaces a row's task with the null task (id 0) at random.
        """
        if self.training and self.cfg.task_dropout > 0:
            drop = torch.rand(task_ids.shape, device=task_ids.device) < self.cfg.task_dropout
            task_ids = task_ids.masked_fill(drop, 0)
        src, p = self.source_embedding, self.cfg.pool_size
        priors = torch.cat([self.task_pool[task_ids] + src[TASK], self.modality_pool[modality_ids] + src[MODALITY]],
                           dim=1)
        image_in = self.image_in(tokens)
        image = image_in
        modality_tokens = []
        for block in self.blocks:
            priors, image = block(priors, image, src[IMAGE])
            modality_tokens.append(priors[:, p:])
        if self.image_out is not None:
            scale = (self.image_gate * row_weight.to(self.image_gate.dtype)).reshape(-1, 1, 1)
            tokens = tokens + self.image_out((image - image_in) * scale.to(image.dtype))
        logits = None
        if self.modality_head is not None:
            logits = self.modality_head(torch.cat(modality_tokens, dim=-1))
        return Fused(tokens, priors[:, :p], logits)

    def posterior(self, task_tokens: torch.Tensor, sparse: torch.Tensor, token_mask: torch.Tensor | None,
                  row_samples: torch.Tensor, row_weight: torch.Tensor) -> DecoderInputs:
        """Per decoder row: the gated prototype, times ``row_weight``, as its kind feeds the decoder.

        ``row_samples`` maps each decoder row to its sample; rows with weight 0 get exact zeros.
        """
        t = task_tokens.index_select(0, row_samples)
        prompt = self.norm_prompt(self.prompt_in(sparse) + self.source_embedding[PROMPT])
        t = t + self.task_from_prompt(self.norm_task(t), prompt, token_mask)
        proto = self.prototype_gate * self.posterior_mlp(self.norm_post(t).mean(dim=1))
        return self.kind.decoder_inputs(proto * row_weight.to(proto.dtype)[:, None])

    @torch.no_grad()
    def self_attention_affinity(self) -> torch.Tensor:
        """How much each learned prior attends to each other one in the first block's self-attention, with all
        of them in one sequence: scores averaged over heads and over the tokens of both pools, then a softmax
        over the priors (rows: real tasks, null task left out, then modalities)."""
        src = self.source_embedding
        pools = torch.cat([self.task_pool[1:] + src[TASK], self.modality_pool + src[MODALITY]])
        n, p, d = pools.shape
        scores = self.blocks[0].self_attention_scores(pools.reshape(1, n * p, d)).mean(dim=1)[0]
        return scores.reshape(n, p, n, p).mean(dim=(1, 3)).softmax(dim=-1)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
