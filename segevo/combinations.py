"""Prompt combinations: which prompt kinds (text, box, points) one decoder row receives.

SegVol trains and is evaluated on every combination of its three prompt kinds, named by joining the kinds with
``+`` in the order text, box, point (``text``, ``box+point``, ...). Config validation, the training loss, the
model's prompt encoding and the evaluation all read these names, so they are defined and parsed here, once.
"""

from __future__ import annotations

from collections.abc import Iterable

KINDS = ("text", "box", "point")
ALL = ("text", "box", "point", "text+box", "text+point", "box+point")
# the order in which reports pick the combination they lead with: the prototype's headline text+point first
HEADLINE = ("text+point", "text", "point", "box", "text+box", "box+point")


def parts(name: str) -> frozenset[str]:
    """The prompt kinds a combination name holds; an unknown, empty or repeated kind is a ``ValueError``."""
    kinds = name.split("+")
    if not name or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        raise ValueError(f"unknown prompt combination {name!r}: use text, box and point joined by '+'")
    return frozenset(kinds)


def name_of(kinds: set[str] | frozenset[str]) -> str:
    """The canonical name of a set of prompt kinds (``{"point", "text"}`` -> ``text+point``)."""
    if not kinds or not set(kinds) <= set(KINDS):
        raise ValueError(f"no prompt combination of {sorted(kinds)}: use a non-empty subset of {', '.join(KINDS)}")
    return "+".join(k for k in KINDS if k in kinds)


def headline(names: Iterable[str]) -> str:
    """The combination a report leads with: the first of :data:`HEADLINE` among ``names``."""
    present = set(names)
    return next(n for n in HEADLINE if n in present)
