"""What a finished training run leaves in the workspace: the best epoch's adapter checkpoint in ``train.output``
(atomically), ``train.json`` and the curves in the metrics folder, artifacts in MLflow. Shared by ``segevo train``
and every trial of ``segevo tune``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from segevo_pipeline.common import csv_bytes, pyplot


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
    from segevo_pipeline.tracking import Tracker

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
