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
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.common import config_from_args, csv_bytes, preflight, prepared_data, pyplot
from pipeline.flags import int_at_least, run_name

METRICS = Path("metrics")


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


def training_data(cfg) -> tuple[Path, dict]:
    """The data root and the split, checked before any Ray start-up is paid."""
    root, _, split = prepared_data(cfg)
    return root, split


def run(args: argparse.Namespace) -> int:
    from segevo.config import parse_config
    from segevo.model.checkpoint import check_checkpoint_file

    cfg, source = config_from_args(args)
    train = {**cfg.train.model_dump(), **_overrides(args)}
    cfg = parse_config({**cfg.model_dump(), "train": train}, f"{source} with the command line")
    root, split = training_data(cfg)
    if cfg.train.base_weights:
        check_checkpoint_file(cfg.train.base_weights)
    preflight(args, inputs=[("train.base_weights", cfg.train.base_weights),
                            ("manifest", root / "prep" / "manifest.json"), ("split", root / "split.json")],
              outputs=[("metrics file", METRICS / n) for n in ("train.json", "train_curve.csv", "train_curve.png")],
              replaced=[("train.output", cfg.train.output)], folders=[("metrics folder", METRICS)])
    run_id = cfg.train.run_id or time.strftime("run-%Y%m%d-%H%M%S")
    storage = storage_uri(cfg)
    from pipeline.tracking import resolve_uri

    tracking_uri = resolve_uri(cfg.tracking.tracking_uri, Path.cwd())
    result, timings = launch(cfg, root.resolve(), split, run_id, storage, tracking_uri)
    export(cfg, result, run_id, tracking_uri, timings)
    return 0


def storage_uri(cfg) -> str:
    """``train.storage_path`` as Ray wants it: a cloud URI as is, a local folder absolute."""
    storage = cfg.train.storage_path
    return storage if "://" in storage else str(Path(storage).resolve())


def ensure_ray(cfg) -> float:
    """Join ``train.ray_address``/``RAY_ADDRESS`` or start a local Ray, once per process; the seconds it took."""
    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on loopback
            ray.init(include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": _worker_env()})
    return time.perf_counter() - start


def launch(cfg, root: Path, split: dict, run_id: str, storage: str, tracking_uri: str,
           relay: Any = None) -> tuple[Any, dict]:
    """One Ray Train run. With a ``relay`` (``segevo tune``) every epoch's report goes to the driver, and the
    workers wait for its verdict before the next epoch, so a pruned trial stops at the epoch it was pruned."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    ray_init_s = ensure_ray(cfg)
    callbacks = []
    if relay is not None:
        from pipeline.report_relay import ForwardReports

        callbacks.append(ForwardReports(relay))
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(t.resources_per_worker) or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "root": str(root), "split": split,
                           "run_id": run_id, "tracking_uri": tracking_uri, "relay": relay,
                           "fault": os.environ.get("SEGEVO_FAULT_INJECT")},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_id, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val_dice",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
        ),
    )
    fit_start = time.perf_counter()
    result = trainer.fit()
    return result, {"ray_init_s": round(ray_init_s, 2), "fit_s": round(time.perf_counter() - fit_start, 2),
                    "use_gpu": use_gpu, "num_workers": t.num_workers}


def _worker_env() -> dict[str, str]:
    keep = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "MPLCONFIGDIR", "DS_ACCELERATOR")
    return {k: os.environ[k] for k in keep if k in os.environ}


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
    from segevo.io import atomic_write_json
    from segevo.model.adapter_io import save_adapters

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

    tracker = None
    if rank == 0:
        from pipeline.tracking import Tracker

        tracker = Tracker(config["tracking_uri"], cfg.tracking.experiment, config["run_id"],
                          params=config["cfg"], system_metrics=cfg.tracking.system_metrics)
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
    if tracker is not None:
        tracker.close()


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


def export(cfg, result: Any, run_id: str, tracking_uri: str, timings: dict, metrics_dir: Path = METRICS) -> dict:
    """Best adapter checkpoint into ``train.output`` (atomically), the summary and curves into ``metrics_dir``
    (DVC's ``metrics/``; a tuning trial's own folder), artifacts to MLflow. Returns the summary."""
    import json

    from segevo.io import atomic_write_json

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
