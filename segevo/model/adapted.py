"""SegVol + Mixture-of-Adapters + context priors: the model segevo fine-tunes.

Rows of a batch may mix modalities and tasks. Rows routed to an identity expert compute exactly the
pretrained SegVol (the priors skip them too, unless ``priors.apply_to_identity``); other rows go through
their expert (LoRA, DoRA) and the priors. A row's modality name picks its expert (``MRI-T2`` -> ``MRI``) and its
modality prior pool (``MRI-T2``'s own, when the priors keep one per name).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from segevo.config import AdaptersConfig, PriorsConfig
from segevo.data.tasks import TaskVocabulary
from segevo.model.adapters import MixtureOfAdapters, expert_of
from segevo.model.priors import ContextPriors
from segevo.model.prototypes import DecoderInputs
from segevo.model.segvol import Points, Prompts, SegVol

Requests = Sequence[tuple[str, Prompts]]


class AdaptedSegVol(nn.Module):
    def __init__(self, base: SegVol, adapters: AdaptersConfig | None = None, priors: PriorsConfig | None = None,
                 tasks: TaskVocabulary | None = None):
        super().__init__()
        self.adapters_cfg = adapters or AdaptersConfig()
        self.priors_cfg = priors or PriorsConfig()
        self.modalities = modality_pool_names(self.adapters_cfg, self.priors_cfg)
        self.tasks = tasks or TaskVocabulary(self.priors_cfg.tasks)
        self.base = base
        base.requires_grad_(False)
        self.moa = MixtureOfAdapters(base, self.adapters_cfg) if self.adapters_cfg.enabled else None
        # where the frozen base came from (a checkpoint path, or the seed of a random init), for adapter files
        self.base_origin: dict = {"weights": None, "seed": None}
        self.priors = (ContextPriors(self.priors_cfg, base.cfg.embed_dim, len(self.tasks), len(self.modalities))
                       if self.priors_cfg.enabled else None)
        self.register_load_state_dict_post_hook(_after_load)

    def train(self, mode: bool = True) -> AdaptedSegVol:
        """Also drops derived weights (merged experts): every train/eval switch starts from the live weights."""
        self.invalidate_caches()
        return super().train(mode)

    def invalidate_caches(self) -> None:
        if self.moa is not None:
            self.moa.invalidate()

    # ---- routing --------------------------------------------------------------------------------------------

    def experts_of(self, modality: str | Sequence[str], b: int) -> list[str]:
        names = [modality] * b if isinstance(modality, str) else list(modality)
        if len(names) != b:
            raise ValueError(f"modality has {len(names)} entries for a batch of {b}: give one per row")
        return [expert_of(self.adapters_cfg, m) for m in names]

    def _is_identity(self, expert: str) -> bool:
        return self.moa is not None and self.adapters_cfg.experts[expert].kind == "identity"

    def priors_apply(self, expert: str) -> bool:
        """Whether the priors adapt rows of ``expert`` (never identity rows, unless ``priors.apply_to_identity``)."""
        return self.priors is not None and (self.priors_cfg.apply_to_identity or not self._is_identity(expert))

    def computes_base(self, modality: str) -> bool:
        """Whether rows of ``modality`` compute exactly the base SegVol: no expert update (an identity expert, or
        no adapters), no priors on them, the base's text template. Such rows are bit-identical to the base model's
        (an invariant the tests hold), so a comparison of models on one base computes them once."""
        expert = self.experts_of(modality, 1)[0]
        plain = self.moa is None or self._is_identity(expert)
        return plain and not self.priors_apply(expert) and self.templates([expert])[0] == self.base.cfg.text.template

    def _prior_rows(self, experts: list[str]) -> list[bool]:
        return [self.priors_apply(e) for e in experts]

    def templates(self, experts: list[str]) -> list[str]:
        default = self.base.cfg.text.template
        return [self.adapters_cfg.templates.get(e, default) for e in experts]

    def modality_ids(self, names: Sequence[str], device: torch.device) -> torch.Tensor:
        """Each row's modality pool: its own name's when it has one (``modality_pools: name``), else its
        expert's."""
        by_name = self.priors_cfg.modality_pools == "name"
        return torch.tensor([self.modalities.index(n if by_name and n in self.modalities
                                                   else expert_of(self.adapters_cfg, n)) for n in names],
                            dtype=torch.long, device=device)

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

    def encode(self, image: torch.Tensor, experts: list[str], task_ids: torch.Tensor,
               modalities: Sequence[str] | None = None) -> tuple[torch.Tensor, dict]:
        """Image embedding (B, C, *feat) through each row's expert and the prior fusion (image validated by the
        caller, ``forward_requests``)."""
        return self.with_priors(self.image_tokens(image, experts), experts, task_ids, modalities)

    def image_tokens(self, image: torch.Tensor, experts: list[str]) -> torch.Tensor:
        """ViT tokens (B, N, C) through each row's expert: the task-independent part of ``encode``, which
        inference reuses across the tasks and prompts of one window."""
        with self._route(experts, image.device):
            return self.base.image_encoder(image)

    def with_priors(self, tokens: torch.Tensor, experts: list[str], task_ids: torch.Tensor,
                    modalities: Sequence[str] | None = None) -> tuple[torch.Tensor, dict]:
        """The prior fusion on ViT tokens, then the (B, C, *feat) embedding and the decoder's prior state.

        ``modalities`` are the rows' modality names, which pick the modality pools (default: the experts').
        The state holds the row weights, the task posteriors and, with the modality head, ``modality_logits``
        and ``modality_targets`` (each row's pool id) for the auxiliary loss."""
        b, device = tokens.shape[0], tokens.device
        state: dict = {}
        adapt = self._prior_rows(experts)
        # Without gradients, rows the priors leave alone need no prior computation at all.
        if self.priors is not None and (torch.is_grad_enabled() or any(adapt)):
            weight = torch.tensor(adapt, dtype=tokens.dtype, device=device)
            modality_ids = self.modality_ids(experts if modalities is None else modalities, device)
            fused = self.priors.fuse(tokens, task_ids, modality_ids, weight)
            tokens = fused.tokens
            state = {"weight": weight, "task_tokens": fused.task_tokens}
            if fused.modality_logits is not None:
                state.update(modality_logits=fused.modality_logits, modality_targets=modality_ids)
        emb = tokens.transpose(1, 2).reshape(b, -1, *self.base.cfg.feat_shape)
        return emb, state

    def expert_context(self, expert: str) -> AbstractContextManager[None]:
        """For no-grad forwards of rows that all use ``expert``: its update merged into the weights."""
        return self.moa.inference(expert) if self.moa is not None else nullcontext()

    def decode(self, emb: torch.Tensor, state: dict, experts: list[str], requests: Requests) -> torch.Tensor:
        """Logits (K, B, 1, *roi) for K (combination, prompts) requests, all in one decoder batch."""
        b, k = emb.shape[0], len(requests)
        posterior = None
        if state and self.priors_cfg.posterior_prototype:
            row_samples = torch.arange(b, device=emb.device).repeat(k)
            row_weight = state["weight"].repeat(k)

            def posterior(sparse: torch.Tensor, mask: torch.Tensor | None) -> DecoderInputs:
                return self.priors.posterior(state["task_tokens"], sparse, mask, row_samples, row_weight)

        with self._route(experts * k, emb.device):
            return self.base.decode_combinations(emb, requests, self.templates(experts), posterior)

    def _rows(self, image: torch.Tensor, modality: str | Sequence[str], requests: Requests,
              task: torch.Tensor | Sequence | None) -> tuple[list[str], list[str], torch.Tensor]:
        """Each row's modality name, expert and task id, after checking image and prompts."""
        b = image.shape[0] if isinstance(image, torch.Tensor) and image.dim() else 0
        experts = self.experts_of(modality, b)
        names = [modality] * b if isinstance(modality, str) else list(modality)
        task_ids = self.task_ids(task, b, image.device)
        self.base._check_image(image)
        for prompts in {id(p): p for _, p in requests}.values():  # clear errors before rows are split up
            self.base._check_prompts(b, prompts.text, prompts.boxes, prompts.points)
        return names, experts, task_ids

    def forward_batch(self, image: torch.Tensor, modality: str | Sequence[str], requests: Requests,
                      task: torch.Tensor | Sequence | None = None) -> tuple[torch.Tensor, dict]:
        """Every row in one batch (routing by masks), as training runs: logits (K, B, 1, *roi) and the priors'
        state (``modality_logits`` and ``modality_targets`` feed the auxiliary loss)."""
        names, experts, task_ids = self._rows(image, modality, requests, task)
        emb, state = self.encode(image, experts, task_ids, names)
        return self.decode(emb, state, experts, requests), state

    def forward_requests(self, image: torch.Tensor, modality: str | Sequence[str], requests: Requests,
                         task: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """Logits (K, B, 1, *roi). Training runs every row in one batch (routing by masks); without gradients
        rows are grouped by expert and each group runs with its expert merged into the weights (no adapter cost)."""
        if self.moa is None or torch.is_grad_enabled():
            return self.forward_batch(image, modality, requests, task)[0]
        names, experts, task_ids = self._rows(image, modality, requests, task)
        b = len(names)
        out = None
        for expert in dict.fromkeys(experts):
            rows = [i for i, e in enumerate(experts) if e == expert]
            index = torch.tensor(rows, device=image.device)
            sub = [(combo, _take(p, rows, index)) for combo, p in requests]
            with self.expert_context(expert):
                emb, state = self.encode(image.index_select(0, index), [expert] * len(rows),
                                         task_ids.index_select(0, index), [names[i] for i in rows])
                logits = self.decode(emb, state, [expert] * len(rows), sub)
            if out is None:
                out = logits.new_empty(logits.shape[0], b, *logits.shape[2:])
            out.index_copy_(1, index, logits)
        return out

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

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters in the groups an optimizer steps together: one per trained expert, the priors."""
        groups: dict[str, list[nn.Parameter]] = {}
        if self.moa is not None:
            for name in self.moa.trained_experts:
                groups[name] = list(self.moa.expert_parameters(name).values())
        if self.priors is not None:
            groups["priors"] = list(self.priors.parameters())
        return groups

    def groups_used(self, modality: Sequence[str]) -> set[str]:
        """The parameter groups that rows of these modalities train (their experts; the priors when they act)."""
        experts = self.experts_of(modality, len(modality))
        used = {e for e in experts if self.moa is not None and e in self.moa.trained_experts}
        if any(self.priors_apply(e) for e in experts):
            used.add("priors")
        return used

    def trainable_counts(self) -> dict[str, int]:
        counts = dict(self.moa.trainable_counts()) if self.moa is not None else {}
        counts["priors"] = self.priors.trainable_count() if self.priors is not None else 0
        return counts


def modality_pool_names(adapters: AdaptersConfig, priors: PriorsConfig) -> list[str]:
    """The modality prior pools, in id order: one per expert, then (per name) one per further modality name."""
    names = list(adapters.experts)
    if priors.modality_pools == "name":
        names += [n for n in dict.fromkeys(priors.modalities) if n not in names]
    return names


def _take(prompts: Prompts, rows: list[int], index: torch.Tensor) -> Prompts:
    """The prompts of some rows of a batch."""
    text = prompts.text
    if text is not None and not isinstance(text, str):
        text = [text[i] for i in rows]
    return Prompts(
        text,
        prompts.boxes.index_select(0, index) if prompts.boxes is not None else None,
        tuple(t.index_select(0, index) for t in prompts.points) if prompts.points is not None else None,
    )


def _after_load(module: AdaptedSegVol, _incompatible: object) -> None:
    module.invalidate_caches()
