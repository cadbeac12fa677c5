"""``segevo preprocess``: SegVol-faithful model-ready arrays and the manifest (DVC ``preprocess``)."""

from __future__ import annotations

import argparse

from segevo_pipeline.common import config_from_args, preflight
from segevo_pipeline.data_stages import add_stage_options, log_to_stderr, print_report, shown


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
