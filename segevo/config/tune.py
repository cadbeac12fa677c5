"""Optuna studies (``tune``): the search space, the pruner and the study's storage."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from segevo.config.base import _Section


class ParamSpec(_Section):
    """One search-space dimension: ``choices`` (categorical), or ``low``..``high`` (int or float, ``log`` scale)."""

    type: Literal["categorical", "int", "float"]
    choices: list[bool | int | float | str] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.log:
                raise ValueError("categorical takes a non-empty choices list and nothing else")
            return self
        if self.choices is not None or self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} takes low < high, not choices")
        if self.type == "int" and not (isinstance(self.low, int) and isinstance(self.high, int)):
            raise ValueError(f"int bounds must be integers, got {self.low!r}, {self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self

    def extremes(self) -> list[Any]:
        """The values that must all be valid for the key: every choice, or both bounds."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


class PrunerConfig(_Section):
    """Stops unpromising trials from their validation Dice per epoch (epochs count from 0).

    ``median``: below the median of earlier trials at the same epoch, once ``startup_trials`` finished and after
    ``warmup_epochs``; ``successive_halving`` / ``hyperband``: rungs from ``min_epochs`` keeping 1/``reduction_factor``
    of the trials; ``threshold``: Dice below ``min_dice`` after ``warmup_epochs``; ``none``: never.
    """

    kind: Literal["median", "successive_halving", "hyperband", "threshold", "none"] = "median"
    startup_trials: int = Field(2, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    min_epochs: int = Field(1, gt=0)
    reduction_factor: int = Field(3, ge=2)
    min_dice: float = Field(0.0, ge=0, le=1)


class TuneConfig(_Section):
    """``segevo tune``: an Optuna study over this config, maximising validation Dice, one Ray Train run per trial.

    ``storage`` is an RDB URL: the embedded default is a SQLite file in the working directory, ``postgresql://``
    serves studies that several machines share. ``trials`` is the number of finished (complete or pruned) trials
    the study should hold, whichever processes ran them. A dead process's trial is failed once its heartbeat is
    ``grace_s`` old and retried ``retries`` times, resuming the dead run's checkpoint. ``space`` maps dotted config
    keys to their ranges; unset, it is the rank of every LoRA or DoRA expert, ``priors.pool_size`` and ``train.lr``.
    """

    study: str = "segevo"
    storage: str = "sqlite:///optuna.db"
    trials: int = Field(20, gt=0)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    pruner: PrunerConfig = PrunerConfig()
    heartbeat_s: int = Field(10, gt=0)
    grace_s: int = Field(60, gt=0)
    retries: int = Field(1, ge=0)
    output: str = "reports/tune"
    space: dict[str, ParamSpec] | None = None

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.study):
            raise ValueError(f"study {self.study!r} may only hold letters, digits, '.', '_' and '-'")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s {self.grace_s} must exceed heartbeat_s {self.heartbeat_s}")
        if self.space is not None and not self.space:
            raise ValueError("space must name at least one key (leave it unset for the default)")
        return self
