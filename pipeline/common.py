"""Helpers shared by the verbs: config resolution and tables printed to the console."""

from __future__ import annotations

import argparse
import os

from segevo.config import SegevoConfig, load_config


def config_from_args(args: argparse.Namespace) -> tuple[SegevoConfig, str]:
    """The config named by ``--config``, else ``$SEGEVO_CONFIG``, else ``params.yaml``, else the defaults."""
    path = args.config or os.environ.get("SEGEVO_CONFIG")
    if path is None and os.path.isfile("params.yaml"):
        path = "params.yaml"
    if path is None:
        return load_config(None), "built-in defaults"
    return load_config(path), str(path)


def print_part_table(counts: dict[str, int]) -> None:
    for part, n in counts.items():
        print(f"  {part:<16}{n:>14,}")
    print(f"  {'total':<16}{sum(counts.values()):>14,}")
