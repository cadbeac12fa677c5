"""``segevo split``: leak-free train/val/test and balanced subsets from the manifest -> ``split.json``, with what
the rules moved and why (see ``segevo.data.split``)."""

from __future__ import annotations

import argparse
import io
from collections import Counter
from pathlib import Path

from segevo_pipeline.common import config_from_args, preflight


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--manifest", help="default: <data.root>/prep/manifest.json")
    p.add_argument("--out", help="default: <data.root>/split.json")
    p.add_argument("--summary", default="metrics/data_summary",
                   help="data summary path without suffix: .csv (table), .json (per split counts), .png (plot)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from segevo.data.manifest import read_manifest
    from segevo.data.split import SplitCase, round_robin_subset, split_cases
    from segevo.io import atomic_write_json

    cfg, _ = config_from_args(args)
    root = Path(cfg.data.root)
    manifest = Path(args.manifest) if args.manifest else root / "prep" / "manifest.json"
    out = Path(args.out) if args.out else root / "split.json"
    summary_base = Path(args.summary)
    tables = [("--summary", summary_base.with_suffix(x)) for x in (".csv", ".json", ".png")]
    preflight(args, outputs=[("--out", out), *tables], inputs=[("--manifest", manifest)])
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
    write_summary(summary_base, cases, splits)
    return 0


def write_summary(base: Path, cases: list, splits: dict[str, list[str]]) -> None:
    """The nnU-Net-style data summary (``segevo.data.summary``) as a table, per-split counts and a plot."""
    from segevo.data.summary import COLUMNS, data_summary
    from segevo.io import atomic_write_bytes, atomic_write_json
    from segevo_pipeline.common import csv_bytes

    rows = data_summary(cases, splits)
    atomic_write_bytes(base.with_suffix(".csv"), csv_bytes(rows, list(COLUMNS)))
    by_key = {c.key: c for c in cases}
    counts = {split: {"cases": len(keys), **dict(sorted(Counter(
        f"{by_key[k].source}/{by_key[k].modality}" for k in keys).items()))} for split, keys in splits.items()}
    atomic_write_json(base.with_suffix(".json"), counts)
    _plot(base.with_suffix(".png"), rows, counts)
    print(f"wrote {base.with_suffix('.csv')}, .json and .png ({len(rows)} rows)")


def _plot(path: Path, rows: list[dict], counts: dict[str, dict[str, int]]) -> None:
    """Cases per source/modality and split (left); each class's raw intensity range p0.5-p99.5 with its mean
    (right, all cases)."""
    from segevo.io import atomic_write_bytes
    from segevo_pipeline.common import pyplot

    plt = pyplot()
    groups = sorted({g for c in counts.values() for g in c if g != "cases"})
    every = [r for r in rows if r["split"] == "all"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(3.0, 0.3 * max(len(every), len(groups)) + 1.5)))
    height = 0.8 / max(len(counts), 1)
    for i, (split, c) in enumerate(counts.items()):
        left.barh([j + i * height for j in range(len(groups))], [c.get(g, 0) for g in groups], height,
                  label=split)
    left.set_yticks([j + 0.4 - height / 2 for j in range(len(groups))], groups)
    left.set_xlabel("cases")
    left.legend()
    labels = [f"{r['source']}/{r['modality']}: {r['class']}" for r in every]
    for j, r in enumerate(every):
        right.plot([r["p00_5"], r["p99_5"]], [j, j], color="tab:blue")
        right.plot([r["mean"]], [j], "o", color="tab:orange", markersize=3)
    right.set_yticks(range(len(every)), labels, fontsize=7)
    right.set_xlabel("raw intensity (p0.5 to p99.5, dot: mean)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
