"""Argument types for every verb's flags: a value is checked by the parser, before any file is read or model
built, and a bad one is rejected in one line naming the flag and the accepted range (argparse adds the flag's
name to the message of :class:`argparse.ArgumentTypeError`).

Voxel indices are whole numbers: ``3.5`` names no voxel, and silently rounding it would segment something the
user did not point at. Whether an index lies inside the volume is checked once the image is read.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _integer(text: str) -> int:
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low`` (``--epochs``, ``--workers``, ``--channel``)."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected a number of seconds > 0")
    return value


def run_name(text: str) -> str:
    """A run or study name: letters, digits, '.', '_' and '-', starting with a letter or digit."""
    if not RUN_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '.', '_' and '-' "
                                         "(starting with a letter or digit)")
    return text


def non_empty(text: str) -> str:
    """A class name or modality: something other than blanks."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; whether that device exists is checked when it is opened."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: expected cpu, cuda or cuda:N")
    return text


def _voxels(text: str, n: int, form: str) -> list[int]:
    parts = text.split(",")
    if len(parts) != n:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {form}, {n} whole voxel indices")
    try:
        return [_integer(p) for p in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {form}, {n} whole voxel indices "
                                         "(a voxel index has no fraction)") from None


def voxel_box(text: str) -> list[int]:
    """``d0,h0,w0,d1,h1,w1``: inclusive voxel indices, each start at most its end."""
    box = _voxels(text, 6, "d0,h0,w0,d1,h1,w1")
    if any(a > b for a, b in zip(box[:3], box[3:], strict=True)):
        raise argparse.ArgumentTypeError(f"{text!r}: each start must not exceed its end")
    return box


def voxel_point(text: str) -> tuple[list[int], int]:
    """``d,h,w`` or ``d,h,w:label`` with label 1 (positive, the default) or 0 (negative)."""
    coords, colon, label = text.partition(":")
    if colon and label not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r}: label must be 1 (positive) or 0 (negative)")
    return _voxels(coords, 3, "d,h,w[:label]"), int(label or 1)
