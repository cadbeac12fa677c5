"""``segevo download``: fetch the enabled raw data sources and write the case table (DVC ``download``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from segevo_pipeline.common import config_from_args, preflight


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text,
        description="Download, verify and unpack the sources listed in data.sources into <data.root>/raw/, "
                    "then write the case table <data.root>/raw/cases.json. Interrupted downloads resume; a "
                    "source that finished is skipped on the next run unless its options changed.",
    )
    from segevo.data.sources import SOURCES

    p.add_argument("--source", metavar="NAME", nargs="+", action="extend",
                   help=f"only these enabled sources, of {', '.join(SOURCES)} (default: all of data.sources)")
    p.add_argument("--force", action="store_true",
                   help="redo finished sources: re-verify cached archives, unpack and check every case again")
    p.set_defaults(run=run)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("segevo: %(levelname)s: %(message)s"))
    root = logging.getLogger("segevo")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    from segevo.data.raw import download_sources

    cfg, source = config_from_args(args)
    preflight(args, folders=[("data.root", cfg.data.root)])
    _log_to_stderr()
    path, results, missing = download_sources(cfg.data, only=args.source, force=args.force)
    for r in results:
        modalities = Counter(c.modality for c in r.cases)
        kinds = ", ".join(f"{m} {n}" for m, n in sorted(modalities.items()))
        patients = len({c.patient_id for c in r.cases})
        state = "up to date" if r.cached else "fetched"
        skipped = f", {len(r.skipped)} skipped" if r.skipped else ""
        print(f"{r.name}: {len(r.cases)} cases ({kinds}) from {patients} patients{skipped} [{state}]")
        if r.meta.get("annotation") == "model":
            print(f"  labels: {r.meta.get('labels', 'model output, not manual annotation')}")
    total = sum(len(r.cases) for r in results)
    print(f"wrote {path} ({total} cases from {len(results)} source{'s' * (len(results) != 1)}; config {source})")
    if missing:
        print(f"not downloaded yet: {', '.join(missing)} (run 'segevo download')")
    return 0
