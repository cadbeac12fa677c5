"""Mixture-of-Adapters: one expert per modality, top-1 routing per row, LoRA experts on peft.

Every LoRA expert is a named peft adapter injected into the same SegVol; the identity expert is no adapter at
all (peft's ``"__base__"``), so its rows compute exactly the pretrained model. Routing hands each LoRA layer
the per-row adapter names through a forward pre-hook, which is peft's own mixed-batch path
(``_mixed_batch_forward``): the LoRA update is computed only for the rows of its expert and gradients reach
only the selected expert. peft's ``LoraModel`` refuses per-row names in training mode, so the hooks are ours.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from segevo.config import AdaptersConfig, ExpertConfig

BASE = "__base__"


class UnknownModality(ValueError):
    """A sample's modality has no expert and no fallback is configured."""


def target_regex(expert: ExpertConfig) -> str:
    """Module-name pattern of an expert's targets, scoped to the ViT blocks and the decoder transformer."""
    vit = "|".join(re.escape(t) for t in expert.vit_targets)
    dec = "|".join(re.escape(t) for t in expert.decoder_targets)
    parts = []
    if vit:
        parts.append(rf"image_encoder\.blocks\.\d+\.({vit})")
    if dec:
        parts.append(rf"mask_decoder\.transformer\.(.+\.)?({dec})")
    return "|".join(parts)


class MixtureOfAdapters:
    """Injects the LoRA experts into ``model`` (in place) and routes rows to experts by modality."""

    def __init__(self, model: nn.Module, cfg: AdaptersConfig):
        self.cfg = cfg
        self.lora_experts = [name for name, e in cfg.experts.items() if e.kind == "lora"]
        for name in self.lora_experts:
            e = cfg.experts[name]
            lora = LoraConfig(r=e.rank, lora_alpha=e.alpha, lora_dropout=e.dropout, use_rslora=e.rslora,
                              target_modules=target_regex(e), bias="none")
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora, model, adapter_name=name)
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        if self.lora_experts and not self.layers:
            raise ValueError("adapters: no module matched the LoRA target names")
        self._route: list[str] | None = None
        for layer in self.layers.values():
            layer.register_forward_pre_hook(self._inject_route, with_kwargs=True)

    def expert_of(self, modality: str) -> str:
        if modality in self.cfg.experts:
            return modality
        if self.cfg.fallback is not None:
            return self.cfg.fallback
        raise UnknownModality(f"unknown modality {modality!r}: experts exist for {', '.join(self.cfg.experts)} "
                              f"(set adapters.fallback to route other modalities to one of them)")

    def adapter_names(self, modalities: Sequence[str]) -> list[str]:
        """peft adapter name per row: the LoRA expert's name, or ``__base__`` for identity experts."""
        names = []
        for m in modalities:
            expert = self.expert_of(m)
            names.append(BASE if self.cfg.experts[expert].kind == "identity" else expert)
        return names

    @contextmanager
    def route(self, modalities: Sequence[str]) -> Iterator[None]:
        """Within the block, row i of every LoRA layer's input goes through ``modalities[i]``'s expert."""
        previous, self._route = self._route, self.adapter_names(modalities)
        try:
            yield
        finally:
            self._route = previous

    def _inject_route(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._route is None:
            raise RuntimeError("a LoRA layer ran outside MixtureOfAdapters.route(): rows have no expert")
        if args and args[0].shape[0] != len(self._route):
            raise RuntimeError(f"route has {len(self._route)} rows, the layer input {args[0].shape[0]}")
        return args, {**kwargs, "adapter_names": self._route}

    def expert_parameters(self, expert: str) -> dict[str, nn.Parameter]:
        """The LoRA parameters of one expert, keyed by their name inside the model."""
        out = {}
        for name, layer in self.layers.items():
            for prefix in ("lora_A", "lora_B"):
                mods = getattr(layer, prefix)
                if expert in mods:
                    for pname, p in mods[expert].named_parameters():
                        out[f"{name}.{prefix}.{expert}.{pname}"] = p
        return out

    def trainable_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in self.cfg.experts}
        for name in self.lora_experts:
            counts[name] = sum(p.numel() for p in self.expert_parameters(name).values())
        return counts


def merged_state_dict(model: nn.Module, expert: str | None) -> dict[str, torch.Tensor]:
    """A plain SegVol state dict with ``expert``'s LoRA merged into the weights (None: the identity expert).

    Keys and shapes are the base model's, so the result loads strictly into an unadapted SegVol.
    """
    merged: dict[str, torch.Tensor] = {}
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        merged[plain] = value.detach().clone()
        layer_name, _, param = key.rpartition(".base_layer.")
        if param == "weight" and expert is not None and layer_name in lora_layers:
            layer = lora_layers[layer_name]
            if expert in layer.lora_A:
                merged[plain] += layer.get_delta_weight(expert).to(value.dtype)
    return merged
