"""SegVol + Mixture-of-Adapters + context priors: the model segevo fine-tunes.

Rows of a batch may mix modalities and tasks. Rows routed to an identity expert compute exactly the
pretrained SegVol (the priors skip them too, unless ``priors.apply_to_identity``); other rows go through
their LoRA expert and the priors.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from segevo.config import AdaptersConfig, PriorsConfig
from segevo.model.adapters import MixtureOfAdapters, UnknownModality
from segevo.model.priors import ContextPriors, TaskVocabulary
from segevo.model.segvol import Points, Prompts, SegVol

Requests = Sequence[tuple[str, Prompts]]


class AdaptedSegVol(nn.Module):
    def __init__(self, base: SegVol, adapters: AdaptersConfig | None = None, priors: PriorsConfig | None = None,
                 tasks: TaskVocabulary | None = None):
        super().__init__()
        self.adapters_cfg = adapters or AdaptersConfig()
        self.priors_cfg = priors or PriorsConfig()
        self.modalities = list(self.adapters_cfg.experts)
        self.tasks = tasks or TaskVocabulary(self.priors_cfg.tasks)
        self.base = base
        base.requires_grad_(False)
        self.moa = MixtureOfAdapters(base, self.adapters_cfg) if self.adapters_cfg.enabled else None
        self.priors = (ContextPriors(self.priors_cfg, base.cfg.embed_dim, len(self.tasks), len(self.modalities))
                       if self.priors_cfg.enabled else None)

    # ---- routing --------------------------------------------------------------------------------------------

    def experts_of(self, modality: str | Sequence[str], b: int) -> list[str]:
        names = [modality] * b if isinstance(modality, str) else list(modality)
        if len(names) != b:
            raise ValueError(f"modality has {len(names)} entries for a batch of {b}: give one per row")
        out = []
        for m in names:
            if m in self.adapters_cfg.experts:
                out.append(m)
            elif self.adapters_cfg.fallback is not None:
                out.append(self.adapters_cfg.fallback)
            else:
                raise UnknownModality(f"unknown modality {m!r}: experts exist for {', '.join(self.modalities)} "
                                      f"(set adapters.fallback to route other modalities to one of them)")
        return out

    def _is_identity(self, expert: str) -> bool:
        return self.moa is not None and self.adapters_cfg.experts[expert].kind == "identity"

    def _prior_rows(self, experts: list[str]) -> list[bool]:
        return [self.priors_cfg.apply_to_identity or not self._is_identity(e) for e in experts]

    def templates(self, experts: list[str]) -> list[str]:
        default = self.base.cfg.text.template
        return [self.adapters_cfg.templates.get(e, default) for e in experts]

    def task_ids(self, task: torch.Tensor | Sequence | None, b: int, device: torch.device) -> torch.Tensor:
        """Task ids from ids, (dataset, class) pairs or class names; None (or unknown) is the null task."""
        if task is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        if isinstance(task, torch.Tensor):
            ids = task.to(device=device, dtype=torch.long).reshape(-1)
        else:
            items = list(task)
            ids = torch.tensor([self.tasks.id(*t) if isinstance(t, tuple) else self.tasks.id(None, t)
                                for t in items], dtype=torch.long, device=device)
        if ids.shape[0] != b:
            raise ValueError(f"task has {ids.shape[0]} entries for a batch of {b}")
        return ids

    # ---- forward --------------------------------------------------------------------------------------------

    def encode(self, image: torch.Tensor, experts: list[str], task_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Image embedding (B, C, *feat) through each row's expert and the prior fusion."""
        self.base._check_image(image)
        b = image.shape[0]
        with self._route(experts, image.device):
            tokens = self.base.image_encoder(image)
        state: dict = {}
        if self.priors is not None:
            weight = torch.tensor(self._prior_rows(experts), dtype=tokens.dtype, device=image.device)
            modality_ids = torch.tensor([self.modalities.index(e) for e in experts], device=image.device)
            tokens, task_tokens = self.priors.fuse(tokens, task_ids, modality_ids, weight)
            state = {"weight": weight, "task_tokens": task_tokens}
        emb = tokens.transpose(1, 2).reshape(b, -1, *self.base.cfg.feat_shape)
        return emb, state

    def decode(self, emb: torch.Tensor, state: dict, experts: list[str], requests: Requests) -> torch.Tensor:
        """Logits (K, B, 1, *roi) for K (combination, prompts) requests, all in one decoder batch."""
        b, k = emb.shape[0], len(requests)
        posterior = None
        if state:
            row_samples = torch.arange(b, device=emb.device).repeat(k)
            row_weight = state["weight"].repeat(k)
            kind = self.priors_cfg.prototype

            def posterior(sparse: torch.Tensor, mask: torch.Tensor | None):
                proto = self.priors.posterior(state["task_tokens"], sparse, mask, row_samples, row_weight)
                return (proto, None) if kind == "additive" else (None, proto)

        with self._route(experts * k, emb.device):
            return self.base.decode_combinations(emb, requests, self.templates(experts), posterior)

    def forward_requests(self, image: torch.Tensor, modality: str | Sequence[str], requests: Requests,
                         task: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        experts = self.experts_of(modality, image.shape[0] if isinstance(image, torch.Tensor) else 0)
        emb, state = self.encode(image, experts, self.task_ids(task, image.shape[0], image.device))
        return self.decode(emb, state, experts, requests)

    def forward(self, image: torch.Tensor, modality: str | Sequence[str], text: str | Sequence[str] | None = None,
                boxes: torch.Tensor | None = None, points: Points | None = None,
                task: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """SegVol's ``forward`` plus each row's modality (and optionally task): logits (B, 1, *roi)."""
        if text is None and boxes is None and points is None:
            raise ValueError("no prompt given: pass at least one of text, boxes or points")
        prompts = Prompts(text, boxes, points)
        combo = "+".join(n for n, v in (("text", text), ("box", boxes), ("point", points)) if v is not None)
        return self.forward_requests(image, modality, [(combo, prompts)], task)[0]

    def _route(self, experts: list[str], device: torch.device) -> AbstractContextManager[None]:
        return self.moa.route(experts, device) if self.moa is not None else nullcontext()

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    def trainable_counts(self) -> dict[str, int]:
        counts = dict(self.moa.trainable_counts()) if self.moa is not None else {}
        counts["priors"] = self.priors.trainable_count() if self.priors is not None else 0
        return counts
