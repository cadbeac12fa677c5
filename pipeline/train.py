"""``segevo train``: fine-tune with Ray Train (one worker per GPU or CPU slot) + DeepSpeed, tracked in MLflow.

With no address a local Ray starts inside the command; with ``--address``/``RAY_ADDRESS`` it joins a cluster.
Each epoch every rank saves its DeepSpeed shard and reports it to Ray; ``FailureConfig`` restarts failed
workers from the last checkpoint, and relaunching with the same ``run_id`` and ``storage_path`` resumes a
crashed run. At the end the best epoch's adapter checkpoint (a few MB) is exported into the workspace for
DVC, with ``metrics/train.json`` and the training curves; the big checkpoints stay on ``storage_path``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.common import config_from_args, csv_bytes, pyplot
from pipeline.flags import int_at_least, run_name
from pipeline.launch import ends_run_on_failure, launch, prepare, storage_uri


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


def _worker(config: dict) -> None:
    """One Ray Train worker: data, model, DeepSpeed engine, resume, epochs, checkpoints, metrics."""
    import ray.train
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from segevo import training
    from segevo.config import SegevoConfig
    from segevo.data.dataset import task_vocabulary
    from segevo.data.manifest import read_manifest

    cfg = SegevoConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    root = Path(config["root"])
    cases, _ = read_manifest(root / "prep" / "manifest.json")
    by_key = {c.key: c for c in cases}
    split = config["split"]
    train_keys = split["subsets"][cfg.train.subset] if cfg.train.subset else split["train"]
    train_cases = [by_key[k] for k in train_keys]
    val_cases = [by_key[k] for k in split["val"]] or train_cases  # tiny data sets: validate on training cases
    tasks = task_vocabulary(train_cases)
    device = training.device_for_worker()
    dtype = training.autocast_dtype(cfg, device)
    model = training.build_model(cfg, tasks).to(device)
    loaders = training.make_loaders(cfg, root / "prep", train_cases, val_cases, tasks, rank, world)
    engine = training.make_engine(model, cfg, loaders.steps_per_epoch * cfg.train.epochs)

    progress = training.Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state", load_module_strict=False)
        progress = training.Progress(**client["progress"])
        print(f"[rank {rank}] resumed after epoch {progress.epoch}")

    node = ray.util.get_node_ip_address()
    print(f"[rank {rank}] on node {node}", flush=True)
    tracker, node_metrics = _tracking(config, cfg, ctx, node)
    try:
        _epochs(config, cfg, engine, loaders, model, progress, tracker, device, dtype, rank, world)
    except BaseException:
        if tracker is not None:
            tracker.close("FAILED")  # a restarted worker group continues the run (RUNNING again)
        raise
    finally:
        if node_metrics is not None:
            node_metrics.close()
    if tracker is not None:
        tracker.close()


def _tracking(config: dict, cfg, ctx: Any, node: str) -> tuple[Any, Any]:
    """Rank 0 logs the run; the first rank of every other node attaches that node's system metrics to it."""
    import torch.distributed as dist

    from pipeline.tracking import NodeMetrics, Tracker

    tracker = None
    if ctx.get_world_rank() == 0:
        tracker = Tracker(config["tracking_uri"], cfg.tracking.experiment, config["run_id"], params=config["cfg"],
                          system_metrics=cfg.tracking.system_metrics, node_id=node)
    if not (cfg.tracking.system_metrics and dist.is_initialized() and dist.get_world_size() > 1):
        return tracker, None
    shared = [tracker.run_id if tracker is not None else None]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is None or ctx.get_local_rank() != 0 or ctx.get_node_rank() == 0:
        return tracker, None
    return tracker, NodeMetrics(config["tracking_uri"], shared[0], node)


def _epochs(config: dict, cfg, engine: Any, loaders: Any, model: Any, progress: Any, tracker: Any,
            device: Any, dtype: Any, rank: int, world: int) -> None:
    import ray.train

    from segevo import training
    from segevo.io import atomic_write_json
    from segevo.model.adapter_io import save_adapters

    for epoch in range(progress.epoch + 1, cfg.train.epochs):
        _maybe_inject_fault(config.get("fault"), epoch, rank, world)
        stats = training.train_epoch(engine, loaders, cfg, epoch, device, dtype)
        val = training.validate(model, loaders.val, cfg, device, dtype)
        progress.update(epoch, val["val_dice"])
        metrics = {"epoch": epoch, "loss": stats.loss, **val, "samples_per_s": stats.samples_per_s,
                   "epoch_s": stats.seconds, "lr": stats.lr, "peak_memory_gib": stats.peak_memory_gib,
                   **{f"loss/{k}": v for k, v in stats.per_combination.items()}}
        progress.history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="state", client_state={"progress": asdict(progress)},
                                   exclude_frozen_parameters=True)
            if rank == 0:
                save_adapters(model, Path(d) / "adapters")
                atomic_write_json(Path(d) / "progress.json", asdict(progress))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if tracker is not None:
            tracker.log_metrics(metrics, step=epoch)
        if _stop_requested(config.get("relay"), epoch, rank):
            print(f"[rank {rank}] pruned by the study after epoch {epoch}")
            break
        if progress.should_stop(cfg.train.early_stopping_patience):
            print(f"[rank {rank}] early stop: no val_dice gain for {progress.stale_epochs} epochs")
            break


