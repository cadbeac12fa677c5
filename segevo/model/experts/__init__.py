"""Adapter kinds of the Mixture-of-Adapters, one sibling module each behind the ``Expert`` interface
(``base.py``); ``ExpertConfig.kind`` names one of ``KINDS``."""

from __future__ import annotations

from segevo.config import ExpertConfig
from segevo.model.experts.base import Expert
from segevo.model.experts.dora import DoraExpert
from segevo.model.experts.identity import IdentityExpert
from segevo.model.experts.lora import LoraExpert

KINDS: dict[str, type[Expert]] = {cls.kind: cls for cls in (IdentityExpert, LoraExpert, DoraExpert)}


def make_expert(name: str, cfg: ExpertConfig) -> Expert:
    return KINDS[cfg.kind](name, cfg)


__all__ = ["KINDS", "DoraExpert", "Expert", "IdentityExpert", "LoraExpert", "make_expert"]
