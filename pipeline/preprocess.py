"""``segevo preprocess``: SegVol-faithful model-ready arrays and the manifest (DVC ``preprocess``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common import config_from_args, preflight
from pipeline.flags import int_at_least


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text,
        description="For every labelled case of <data.root>/raw/cases.json: SegVol's intensity normalisation, "
                    "axis order (D, H, W) and foreground crop, class-index labels, the pseudo-mask of "
                    "'segevo pseudomask', and zoom-out copies at model.roi_size, as .npy under "
                    "<data.root>/prep/<source>/<case_id>/; then <data.root>/prep/manifest.json. Cases whose "
                    "inputs, parameters and code did not change are not recomputed.",
    )
    add_stage_options(p)
    p.set_defaults(run=run)


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


def run(args: argparse.Namespace) -> int:
    from segevo.data.preprocess.stages import run_preprocess

    cfg, source = config_from_args(args)
    preflight(args, folders=[("data.root", cfg.data.root)])
    log_to_stderr()
    report = run_preprocess(cfg, workers=args.workers, force=args.force)
    print_report("preprocess", report)
    for key, notes in sorted(report.notes.items()):
        for note in notes:
            print(f"  {key}: {note}")
    print(f"wrote {shown(report.path)} (config {source})")
    return 0
