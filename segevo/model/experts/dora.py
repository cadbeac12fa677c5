"""DoRA experts on peft (``use_dora=True``): for the rows routed to the expert a layer computes

    y = s * (W + dW) x + b,   s = m / ||W + dW||  (per output feature: the norm of each row of W + dW),

with ``dW = scale * B A`` and a learned magnitude ``m`` (peft's ``lora_magnitude_vector``, initialised to
``||W||`` so that the expert starts as the base layer). peft adds it to the base output ``W x + b`` as

    (s - 1) * (W x) + s * scale * B A x,

the output of the expert's ``lora_magnitude_vector`` module (its ``DoraLinearLayer``).

Routing stays exact: masking ``A x`` as LoRA does would not be, since ``m`` rescales the whole weight and the
``(s - 1) W x`` term does not pass through A. The mixture therefore zeroes that module's output, the expert's
whole contribution, on every row of another expert: such a row gets the base output plus exact zeros (whatever
the term held there, even a non-finite value), so identity rows keep the pretrained bits, and no gradient
reaches A, B or ``m`` from them. For the expert's own rows, peft rescales the layer's running output, which
by then holds the base output plus the exact zeros of the other experts, so it is ``W x + b`` as the formula
needs. The merged weight is ``s * (W + dW)`` with the bias unchanged, computed here from the public tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from segevo.config import ConfigError
from segevo.model.experts.lora import LoraExpert


class DoraExpert(LoraExpert):
    kind = "dora"
    use_dora = True
    adapter_parts = ("lora_A", "lora_B", "lora_magnitude_vector")

    def inject(self, model: nn.Module) -> None:
        super().inject(model)
        for name, layer in self.layers(model).items():
            if type(self.base_layer(layer)) is not nn.Linear:  # the per-row norm above is a Linear's
                raise ConfigError(f"adapters.experts.{self.name}: kind dora needs Linear targets, {name} is a "
                                  f"{type(self.base_layer(layer)).__name__}")

    def routed_module(self, layer: nn.Module) -> nn.Module:
        return layer.lora_magnitude_vector[self.name]

    def merged_weight(self, layer: nn.Module) -> torch.Tensor:
        base = self.base_weight(layer).detach()
        with torch.no_grad():
            combined = base.float() + layer.get_delta_weight(self.name).float()
            scale = layer.lora_magnitude_vector[self.name].weight.float() / torch.linalg.norm(combined, dim=1)
            return (scale[:, None] * combined).to(base.dtype)
