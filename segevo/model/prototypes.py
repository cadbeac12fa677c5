"""How a posterior prototype adapts SegVol's mask decoder: one small interface, one sibling per kind.

The mask decoder offers two hooks: a delta added to mask token 0 before its hypernetwork, and an extra
dynamic kernel multiplied with the upscaled features. A prototype kind says how wide the prototype is and which
hook it feeds. The kind is chosen in one place, :func:`prototype_kind`, from ``priors.prototype``; nothing else
branches on its name.

- ``additive``: the prototype is a delta on mask token 0 (the student prototype's choice: its multiplicative
  variant was "subpar").
- ``multiplicative``: the prototype is a kernel on the upscaled features, HERMES' prototype x feature product,
  added to SegVol's own kernel so a zero prototype leaves SegVol's logits untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch


class DecoderInputs(NamedTuple):
    """What ``SegVol.decode_combinations``' posterior hook returns: (mask-token delta, extra kernel), per row."""

    mask_token_delta: torch.Tensor | None
    extra_kernel: torch.Tensor | None


class PrototypeKind(ABC):
    name: ClassVar[str]

    @abstractmethod
    def width(self, model_dim: int) -> int:
        """Channels of one prototype for a decoder of width ``model_dim``."""

    @abstractmethod
    def decoder_inputs(self, prototype: torch.Tensor) -> DecoderInputs:
        """The decoder adjustment for per-row prototypes (R, width)."""


class AdditivePrototype(PrototypeKind):
    name = "additive"

    def width(self, model_dim: int) -> int:
        return model_dim

    def decoder_inputs(self, prototype: torch.Tensor) -> DecoderInputs:
        return DecoderInputs(prototype, None)


class MultiplicativePrototype(PrototypeKind):
    name = "multiplicative"

    def width(self, model_dim: int) -> int:
        return model_dim // 8  # the hypernetwork's kernel width (SegVol's upscaled feature channels)

    def decoder_inputs(self, prototype: torch.Tensor) -> DecoderInputs:
        return DecoderInputs(None, prototype)


KINDS: dict[str, type[PrototypeKind]] = {k.name: k for k in (AdditivePrototype, MultiplicativePrototype)}


def prototype_kind(name: str) -> PrototypeKind:
    try:
        return KINDS[name]()
    except KeyError:
        raise ValueError(f"priors.prototype {name!r} is not one of {', '.join(KINDS)}") from None
