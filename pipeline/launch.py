"""The Ray side of a training run, shared by ``segevo train`` and ``segevo tune``: what is checked before a paid
second of training (weights, data, Ray, and on a multi-node cluster shared paths, the GPU choice and the
tracking server; data staged onto every node when asked), and the Ray Train run itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segevo_pipeline.common import preflight, prepared_data
from segevo_pipeline.ray_quiet import HOOK, install


def training_data(cfg) -> tuple[Path, dict]:
    """The data root and the split, checked before any Ray start-up is paid."""
    root, _, split = prepared_data(cfg)
    return root, split


def check_base_weights(cfg) -> None:
    """Real weights where real weights are meant: a random base only when the profile says so."""
    from segevo.errors import UserError
    from segevo.model.checkpoint import check_checkpoint_file

    if cfg.train.base_weights:
        if not os.path.isfile(cfg.train.base_weights):
            raise UserError(f"train.base_weights {cfg.train.base_weights}: no such file (download SegVol's weights "
                            f"with 'segevo weights download', or fix the path)")
        check_checkpoint_file(cfg.train.base_weights)
    elif not cfg.train.allow_random_base:
        raise UserError("train.base_weights is not set: training would start from a random SegVol; set it to the "
                        "released weights, or train.allow_random_base: true for a random base (the offline demo)")


def prepare(cfg, args: argparse.Namespace | None = None,
            writes: list | None = None) -> tuple[Path, dict, str, dict]:
    """Everything checked before a paid second of training, in the order it fails cheapest: the local data and
    outputs, the weights, Ray, then on a multi-node cluster shared paths, the GPU choice and the tracking server;
    GPUs waited for; data staged onto every node when ``train.data_remote`` says so. The data root, split,
    tracking URI and timings."""
    from segevo_pipeline.cluster import PathUse, check_cluster, wait_for_gpus
    from segevo_pipeline.tracking import resolve_uri

    t = cfg.train
    if t.data_remote is None:
        root, split = training_data(cfg)
        if args is not None:
            preflight(args, inputs=[("train.base_weights", t.base_weights),
                                    ("manifest", root / "prep" / "manifest.json"), ("split", root / "split.json")],
                      outputs=[("metrics file", Path(t.metrics_dir) / n)
                               for n in ("train.json", "train_curve.csv", "train_curve.png")],
                      replaced=[("train.output", t.output)], folders=[("train.metrics_dir", t.metrics_dir)])
    check_base_weights(cfg)
    tracking_uri = resolve_uri(cfg.tracking.tracking_uri, Path.cwd())
    timings = {"ray_init_s": round(ensure_ray(cfg), 2)}
    writes = [PathUse("train.storage_path", t.storage_path, True),
              PathUse("train.output", str(Path(t.output).parent), True),
              PathUse("train.metrics_dir", t.metrics_dir, True), *(writes or [])]
    reads = [PathUse("train.base_weights", t.base_weights, False)] if t.base_weights else []
    if t.data_remote is None:
        reads.append(PathUse("data.root", cfg.data.root, False))
    check_cluster(cfg, writes, reads, tracking_uri)
    if t.use_gpu:
        gpus = float(dict(t.resources_per_worker).get("GPU", 1))
        wait_for_gpus(gpus * t.num_workers, t.gpu_wait_s)
    if t.data_remote is not None:
        root, split, timings["staging_s"] = _staged_data(cfg)
    return root.resolve(), split, tracking_uri, timings


def _staged_data(cfg) -> tuple[Path, dict, dict]:
    from segevo_pipeline.staging import data_version, stage_on_every_node

    t = cfg.train
    version = data_version(Path(t.data_lock))
    folder, seconds = stage_on_every_node(t.data_remote, version, t.staging_dir)
    print(f"staged data {version['prep'][:12]} from {t.data_remote} to {folder} on {len(seconds)} nodes "
          f"(seconds per node: {seconds})", flush=True)
    staged = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": folder})})
    root, split = training_data(staged)
    return root, split, seconds


@contextmanager
def ends_run_on_failure(cfg, run_id: str, tracking_uri: str) -> Iterator[None]:
    """A run whose driver fails or is stopped (Ctrl-C, ``ray job stop``'s SIGTERM) ends FAILED or KILLED in
    MLflow, not RUNNING forever."""
    from segevo_pipeline.tracking import end_run

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except BaseException as err:
        end_run(tracking_uri, cfg.tracking.experiment, run_id, "KILLED" if isinstance(err, KeyboardInterrupt)
                else "FAILED")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def storage_uri(cfg) -> str:
    """``train.storage_path`` as Ray wants it: a cloud URI as is, a local folder absolute."""
    storage = cfg.train.storage_path
    return storage if "://" in storage else str(Path(storage).resolve())


def ensure_ray(cfg) -> float:
    """Join ``train.ray_address``/``RAY_ADDRESS`` or start a local Ray, once per process; the seconds it took."""
    import ray

    start = time.perf_counter()
    install()
    if not ray.is_initialized():
        address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on loopback
            ray.init(include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": _worker_env(), "worker_process_setup_hook": HOOK})
    return time.perf_counter() - start


def launch(cfg, root: Path, split: dict, run_id: str, storage: str, tracking_uri: str,
           relay: Any = None) -> tuple[Any, dict]:
    """One Ray Train run. With a ``relay`` (``segevo tune``) every epoch's report goes to the driver, and the
    workers wait for its verdict before the next epoch, so a pruned trial stops at the epoch it was pruned."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from segevo_pipeline.worker import train_worker

    t = cfg.train
    ensure_ray(cfg)
    callbacks = []
    if relay is not None:
        from segevo_pipeline.report_relay import ForwardReports

        callbacks.append(ForwardReports(relay))
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(t.resources_per_worker) or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})
    trainer = TorchTrainer(
        train_worker,
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
    return result, {"fit_s": round(time.perf_counter() - fit_start, 2), "use_gpu": use_gpu,
                    "num_workers": t.num_workers}


def _worker_env() -> dict[str, str]:
    keep = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "MPLCONFIGDIR", "DS_ACCELERATOR")
    return {k: os.environ[k] for k in keep if k in os.environ}


