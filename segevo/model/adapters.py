"""Mixture-of-Adapters: one expert per modality, top-1 routing per row, experts behind the ``Expert`` interface.

Every trained expert (LoRA, DoRA: ``segevo.model.experts``) is a named adapter injected into the same SegVol,
and all of them stay active. Routing replaces, on every row of another expert, the output of each expert's
*routed module* by exact zeros (a forward hook): a module chosen per kind so that the row's layer output is
then exactly the base layer's (LoRA: the rank-r activation ``A x``; DoRA: its whole contribution, since its
magnitude rescales the whole weight). So a row receives exactly its own expert's update, identity-expert rows
compute the pretrained SegVol bit for bit, and gradients follow the same masks: only the selected expert
learns from a row. The cost is the experts' own plus one select per adapted layer; peft's mixed-batch path
(gather/scatter per layer, refused in training mode) measured about 2x slower per step on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from segevo.config import AdaptersConfig
from segevo.errors import UserError
from segevo.model.experts import Expert, make_expert


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


class MixtureOfAdapters:
    """Injects the experts into ``model`` (in place) and routes rows to experts by modality."""

    def __init__(self, model: nn.Module, cfg: AdaptersConfig):
        self.cfg, self.model = cfg, model
        self.experts: dict[str, Expert] = {name: make_expert(name, e) for name, e in cfg.experts.items()}
        self.trained_experts = [name for name, e in self.experts.items() if e.trainable]
        for name in self.trained_experts:
            self.experts[name].inject(model)
        # wrapped layer -> the experts in it (by then every expert has added itself to its layers)
        self.members: dict[str, list[str]] = {}
        for name in self.trained_experts:
            for layer_name in self.experts[name].layers(model):
                self.members.setdefault(layer_name, []).append(name)
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in self.members}
        self._masks: dict[str, torch.Tensor] | None = None
        self._merged: dict[tuple[str, str], tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._in_inference = False
        for layer_name, layer in self.layers.items():
            self._wrapper(layer_name).activate(layer, self.members[layer_name])
            for name in self.members[layer_name]:
                self.experts[name].routed_module(layer).register_forward_hook(partial(self._mask_rows, name))

    def _wrapper(self, layer_name: str) -> Expert:
        """An expert of the layer, for the layer-level operations of its kind's wrapper."""
        return self.experts[self.members[layer_name][0]]

    @contextmanager
    def inference(self, expert: str) -> Iterator[None]:
        """No-grad fast path for rows of one expert: every adapter switched off and, for a trained expert, its
        update merged into the base weights. The merged weights are cached (and rebuilt whenever the expert's
        values change); the base tensors are swapped back untouched afterwards, so identity rows stay bit-exact."""
        if torch.is_grad_enabled():
            raise RuntimeError("MixtureOfAdapters.inference() is for no-grad forwards only")
        if self._in_inference:  # a nested swap would merge twice and restore the wrong tensors
            raise RuntimeError("MixtureOfAdapters.inference() is not re-entrant")
        self._in_inference = True
        swapped = []
        try:
            for name, layer in self.layers.items():
                wrapper = self._wrapper(name)
                wrapper.switch_off(layer, True)
                if expert in self.members[name]:
                    weight = wrapper.base_weight(layer)
                    swapped.append((weight, weight.data))
                    weight.data = self._merged_weight(expert, name, layer)
            yield
        finally:
            for weight, original in swapped:
                weight.data = original
            for name, layer in self.layers.items():
                self._wrapper(name).switch_off(layer, False)
            self._in_inference = False

    def invalidate(self) -> None:
        """Drop every merged weight. ``AdaptedSegVol`` calls it on each train/eval switch and state load."""
        self._merged.clear()

    def _merged_weight(self, expert: str, name: str, layer: nn.Module) -> torch.Tensor:
        """The expert's merged weight, cached; under autocast, already in the autocast dtype, so the layers skip
        the per-call weight cast (the frozen base is cast on every call: with rows split into groups, that adds
        up).

        A cached entry is reused only while the expert's parameters in the layer hold the very values it was
        merged from: they are compared with a snapshot taken at merge time (a few MB at full size, a millisecond
        to compare). Version counters and data pointers cannot tell: DeepSpeed ZeRO writes optimizer updates
        through ``.data`` into its flat buffers, which changes neither."""
        owner = self.experts[expert]
        base = owner.base_weight(layer)
        device = base.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else base.dtype
        params = tuple(owner.layer_parameters(layer).values())
        key = (dtype, base.device, base.data_ptr(), base._version)
        cached = self._merged.get((expert, name))
        if cached is not None and cached[0] == key and all(
                torch.equal(p.detach(), s) for p, s in zip(params, cached[1], strict=True)):
            return cached[2]
        snapshot = tuple(p.detach().clone() for p in params)
        merged = owner.merged_weight(layer).to(dtype)
        self._merged[(expert, name)] = (key, snapshot, merged)
        return merged

    def expert_of(self, modality: str) -> str:
        return expert_of(self.cfg, modality)

    @contextmanager
    def route(self, modalities: Sequence[str], device: torch.device | str) -> Iterator[None]:
        """Within the block, row i of every adapted layer's input goes through ``modalities[i]``'s expert."""
        experts = [self.expert_of(m) for m in modalities]
        masks = {name: torch.tensor([e == name for e in experts], dtype=torch.bool, device=device)
                 for name in self.trained_experts}
        previous, self._masks = self._masks, masks
        try:
            yield
        finally:
            self._masks = previous

    def _mask_rows(self, expert: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._masks is None:
            raise RuntimeError("an adapted layer ran outside MixtureOfAdapters.route(): rows have no expert")
        mask = self._masks[expert]
        if output.shape[0] != mask.shape[0]:
            raise RuntimeError(f"route has {mask.shape[0]} rows, the layer input {output.shape[0]}")
        # a select, not a product: other rows get exact zeros even where this expert's term is not finite
        return torch.where(mask.reshape(-1, *([1] * (output.dim() - 1))), output, output.new_zeros(()))

    def expert_parameters(self, expert: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of one expert, keyed by their name inside the model."""
        owner = self.experts[expert]
        return {f"{layer_name}.{pname}": p for layer_name, layer in self.layers.items()
                if expert in self.members[layer_name] for pname, p in owner.layer_parameters(layer).items()}

    def trainable_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in self.expert_parameters(name).values()) for name in self.experts}

    def merged_state_dict(self, expert: str) -> dict[str, torch.Tensor]:
        """A plain SegVol state dict with ``expert`` merged into the weights (an identity expert: the base).

        Keys and shapes are the base model's, so the result loads strictly into an unadapted SegVol."""
        inner = {}  # wrapped layer -> the name of its original layer inside it
        for layer_name, layer in self.layers.items():
            original = self._wrapper(layer_name).base_layer(layer)
            inner[layer_name] = next(n for n, m in layer.named_modules() if m is original)
        merged: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            owner = _wrapped_owner(key, inner)
            if owner is None:
                merged[key] = value.detach().clone()
                continue
            rest = key[len(owner) + 1:]
            if not rest.startswith(inner[owner] + "."):
                continue  # an expert's own tensor
            param = rest[len(inner[owner]) + 1:]
            if param == "weight" and expert in self.members[owner]:
                value = self.experts[expert].merged_weight(self.layers[owner])
            merged[f"{owner}.{param}"] = value.detach().clone()
        return merged


def _wrapped_owner(key: str, wrapped: dict[str, str]) -> str | None:
    """The wrapped layer a state-dict key lies in, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in wrapped:
            return prefix
    return None