def _stop_requested(relay: Any, epoch: int, rank: int) -> bool:
    """Tuning only: rank 0 waits for the driver's verdict on this epoch and every rank gets the same answer."""
    if relay is None:
        return False
    import ray
    import torch
    import torch.distributed as dist

    verdict = int(ray.get(relay.verdict.remote(epoch))) if rank == 0 else 0
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(verdict)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    stop = torch.tensor([verdict], dtype=torch.int32, device=device)
    dist.broadcast(stop, src=0)
    return bool(stop.item())


def _maybe_inject_fault(spec: str | None, epoch: int, rank: int, world: int) -> None:
    """Test hook ``SEGEVO_FAULT_INJECT=<marker file>:<epoch>``: the last rank dies once, as the epoch after
    ``<epoch>`` starts (a few seconds later, so the controller has registered the previous checkpoint)."""
    if not spec:
        return
    marker, _, at = spec.rpartition(":")
    if epoch == int(at) + 1 and rank == world - 1 and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} after epoch {at}\n")
        time.sleep(5)
        os._exit(1)


def export(cfg, result: Any, run_id: str, tracking_uri: str, timings: dict,
           metrics_dir: Path | None = None) -> dict:
    """Best adapter checkpoint into ``train.output`` (atomically), the summary and curves into ``metrics_dir``
    (DVC's ``metrics/``; a tuning trial's own folder), artifacts to MLflow. Returns the summary."""
    import json

    from segevo.io import atomic_write_json

    metrics_dir = Path(cfg.train.metrics_dir) if metrics_dir is None else metrics_dir
    if result.error is not None:
        raise RuntimeError(f"training run {run_id} failed: {result.error}")
    best = result.get_best_checkpoint(metric="val_dice", mode="max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {run_id} reported no checkpoint")
    out = Path(cfg.train.output)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with best.as_directory() as d:
        shutil.copytree(Path(d) / "adapters", tmp)
        trainable = json.loads((Path(d) / "adapters" / "adapters.json").read_text())["trainable"]
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    latest = result.checkpoint or best
    with latest.as_directory() as d:  # our own history: Ray's dataframe forgets epochs before a restart
        rows = json.loads((Path(d) / "progress.json").read_text())["history"]
    final = rows[-1] if rows else {}
    best_row = max(rows, key=lambda r: r.get("val_dice", -1)) if rows else {}
    summary = {
        "run_id": run_id, "epochs_run": len(rows), "best_epoch": best_row.get("epoch"),
        "best_val_dice": best_row.get("val_dice"), "final_loss": final.get("loss"),
        "samples_per_s": final.get("samples_per_s"), "epoch_s": final.get("epoch_s"),
        "peak_memory_gib": final.get("peak_memory_gib"), "trainable": trainable,
        "checkpoint": best.path, **timings,
    }
    metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_dir / "train.json", summary)
    _curves(rows, metrics_dir)
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, cfg.tracking.experiment, run_id)
    tracker.log_artifacts(out, "adapter")
    tracker.log_artifacts(metrics_dir / "train_curve.png")
    tracker.close()
    print(f"run {run_id}: best val_dice {summary['best_val_dice']} at epoch {summary['best_epoch']}; "
          f"adapter -> {out}; checkpoints on {best.path}")
    return summary


def _curves(rows: list[dict], metrics_dir: Path) -> None:
    """``train_curve.csv`` (DVC plots) and a PNG of it (DVC's HTML needs a CDN offline)."""
    import io

    from segevo.io import atomic_write_bytes

    plt = pyplot()
    atomic_write_bytes(metrics_dir / "train_curve.csv",
                       csv_bytes(rows, ["epoch", "loss", "val_dice", "lr", "samples_per_s"]))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [r["epoch"] for r in rows]
    ax[0].plot(epochs, [r["loss"] for r in rows], marker="o")
    ax[0].set(title="training loss", xlabel="epoch")
    ax[1].plot(epochs, [r["val_dice"] for r in rows], marker="o", color="tab:green")
    ax[1].set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    atomic_write_bytes(metrics_dir / "train_curve.png", png.getvalue())
