"""The batched training loss: every prompt combination of every sample in one decoder pass, Dice + BCE each.

Prompts arrive as tensors from the data side (boxes, padded points, class names, task ids), so the step
builds nothing on the host and never waits on the device. Label -1 is ignored by both terms (SegVol maps it
to background). With the priors' modality head, HERMES' auxiliary modality classification (cross-entropy of
each adapted row's modality pool from its modality posterior tokens) is added, weighted by
``priors.modality_loss_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from segevo.config import LossConfig
from segevo.data.batch import TrainBatch
from segevo.model.adapted import AdaptedSegVol
from segevo.model.segvol import Prompts


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row soft Dice loss (SegVol's ``1 - 2|PT| / (|P| + |T| + 1)``) and mean BCE over non-ignored voxels."""
    logits = logits.float().flatten(1)
    target = target.flatten(1)
    valid = (target >= 0).float()
    t = target.clamp(min=0).float()
    p = torch.sigmoid(logits) * valid
    dice = 1 - 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    bce = (bce * valid).sum(1) / valid.sum(1).clamp(min=1)
    return dice, bce


@dataclass
class LossOutput:
    total: torch.Tensor
    per_combination: dict[str, torch.Tensor]  # mean Dice + BCE per combination, detached
    auxiliary: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted auxiliary terms, detached


def modality_loss(state: dict) -> torch.Tensor | None:
    """Cross-entropy of each row's modality pool from the modality head's logits, averaged over the rows the
    priors adapt (identity rows train nothing; a batch without such rows gives an exact, differentiable 0).
    None without the head."""
    if "modality_logits" not in state:
        return None
    ce = F.cross_entropy(state["modality_logits"].float(), state["modality_targets"], reduction="none")
    weight = state["weight"].float()
    return (ce * weight).sum() / weight.sum().clamp(min=1)


def combination_loss(model: AdaptedSegVol, batch: TrainBatch, cfg: LossConfig) -> LossOutput:
    """Loss summed over the configured combinations (SegVol's convention), plus the weighted pseudo term."""
    b = batch.image.shape[0]
    main = Prompts(batch.class_names, batch.boxes, (batch.point_coords, batch.point_labels))
    requests = [(c, main) for c in cfg.combinations]
    targets = [batch.target] * len(requests)
    use_pseudo = cfg.pseudo_weight > 0 and batch.pseudo_target is not None
    if use_pseudo:
        pseudo = Prompts(None, batch.pseudo_boxes, (batch.pseudo_point_coords, batch.pseudo_point_labels))
        requests += [(c, pseudo) for c in cfg.pseudo_combinations]
        targets += [batch.pseudo_target] * len(cfg.pseudo_combinations)
    logits, state = model.forward_batch(batch.image, batch.modalities, requests, batch.task_ids)
    dice, bce = dice_bce(logits.flatten(0, 1), torch.cat(targets))
    per_row = (cfg.dice_weight * dice + cfg.bce_weight * bce).reshape(len(requests), b).mean(dim=1)
    n_main = len(cfg.combinations)
    total = per_row[:n_main].sum()
    if use_pseudo:
        total = total + cfg.pseudo_weight * per_row[n_main:].sum()
    auxiliary = {}
    modality = modality_loss(state)
    if modality is not None:
        total = total + model.priors_cfg.modality_loss_weight * modality
        auxiliary["modality"] = modality.detach()
    names = [c for c, _ in requests[:n_main]] + [f"pseudo:{c}" for c, _ in requests[n_main:]]
    return LossOutput(total, dict(zip(names, per_row.detach().unbind(0), strict=True)), auxiliary)
