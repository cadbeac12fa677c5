"""``segevo model summary``: build the configured model and report its size per part (DVC ``model_summary``)."""

from __future__ import annotations

import argparse

from segevo_pipeline.common import config_from_args, preflight, print_part_table


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    actions = p.add_subparsers(dest="model_verb", metavar="ACTION", required=True)
    summary = actions.add_parser("summary", help="parameters per part of the model the config describes")
    summary.add_argument("--out", metavar="JSON", help="also write the summary as JSON (atomically)")
    summary.set_defaults(run=run_summary)


def run_summary(args: argparse.Namespace) -> int:
    from segevo.io import atomic_write_json
    from segevo.model import SegVol
    from segevo.model.adapted import AdaptedSegVol

    cfg, source = config_from_args(args)
    preflight(args, outputs=[("--out", args.out)])
    model = SegVol(cfg.model)
    counts = model.parameter_counts()
    adapted = AdaptedSegVol(model, cfg.adapters, cfg.priors)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    per_adapter = adapted.trainable_counts()
    m = cfg.model
    summary = {
        "config": source,
        "roi_size": list(m.roi_size),
        "patch_size": list(m.patch_size),
        "tokens": int(m.feat_shape[0] * m.feat_shape[1] * m.feat_shape[2]),
        "parameters": {**counts, "total": sum(counts.values())},
        "trainable_parameters": trainable,
        "trainable_per_expert": {k: v for k, v in per_adapter.items() if k != "priors"},
        "trainable_priors": per_adapter["priors"],
    }
    print(f"model from {source}: roi {tuple(m.roi_size)}, patch {tuple(m.patch_size)}, "
          f"{summary['tokens']} image tokens, width {m.embed_dim}")
    print_part_table(counts)
    a, p = cfg.adapters, cfg.priors
    print("trainable when fine-tuning (the base stays frozen):")
    rows = []
    for name, expert in a.experts.items():
        trained = expert.kind != "identity" and a.enabled
        label = f"{expert.kind} r{expert.rank} alpha {expert.alpha:g}" if trained else "identity"
        rows.append((f"expert {name}: {label}", per_adapter.get(name, 0)))
    if p.enabled:
        rows.append((f"priors: pool {p.pool_size}, dim {p.dim}, depth {p.depth}, {len(adapted.tasks)} tasks",
                     per_adapter["priors"]))
    rows.append(("total", trainable))
    width = max(len(label) for label, _ in rows) + 2
    for label, n in rows:
        print(f"  {label:<{width}}{n:>12,}")
    if args.out:
        atomic_write_json(args.out, summary)
        print(f"wrote {args.out}")
    return 0
