"""The fine-tuning recipe: one class, the loop in plain sight (after torchtune's single-device recipes).

``FineTune`` sets up one rank (cases, task vocabulary, model, loaders, DeepSpeed engine), restores and saves its
state, and runs the epochs: train, validate, save, report, stop when told or when validation stalls. Where it
runs is not its business: Ray Train's checkpoints and reports, MLflow logging, a tuning study's pruning verdicts
and the fault-injection test hook all come in through :class:`Hooks` (``pipeline/worker.py`` builds the Ray
ones), so the same recipe runs under Ray on a cluster or in a plain test process. The pieces it calls (engine,
loaders, one epoch, validation) live in :mod:`segevo.training`.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from segevo import training
from segevo.config import SegevoConfig
from segevo.data.dataset import task_vocabulary
from segevo.data.manifest import read_manifest
from segevo.io import atomic_write_json
from segevo.model.adapter_io import save_adapters

STATE_TAG = "state"  # the DeepSpeed tag of every saved state; the adapter checkpoint sits beside it


class Hooks(Protocol):
    """What the surroundings supply. Every method is called on every rank."""

    def resume(self) -> AbstractContextManager[Path | None]:
        """A folder holding the state to resume from (as :meth:`FineTune.save` wrote it), or None."""
        ...

    def before_epoch(self, epoch: int) -> None:
        """Called as an epoch starts (test hooks inject faults here)."""
        ...

    def epoch_end(self, metrics: dict[str, float], state: Path) -> None:
        """An epoch's metrics and its saved state (a temporary folder, gone after the call: copy or upload it)."""
        ...

    def should_stop(self, epoch: int) -> bool:
        """True to end training after ``epoch`` (a pruned trial); the same answer on every rank."""
        ...


class FineTune:
    """One rank of a fine-tuning run on the prepared data under ``root`` with the given split."""

    def __init__(self, cfg: SegevoConfig, root: Path, split: dict, rank: int = 0, world: int = 1):
        self.cfg, self.rank = cfg, rank
        cases, _ = read_manifest(root / "prep" / "manifest.json")
        by_key = {c.key: c for c in cases}
        train_keys = split["subsets"][cfg.train.subset] if cfg.train.subset else split["train"]
        train_cases = [by_key[k] for k in train_keys]
        val_cases = [by_key[k] for k in split["val"]] or train_cases  # tiny data sets: validate on training cases
        self.tasks = task_vocabulary(train_cases)
        self.device = training.device_for_worker()
        self.dtype = training.autocast_dtype(cfg, self.device)
        self.model = training.build_model(cfg, self.tasks, sorted({c.modality for c in train_cases})).to(self.device)
        self.loaders = training.make_loaders(cfg, root / "prep", train_cases, val_cases, self.tasks, rank, world)
        self.engine = training.make_engine(self.model, cfg, self.loaders.steps_per_epoch * cfg.train.epochs)
        self.progress = training.Progress()

    def restore(self, folder: Path) -> None:
        _, client = self.engine.load_checkpoint(str(folder), tag=STATE_TAG, load_module_strict=False)
        self.progress = training.Progress(**client["progress"])
        print(f"[rank {self.rank}] resumed after epoch {self.progress.epoch}", flush=True)

    def save(self, folder: Path) -> None:
        """Every rank's DeepSpeed shard; rank 0 adds the adapter checkpoint and the progress record."""
        self.engine.save_checkpoint(str(folder), tag=STATE_TAG, client_state={"progress": asdict(self.progress)},
                                    exclude_frozen_parameters=True)
        if self.rank == 0:
            save_adapters(self.model, folder / "adapters")
            atomic_write_json(folder / "progress.json", asdict(self.progress))

    def run(self, hooks: Hooks) -> training.Progress:
        cfg = self.cfg
        with hooks.resume() as folder:
            if folder is not None:
                self.restore(folder)
        for epoch in range(self.progress.epoch + 1, cfg.train.epochs):
            hooks.before_epoch(epoch)
            stats = training.train_epoch(self.engine, self.loaders, cfg, epoch, self.device, self.dtype)
            val = training.validate(self.model, self.loaders.val, cfg, self.device, self.dtype)
            self.progress.update(epoch, val["val_dice"])
            metrics: dict[str, Any] = {
                "epoch": epoch, "loss": stats.loss, **val, "samples_per_s": stats.samples_per_s,
                "epoch_s": stats.seconds, "lr": stats.lr, "peak_memory_gib": stats.peak_memory_gib,
                **{f"loss/{k}": v for k, v in stats.per_combination.items()}}
            self.progress.history.append(metrics)
            with tempfile.TemporaryDirectory() as d:
                self.save(Path(d))
                hooks.epoch_end(metrics, Path(d))
            if hooks.should_stop(epoch):
                print(f"[rank {self.rank}] pruned by the study after epoch {epoch}", flush=True)
                break
            if self.progress.should_stop(cfg.train.early_stopping_patience):
                print(f"[rank {self.rank}] early stop: no val_dice gain for {self.progress.stale_epochs} epochs",
                      flush=True)
                break
        return self.progress
