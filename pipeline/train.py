"""``segevo train``: fine-tune with Ray Train (one worker per GPU or CPU slot) + DeepSpeed, tracked in MLflow.

With no address a local Ray starts inside the command; with ``--address``/``RAY_ADDRESS`` it joins a cluster.
Each epoch every rank saves its DeepSpeed shard and reports it to Ray; ``FailureConfig`` restarts failed
workers from the last checkpoint, and relaunching with the same ``run_id`` and ``storage_path`` resumes a
crashed run. At the end the best epoch's adapter checkpoint (a few MB) is exported into the workspace for
DVC, with ``metrics/train.json`` and the training curves; the big checkpoints stay on ``storage_path``.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from segevo_pipeline.common import config_from_args
from segevo_pipeline.flags import int_at_least, run_name
from segevo_pipeline.launch import ends_run_on_failure, launch, prepare, storage_uri
from segevo_pipeline.results import export


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--num-workers", type=int_at_least(1), help="Ray Train workers (default: train.num_workers)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True, default=None)
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_const", const=False)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--run-id", type=run_name, help="names the Ray run and the MLflow run; reuse it to resume")
    p.add_argument("--storage-path", help="where Ray keeps checkpoints (shared storage on a cluster)")
    p.add_argument("--epochs", type=int_at_least(1))
    p.add_argument("--steps-per-epoch", type=int_at_least(1))
    p.set_defaults(run=run)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = {"num_workers": args.num_workers, "use_gpu": args.use_gpu, "ray_address": args.address,
            "run_id": args.run_id, "storage_path": args.storage_path, "epochs": args.epochs,
            "steps_per_epoch": args.steps_per_epoch}
    return {k: v for k, v in keys.items() if v is not None}


def _run_prefix(args: argparse.Namespace) -> str:
    """``run``, or the variant's name as a run name allows it (``moa+priors`` -> ``moa-priors``)."""
    variant = getattr(args, "variant", None)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(variant).stem) if variant else "run"


def run(args: argparse.Namespace) -> int:
    from segevo.config import parse_config

    cfg, source = config_from_args(args)
    train = {**cfg.train.model_dump(), **_overrides(args)}
    cfg = parse_config({**cfg.model_dump(), "train": train}, f"{source} with the command line")
    run_id = cfg.train.run_id or time.strftime(f"{_run_prefix(args)}-%Y%m%d-%H%M%S")
    root, split, tracking_uri, timings = prepare(cfg, args)
    with ends_run_on_failure(cfg, run_id, tracking_uri):
        result, fit = launch(cfg, root, split, run_id, storage_uri(cfg), tracking_uri)
        export(cfg, result, run_id, tracking_uri, {**timings, **fit})
    return 0
