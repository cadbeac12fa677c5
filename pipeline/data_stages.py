"""What the data stage verbs (``segevo pseudomask``, ``segevo preprocess``) share: their options, their logging
and how they report a run."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from segevo_pipeline.flags import int_at_least


def add_stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int_at_least(1), metavar="N",
                   help="parallel processes (default: preprocess.workers, else one per CPU core)")
    p.add_argument("--force", action="store_true", help="recompute every case, even those that are up to date")


def log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("segevo: %(levelname)s: %(message)s"))
    root = logging.getLogger("segevo")
    if not any(getattr(h, "_segevo_stage", False) for h in root.handlers):
        handler._segevo_stage = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def shown(path: Path) -> str:
    """A path as users typed it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def print_report(stage: str, report, unit: str = "cases") -> None:
    parts = [f"{report.computed} computed", f"{report.reused} up to date"]
    if report.skipped:
        parts.append(f"{len(report.skipped)} skipped")
    print(f"{stage}: {len(report.outputs)} {unit} ({', '.join(parts)})")
    for s in report.skipped:
        print(f"  skipped {s['reason']}")
    if report.unlabelled:
        print(f"  {report.unlabelled} unlabelled cases left out")
