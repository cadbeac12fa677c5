"""The registry of raw data sources. Each module knows its files (URLs, checksums), how to fetch and unpack
them into ``<data root>/raw/<source>/``, and how to list their cases for the case table.

A source module provides ``VERSION`` (bumped when its listing changes, which invalidates earlier runs),
``META`` (licence, annotation kind, home page), ``options(cfg)`` (the config values its result depends on),
``fetch(ctx)`` and ``candidates(ctx)``; see ``segevo.data.sources.base``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from segevo.errors import UserError

SOURCES: dict[str, str] = {
    "demo": "segevo.data.sources.demo",
    "msd": "segevo.data.sources.msd",
    "amos22": "segevo.data.sources.amos22",
    "chaos": "segevo.data.sources.chaos",
    "promise12": "segevo.data.sources.promise12",
    "m3d_seg": "segevo.data.sources.m3d_seg",
    "local": "segevo.data.sources.local",
}


class UnknownSourceError(UserError):
    """A source name that is not in the registry."""


def get_source(name: str) -> ModuleType:
    if name not in SOURCES:
        raise UnknownSourceError(f"unknown data source {name!r}; known sources: {', '.join(SOURCES)}")
    return importlib.import_module(SOURCES[name])
