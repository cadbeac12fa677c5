"""The base of every config section: unknown keys are errors, booleans are never numbers, and a bad value
is a :class:`ConfigError` that names the key."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from segevo.errors import UserError


class ConfigError(UserError):
    """A config file or key is missing, unknown or of the wrong type."""


class _Section(BaseModel):
    """Every section: unknown keys are errors, and a boolean is never taken for a number (``rank: true`` would
    otherwise become 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if not _admits_bool(annotation) and _holds_bool(value):
            raise ValueError("expected a number or text, got a boolean (true/false)")
        return value


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes booleans anywhere (``bool``, ``bool | None``, ``list[bool | int]``); section
    types check their own fields."""
    if annotation is bool or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    return any(_admits_bool(arg) for arg in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_bool(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_bool(v) for v in value.values())
    return False
