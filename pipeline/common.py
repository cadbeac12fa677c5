"""Helpers shared by the verbs: config resolution and tables printed to the console."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

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


def prepared_data(cfg: SegevoConfig) -> tuple[Path, list, dict]:
    """The data root, the manifest's cases and the split: what training and evaluation start from, checked
    before any model or Ray start-up is paid."""
    from segevo.data.manifest import read_manifest

    root = Path(cfg.data.root)
    cases, _ = read_manifest(root / "prep" / "manifest.json")
    split_path = root / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path}: no split (run 'segevo split' first)")
    return root, cases, json.loads(split_path.read_text())


def csv_bytes(rows: list[dict[str, Any]], fields: list[str]) -> bytes:
    """A CSV table of ``fields`` (other keys ignored), ready for an atomic write."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: the verbs write PNG files and never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
