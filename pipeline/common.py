"""Helpers shared by the verbs: config resolution and tables printed to the console."""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from segevo.config import SegevoConfig, apply_overlay, apply_overrides, default_profile, load_config
from segevo.errors import UserError
from segevo.guard import Named


def config_from_args(args: argparse.Namespace) -> tuple[SegevoConfig, str]:
    """The config named by ``--config``, else ``$SEGEVO_CONFIG``, else ``params.yaml``, else the defaults, with
    the ``--variant`` overlay and then every ``--set KEY=VALUE`` applied (validated by the same schema)."""
    path = config_file(args)
    cfg = load_config(path)
    sets = list(getattr(args, "sets", None) or [])
    source = str(path) if path is not None else "built-in defaults"
    variant = getattr(args, "variant", None)
    if variant is not None:
        overlay = variant_file(cfg, variant)
        cfg = apply_overlay(cfg, overlay)
        args.variant_file = str(overlay)  # an input like the config file: no output may overwrite it
        source += f" with variant {overlay}"
    if sets:
        cfg = apply_overrides(cfg, sets)
        source += " with --set " + " ".join(sets)
    return cfg, source


def variant_file(cfg: SegevoConfig, variant: str) -> Path:
    """A variant's overlay: a YAML file given as a path, else ``<compare.overlays>/<name>.yaml``; an unknown name
    is an error listing the variants that exist."""
    if variant.endswith((".yaml", ".yml")) or os.sep in variant:
        return Path(variant)
    folder = Path(cfg.compare.overlays)
    path = folder / f"{variant}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise UserError(f"--variant {variant}: no overlay {path} (variants in {folder}: "
                        f"{', '.join(known) or 'none'})")
    return path


def config_file(args: argparse.Namespace) -> str | None:
    """The config file a verb reads (an input no output may overwrite), or None for the built-in defaults."""
    return getattr(args, "config", None) or default_profile()


def preflight(args: argparse.Namespace, outputs: Iterable[Named] = (), inputs: Iterable[Named] = (),
              folders: Iterable[Named] = (), replaced: Iterable[Named] = ()) -> None:
    """The output pre-flight of every verb (:func:`segevo.guard.preflight`), with the config file always among
    the inputs: run before any work, so a bad output costs nothing and overwrites nothing."""
    from segevo.guard import preflight as check

    check(outputs, [("--config", config_file(args)), ("--variant", getattr(args, "variant_file", None)), *inputs],
          folders, replaced)


def torch_device(name: str | None) -> Any:
    """``--device`` opened: default cuda when available; an absent GPU is a one-line error, not a traceback."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UserError(f"--device {name}: not available (this machine has {count} CUDA devices)")
    return device


def print_part_table(counts: dict[str, int]) -> None:
    for part, n in counts.items():
        print(f"  {part:<16}{n:>14,}")
    print(f"  {'total':<16}{sum(counts.values()):>14,}")


def prepared_data(cfg: SegevoConfig) -> tuple[Path, list, dict]:
    """The data root, the manifest's cases and the split: what training and evaluation start from, checked
    before any model or Ray start-up is paid."""
    from segevo.data.manifest import check_prep_arrays, read_manifest
    from segevo.data.split import read_split

    root = Path(cfg.data.root)
    cases, _ = read_manifest(root / "prep" / "manifest.json")
    split = read_split(root / "split.json", known=[c.key for c in cases])
    subset = cfg.train.subset
    if subset is not None and subset not in split["subsets"]:
        raise UserError(f"train.subset {subset!r}: {root / 'split.json'} has subsets {sorted(split['subsets'])}")
    check_prep_arrays(cases, root / "prep")
    return root, cases, split


def evaluation_cases(cfg: SegevoConfig, split_name: str, max_cases: int | None) -> tuple[Path, list]:
    """The prep folder and the cases of one split (at most ``max_cases``), each checked to be in the manifest."""
    root, cases, split = prepared_data(cfg)
    split_path = root / "split.json"
    keys = split.get(split_name, [])
    if not keys:
        raise UserError(f"{split_path}: the {split_name!r} split is empty ({len(split.get('train', []))} training "
                         "cases): set evaluate.split or raise split.test_fraction")
    by_key = {c.key: c for c in cases}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise UserError(f"{split_path}: case {missing[0]} is not in the manifest (rerun 'segevo split')")
    chosen = [by_key[k] for k in keys]
    return root / "prep", chosen[:max_cases] if max_cases else chosen


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
