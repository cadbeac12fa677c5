"""How fine-tuning runs (``train``, its ``loss``) and where it is tracked (``tracking``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from segevo.combinations import ALL as COMBINATIONS
from segevo.combinations import parts
from segevo.config.base import _Section


class LossConfig(_Section):
    """The batched training loss: Dice + BCE per prompt combination, all in one decoder batch."""

    combinations: tuple[str, ...] = COMBINATIONS
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    pseudo_weight: float = Field(0.1, ge=0)
    pseudo_combinations: tuple[str, ...] = ("box", "point")

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        for name in (*self.combinations, *self.pseudo_combinations):
            parts(name)
        if any("text" in parts(name) for name in self.pseudo_combinations):
            raise ValueError("pseudo_combinations cannot use text: pseudo-mask regions have no class name")
        if not self.combinations:
            raise ValueError("combinations must not be empty")
        return self


class TrainConfig(_Section):
    """Fine-tuning: optimisation, scale (Ray Train workers), checkpoints and fault tolerance."""

    loss: LossConfig = LossConfig()
    run_id: str | None = None
    base_weights: str | None = None
    subset: str | None = None
    epochs: int = Field(10, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0)
    batch_size: int = Field(2, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: int = Field(2, ge=0, le=2)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_workers: int = Field(1, gt=0)
    use_gpu: bool | None = None
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    loader_workers: int = Field(1, ge=0)
    val_samples: int = Field(8, gt=0)
    early_stopping_patience: int = Field(5, ge=0)
    storage_path: str = "runs"
    max_failures: int = Field(2, ge=-1)
    keep_checkpoints: int = Field(2, gt=0)
    ray_address: str | None = None
    output: str = "models/adapter"
    metrics_dir: str = "metrics"
    # A random base is right for the offline demo and wrong everywhere else: refused unless said here.
    allow_random_base: bool = False
    # Seconds a run that asks for GPUs waits for the cluster (autoscaler) to have them, then fails.
    gpu_wait_s: float = Field(600.0, ge=0)
    # Prepared data staged onto every node's local disk from a DVC remote (instead of a shared data.root):
    # the version is the hash of data/prep and data/split.json in data_lock (a dvc.lock or .dvc file).
    data_remote: str | None = None
    data_lock: str = "dvc.lock"
    staging_dir: str = "/tmp/segevo/data"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_id):
            raise ValueError(f"run_id {self.run_id!r} may only hold letters, digits, '.', '_' and '-'")
        return self


class TrackingConfig(_Section):
    """MLflow: a local SQLite store by default, a server when ``tracking_uri`` (or MLFLOW_TRACKING_URI) says so."""

    tracking_uri: str | None = None
    experiment: str = "segevo"
    system_metrics: bool = True
