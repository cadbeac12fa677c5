"""The ``Expert`` interface: what the Mixture-of-Adapters needs of an adapter kind, and nothing more.

An expert is one modality's change to the frozen SegVol. ``MixtureOfAdapters`` injects every expert into the
same model, routes each row of a batch to one of them, merges one into the weights for no-grad inference and
for the plain-SegVol export, and hands each expert's parameters to the optimizer as one group. So a kind
provides:

- ``inject``: add its parameters to its target layers (in place);
- ``routed_module``: per adapted layer, the submodule whose output, replaced by exact zeros on a row, leaves
  that row's layer output exactly the base layer's (and gives it no gradient). The mixture masks that output
  by rows; how a kind makes this exact is written in its module (``lora.py``, ``dora.py``);
- ``merged_weight``: the base weight with the update folded in, so that the plain layer computes for every
  row what the routed layer computes for the expert's rows;
- ``layer_parameters``: per adapted layer, its trainable tensors (the merged weight depends on nothing else);
- save and load: those tensors are ordinary parameters of the model, saved and loaded by name with the other
  trained ones (``adapter_io``).

Adapter libraries keep several experts in one wrapped layer, so the layer-level operations (making the experts
of a layer active and trainable once all are injected, the original layer, switching them all off) are here
too: they are the only places the mixture touches the library's layer objects. A new kind is a sibling module
registered in ``segevo.model.experts.KINDS`` and named in ``ExpertConfig.kind``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from segevo.config import ExpertConfig


class Expert(ABC):
    """One modality's adapter, named like its modality (the adapter name inside the wrapped layers)."""

    kind: ClassVar[str]
    trainable: ClassVar[bool] = True

    def __init__(self, name: str, cfg: ExpertConfig):
        self.name, self.cfg = name, cfg

    @abstractmethod
    def inject(self, model: nn.Module) -> None:
        """Add this expert to its target layers of ``model`` (``ConfigError`` if there are none)."""

    @abstractmethod
    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The wrapped layers this expert adapts, by module name."""

    @abstractmethod
    def routed_module(self, layer: nn.Module) -> nn.Module:
        """The submodule of ``layer`` whose output the mixture masks by rows (see the module docstring)."""

    @abstractmethod
    def merged_weight(self, layer: nn.Module) -> torch.Tensor:
        """``layer``'s base weight with this expert merged in, in the base weight's dtype."""

    @abstractmethod
    def layer_parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """This expert's parameters in ``layer``, keyed by their name inside the layer."""

    @staticmethod
    @abstractmethod
    def base_layer(layer: nn.Module) -> nn.Module:
        """The original layer inside a wrapped one (its weight is what a merged weight replaces)."""

    @staticmethod
    @abstractmethod
    def activate(layer: nn.Module, names: list[str]) -> None:
        """Make the named experts of a wrapped layer all active and trainable (the masks do the routing)."""

    @staticmethod
    @abstractmethod
    def switch_off(layer: nn.Module, off: bool) -> None:
        """Make a wrapped layer compute its base layer only (every expert in it skipped), or undo that."""

    @classmethod
    def base_weight(cls, layer: nn.Module) -> nn.Parameter:
        return cls.base_layer(layer).weight
