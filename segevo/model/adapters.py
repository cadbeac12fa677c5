"""Mixture-of-Adapters: one expert per modality, top-1 routing per row, LoRA experts on peft.

Every LoRA expert is a named peft adapter injected into the same SegVol, and all of them stay active. Routing
multiplies the output of each expert's ``lora_A`` by a 0/1 row mask (a forward hook), so a row receives
exactly its own expert's update: for other rows the low-rank activation is zero, ``lora_B`` (bias-free) maps
it to exact zeros, and identity-expert rows compute the pretrained SegVol bit for bit. Gradients follow the
same masks, so only the selected expert learns from a row. The cost is plain LoRA's plus one multiply on the
rank-r activation; peft's own mixed-batch path (gather/scatter per layer, refused in training mode) measured
about 2x slower per step on the CPU.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from segevo.config import AdaptersConfig, ConfigError, ExpertConfig
from segevo.errors import UserError


class UnknownModality(UserError):
    """A sample's modality has no expert and no fallback is configured."""


def expert_of(cfg: AdaptersConfig, modality: str) -> str:
    """The expert a modality routes to: its own, else its base modality's (``MRI-T2`` -> ``MRI``), else the
    configured fallback, else an error."""
    for name in (modality, modality.split("-")[0]):
        if name in cfg.experts:
            return name
    if cfg.fallback is not None:
        return cfg.fallback
    raise UnknownModality(f"unknown modality {modality!r}: experts exist for {', '.join(cfg.experts)} "
                          f"(set adapters.fallback to route other modalities to one of them)")


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
                try:
                    inject_adapter_in_model(lora, model, adapter_name=name)
                except ValueError as err:  # peft: no module matched the target names
                    raise ConfigError(f"adapters.experts.{name}: no module matches its vit_targets "
                                      f"{list(e.vit_targets)} or decoder_targets {list(e.decoder_targets)} "
                                      f"({str(err).splitlines()[0][:120]})") from None
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        if self.lora_experts and not self.layers:
            raise ValueError("adapters: no module matched the LoRA target names")
        self._masks: dict[str, torch.Tensor] | None = None
        self._merged: dict[tuple[str, str], tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._in_inference = False
        for layer in self.layers.values():
            present = [e for e in self.lora_experts if e in layer.lora_A]
            layer.set_adapter(present)  # every expert active (and trainable); the masks do the routing
            for expert in present:
                layer.lora_A[expert].register_forward_hook(partial(self._mask_rows, expert))

    @contextmanager
    def inference(self, expert: str) -> Iterator[None]:
        """No-grad fast path for rows of one expert: LoRA switched off and, for a LoRA expert, its update merged
        into the base weights. The merged weights are cached (and rebuilt whenever the adapter's values change);
        the base tensors are swapped back untouched afterwards, so identity rows stay bit-exact."""
        if torch.is_grad_enabled():
            raise RuntimeError("MixtureOfAdapters.inference() is for no-grad forwards only")
        if self._in_inference:  # a nested swap would merge twice and restore the wrong tensors
            raise RuntimeError("MixtureOfAdapters.inference() is not re-entrant")
        self._in_inference = True
        swapped = []
        try:
            for name, layer in self.layers.items():
                layer._disable_adapters = True
                if expert in layer.lora_A:
                    weight = layer.get_base_layer().weight
                    swapped.append((weight, weight.data))
                    weight.data = self._merged_weight(expert, name, layer)
            yield
        finally:
            for weight, original in swapped:
                weight.data = original
            for layer in self.layers.values():
                layer._disable_adapters = False
            self._in_inference = False

    def invalidate(self) -> None:
        """Drop every merged weight. ``AdaptedSegVol`` calls it on each train/eval switch and state load."""
        self._merged.clear()

    def _merged_weight(self, expert: str, name: str, layer: LoraLayer) -> torch.Tensor:
        """W + delta, cached; under autocast, already in the autocast dtype, so the layers skip the per-call
        weight cast (the frozen base is cast on every call: with rows split into groups, that adds up).

        A cached entry is reused only while the LoRA factors hold the very values it was merged from: they are
        compared with a snapshot taken at merge time (a few MB at full size, a millisecond to compare). Version
        counters and data pointers cannot tell: DeepSpeed ZeRO writes optimizer updates through ``.data`` into
        its flat buffers, which changes neither."""
        base = layer.get_base_layer().weight
        device = base.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else base.dtype
        factors = (layer.lora_A[expert].weight, layer.lora_B[expert].weight)
        key = (dtype, base.device, base.data_ptr(), base._version)
        cached = self._merged.get((expert, name))
        if cached is not None and cached[0] == key and all(
                torch.equal(p.detach(), s) for p, s in zip(factors, cached[1], strict=True)):
            return cached[2]
        snapshot = tuple(p.detach().clone() for p in factors)
        merged = (base.data + layer.get_delta_weight(expert).to(base.dtype)).to(dtype)
        self._merged[(expert, name)] = (key, snapshot, merged)
        return merged

    def expert_of(self, modality: str) -> str:
        return expert_of(self.cfg, modality)

    @contextmanager
    def route(self, modalities: Sequence[str], device: torch.device | str) -> Iterator[None]:
        """Within the block, row i of every LoRA layer's input goes through ``modalities[i]``'s expert."""
        experts = [self.expert_of(m) for m in modalities]
        masks = torch.tensor([[float(e == name) for e in experts] for name in self.lora_experts],
                             device=device).reshape(len(self.lora_experts), len(experts))
        previous, self._masks = self._masks, dict(zip(self.lora_experts, masks.unbind(0), strict=True))
        try:
            yield
        finally:
            self._masks = previous

    def _mask_rows(self, expert: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._masks is None:
            raise RuntimeError("a LoRA layer ran outside MixtureOfAdapters.route(): rows have no expert")
        mask = self._masks[expert]
        if output.shape[0] != mask.shape[0]:
            raise RuntimeError(f"route has {mask.shape[0]} rows, the layer input {output.shape[0]}")
        return output * mask.reshape(-1, *([1] * (output.dim() - 1))).to(output.dtype)

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
