"""``segevo pseudomask``: SegVol's Felzenszwalb-Huttenlocher pseudo-masks with the ground truth on top (DVC
``pseudomask``)."""

from __future__ import annotations

import argparse

from segevo_pipeline.common import config_from_args, preflight
from segevo_pipeline.data_stages import add_stage_options, log_to_stderr, print_report, shown


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text,
        description="For every labelled case of <data.root>/raw/cases.json, SegVol's pseudo-mask flow: the image "
                    "normalised SegVol's way, resized to pseudomask.grid, 3D Felzenszwalb-Huttenlocher, the "
                    "ground truth painted on top, the clean-up. Writes <data.root>/pseudo/<source>/<case_id>.npy "
                    "(int16, -1 = none) with a .json sidecar, and <data.root>/pseudo/index.json. Cases whose "
                    "inputs, parameters and code did not change are not recomputed.",
    )
    add_stage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from segevo.data.preprocess.stages import run_pseudomask

    cfg, source = config_from_args(args)
    preflight(args, folders=[("data.root", cfg.data.root)])
    log_to_stderr()
    report = run_pseudomask(cfg, workers=args.workers, force=args.force)
    print_report("pseudomask", report)
    print(f"wrote {shown(report.path)} (grid {'x'.join(map(str, cfg.pseudomask.grid))}; config {source})")
    return 0
