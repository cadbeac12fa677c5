"""The identity expert: rows routed to it compute the pretrained SegVol, bit for bit (DESIGN section 4.4).

It adds nothing to the model, so no layer is wrapped for it and no row mask ever involves it: the other
experts' masks give its rows exact zeros. It has no parameters, no optimizer group and nothing to merge.
"""

from __future__ import annotations

import torch
from torch import nn

from segevo.model.experts.base import Expert


class IdentityExpert(Expert):
    kind = "identity"
    trainable = False

    def inject(self, model: nn.Module) -> None:
        return None

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {}

    def routed_module(self, layer: nn.Module) -> nn.Module:
        raise TypeError(f"the identity expert {self.name!r} adapts no layer")

    def merged_weight(self, layer: nn.Module) -> torch.Tensor:
        raise TypeError(f"the identity expert {self.name!r} adapts no layer")

    def layer_parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        return {}

    @staticmethod
    def base_layer(layer: nn.Module) -> nn.Module:
        raise TypeError("the identity expert wraps no layer")

    @staticmethod
    def activate(layer: nn.Module, names: list[str]) -> None:
        raise TypeError("the identity expert wraps no layer")

    @staticmethod
    def switch_off(layer: nn.Module, off: bool) -> None:
        raise TypeError("the identity expert wraps no layer")
