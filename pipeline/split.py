"""``segevo split``: leak-free train/val/test and balanced subsets from the manifest -> ``split.json``, with what
the rules moved and why (see ``segevo.data.split``)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from pipeline.common import config_from_args


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--manifest", help="default: <data.root>/prep/manifest.json")
    p.add_argument("--out", help="default: <data.root>/split.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from segevo.data.manifest import read_manifest
    from segevo.data.split import SplitCase, round_robin_subset, split_cases
    from segevo.io import atomic_write_json

    cfg, _ = config_from_args(args)
    root = Path(cfg.data.root)
    manifest = Path(args.manifest) if args.manifest else root / "prep" / "manifest.json"
    out = Path(args.out) if args.out else root / "split.json"
    cases, _ = read_manifest(manifest)
    s = cfg.split
    result = split_cases([SplitCase(c.key, c.source, c.patient_id, c.subset, c.segvol_seen, c.raw_sha256)
                          for c in cases], s.val_fraction, s.test_fraction, s.seed, official=s.official,
                         segvol_seen=s.segvol_seen)
    splits = result.splits
    subsets = {str(n): round_robin_subset(splits["train"], n, s.seed) for n in s.subsets}
    by_key = {c.key: c for c in cases}
    summary = {name: dict(Counter(f"{by_key[k].source}/{by_key[k].modality}" for k in keys))
               for name, keys in splits.items()}
    rules = {"official": s.official, "segvol_seen": s.segvol_seen}
    atomic_write_json(out, {"seed": s.seed, "fractions": {"val": s.val_fraction, "test": s.test_fraction},
                            **splits, "subsets": subsets, "summary": summary, "rules": rules,
                            "moved": result.moves, "moved_by_rule": result.reasons(),
                            "cross_source_groups": result.groups})
    for name, keys in splits.items():
        detail = ", ".join(f"{k} {v}" for k, v in sorted(summary[name].items()))
        print(f"{name:<5} {len(keys):>5} cases ({detail})")
    for n, keys in subsets.items():
        print(f"subset {n}: {len(keys)} cases")
    if result.groups:
        print(f"{len(result.groups)} patients or scans found in several sources: each kept on one side")
    for move in result.moves:
        away = f" instead of {move['from']}" if move["from"] else ""
        print(f"moved {', '.join(move['cases'])} -> {move['to']}{away} [{move['rule']}]: {move['why']}")
    print(f"wrote {out}")
    return 0
