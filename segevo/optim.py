"""AdamW whose parameter groups can sit out a step: experts with no rows in a batch are not touched by it.

Routing gives an expert without rows exact-zero gradients, not none (DeepSpeed's gradient buckets must match
across ranks, so every trainable parameter takes part in every backward). A plain AdamW would still move such
an expert: decoupled weight decay shrinks it and the running moments of earlier steps keep pushing it, so a
CT-only step would change the MRI expert. ``GroupedAdamW`` skips idle groups entirely: no decay, no moment
update, no step count. It works under DeepSpeed ZeRO 0, 1 and 2 because ZeRO keeps the client optimizer's
param groups (each becomes one flat partition) and steps them through this class; a skipped partition is
copied back to the model unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class GroupedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` over named groups (each group dict has a ``name``); ``set_idle`` names the groups the
    next steps must leave alone."""

    def __init__(self, groups: dict[str, list[torch.nn.Parameter]], **options: float):
        super().__init__([{"params": params, "name": name} for name, params in groups.items() if params], **options)
        self.idle: frozenset[str] = frozenset()

    def set_idle(self, names: Iterable[str]) -> None:
        self.idle = frozenset(names)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        groups = self.param_groups
        self.param_groups = [g for g in groups if g["name"] not in self.idle]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups
