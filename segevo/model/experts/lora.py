"""LoRA experts on peft: a layer computes ``W x + b + s B A x`` for the rows routed to the expert.

Routing stays exact: the mixture zeroes ``lora_A``'s output (the rank-r activation ``A x``) on every row of
another expert, bias-free ``lora_B`` maps those zeros to exact zeros, and the layer adds them to its base
output, so such a row keeps the base layer's bits; its gradient into A and B is zero as well. The merged weight
is ``W + s B A`` (peft's ``get_delta_weight``), the bias unchanged.

This module (with ``dora.py``, a LoRA variant in the same peft layer) is segevo's one contact with peft's layer
objects. It uses peft's public API (``LoraConfig``, ``inject_adapter_in_model``, ``LoraLayer.lora_A``/
``lora_B``, ``get_base_layer``, ``get_delta_weight``, ``set_adapter``) and one private attribute, in
:meth:`LoraExpert.switch_off`: peft's public ``enable_adapters(False)`` also clears ``requires_grad`` on every
adapter, which must not happen to experts that are being trained (no-grad validation runs mid-training).
"""

from __future__ import annotations

import re
import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from segevo.config import ConfigError, ExpertConfig
from segevo.model.experts.base import Expert


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


class LoraExpert(Expert):
    kind = "lora"
    use_dora = False
    adapter_parts: tuple[str, ...] = ("lora_A", "lora_B")  # the peft ModuleDicts that hold this kind's tensors

    def inject(self, model: nn.Module) -> None:
        e = self.cfg
        config = LoraConfig(r=e.rank, lora_alpha=e.alpha, lora_dropout=e.dropout, use_rslora=e.rslora,
                            target_modules=target_regex(e), bias="none", use_dora=self.use_dora)
        with warnings.catch_warnings():  # several adapters in one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            try:
                inject_adapter_in_model(config, model, adapter_name=self.name)
            except ValueError as err:  # peft: no module matched the target names
                raise ConfigError(f"adapters.experts.{self.name}: no module matches its vit_targets "
                                  f"{list(e.vit_targets)} or decoder_targets {list(e.decoder_targets)} "
                                  f"({str(err).splitlines()[0][:120]})") from None

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and self.name in m.lora_A}

    def routed_module(self, layer: nn.Module) -> nn.Module:
        return layer.lora_A[self.name]

    def merged_weight(self, layer: nn.Module) -> torch.Tensor:
        base = self.base_weight(layer).detach()
        with torch.no_grad():
            return base + layer.get_delta_weight(self.name).to(base.dtype)

    def layer_parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for part in self.adapter_parts:
            out.update(getattr(layer, part)[self.name].named_parameters(prefix=f"{part}.{self.name}"))
        return out

    @staticmethod
    def base_layer(layer: nn.Module) -> nn.Module:
        return layer.get_base_layer()

    @staticmethod
    def activate(layer: nn.Module, names: list[str]) -> None:
        layer.set_adapter(names)  # peft activates one adapter per injection; several stay active here

    @staticmethod
    def switch_off(layer: nn.Module, off: bool) -> None:
        layer._disable_adapters = off
