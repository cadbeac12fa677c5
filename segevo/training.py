"""The pieces of fine-tuning that :class:`segevo.recipe.FineTune` puts together: the model to train, the DeepSpeed
engine, the loaders, one training epoch and validation.

Nothing here knows about Ray, MLflow or DVC (the recipe gets those through its hooks). DeepSpeed wraps the
trainable parameters (LoRA experts, priors) with ZeRO from the config; the frozen base stays in fp32 and bf16
runs under autocast, so the same code trains on a CPU (fp32, gloo) and on GPUs (bf16, NCCL).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from segevo.config import LoaderConfig, SegevoConfig
from segevo.data.batch import TrainBatch
from segevo.data.dataset import TrainDataset, collate
from segevo.data.manifest import PrepCase
from segevo.data.sampler import EpochSampler
from segevo.data.tasks import TaskVocabulary
from segevo.losses import combination_loss
from segevo.model.adapted import AdaptedSegVol
from segevo.model.checkpoint import load_checkpoint
from segevo.model.segvol import Prompts, SegVol
from segevo.optim import GroupedAdamW


def autocast_dtype(cfg: SegevoConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU, fp32 on CPU, unless the config says otherwise."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_model(cfg: SegevoConfig, tasks: TaskVocabulary, modalities: Sequence[str] = ()) -> AdaptedSegVol:
    """The model to fine-tune, seeded so every rank starts from the same weights; without ``base_weights`` the
    base is that seed's random init, recorded in the adapter checkpoint so evaluation can rebuild it.
    ``modalities`` (the training cases' modality names) join ``priors.modalities``, so each gets its own
    modality prior pool; the adapter checkpoint's priors config records them."""
    torch.manual_seed(cfg.loader.seed)
    base = SegVol(cfg.model)
    if cfg.train.base_weights:
        load_checkpoint(base, cfg.train.base_weights)
    priors = cfg.priors.model_copy(update={"modalities": list(dict.fromkeys([*cfg.priors.modalities, *modalities]))})
    model = AdaptedSegVol(base, cfg.adapters, priors, tasks)
    model.base_origin = {"weights": cfg.train.base_weights,
                         "seed": None if cfg.train.base_weights else cfg.loader.seed}
    return model


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_engine(model: AdaptedSegVol, cfg: SegevoConfig, total_steps: int) -> Any:
    """A DeepSpeed engine over the trainable parameters (ZeRO stage, clipping and schedule from the config), one
    optimizer group per LoRA expert and one for the priors, so that a step can leave idle groups untouched."""
    import deepspeed

    t = cfg.train
    groups = model.parameter_groups()
    grouped = {id(p) for params in groups.values() for p in params}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise RuntimeError(f"trainable parameters outside every optimizer group: {', '.join(stray[:5])}")
    optimizer = GroupedAdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    warmup = max(1, int(t.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total_steps, warmup=warmup, min_ratio=t.min_lr_ratio))
    ds_config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine


@dataclass
class Loaders:
    train: DataLoader
    val: list[dict]
    steps_per_epoch: int


def make_loaders(cfg: SegevoConfig, root: Path, train_cases: list[PrepCase], val_cases: list[PrepCase],
                 tasks: TaskVocabulary, rank: int, world: int) -> Loaders:
    t = cfg.train
    ds = TrainDataset(root, train_cases, cfg.model.roi_size, cfg.loader, tasks)
    sampler = EpochSampler(len(ds), rank, world)
    loader = DataLoader(ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.loader_workers,
                        collate_fn=collate, pin_memory=torch.cuda.is_available(),
                        persistent_workers=t.loader_workers > 0)
    steps = t.steps_per_epoch or max(1, len(ds) // (t.batch_size * world))
    return Loaders(loader, validation_samples(cfg, root, val_cases, tasks, rank, world), steps)


def validation_samples(cfg: SegevoConfig, root: Path, val_cases: list[PrepCase], tasks: TaskVocabulary,
                       rank: int = 0, world: int = 1) -> list[dict]:
    """Rank ``rank``'s share of the fixed validation samples (no augmentation, the same every epoch)."""
    val_cfg: LoaderConfig = cfg.loader.model_copy(update={
        "flip_probability": 0.0, "intensity_probability": 0.0, "box_jitter": 0.0, "pseudo": False,
        "samples_per_epoch": cfg.train.val_samples, "seed": cfg.loader.seed + 1})
    val_ds = TrainDataset(root, val_cases, cfg.model.roi_size, val_cfg, tasks)
    return [val_ds[i] for i in range(rank, cfg.train.val_samples, world)]


def epoch_batches(loaders: Loaders, epoch: int) -> Iterator[TrainBatch]:
    """The training batches of one epoch of this rank (the epoch travels with each index, into every loader
    worker, so persistent workers draw fresh samples)."""
    loaders.train.sampler.set_epoch(epoch)
    return iter(loaders.train)


@dataclass
class EpochStats:
    loss: float
    per_combination: dict[str, float]
    samples_per_s: float
    seconds: float
    lr: float
    peak_memory_gib: float
    steps: int


def train_epoch(engine: Any, loaders: Loaders, cfg: SegevoConfig, epoch: int, device: torch.device,
                dtype: torch.dtype | None, log: Callable[[int, dict[str, float]], None] | None = None) -> EpochStats:
    """One epoch. Losses stay on the device and are read once at the end; the one host sync per step is the tiny
    all-reduce of which optimizer groups the step uses (``idle_groups``), needed before ``engine.step``."""
    model: AdaptedSegVol = engine.module
    optimizer: GroupedAdamW = engine.client_optimizer
    names = [g["name"] for g in optimizer.param_groups]
    engine.train()
    sums: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=device)
    n = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    batches = epoch_batches(loaders, epoch)
    for step in range(loaders.steps_per_epoch):
        try:
            batch: TrainBatch = next(batches)
        except StopIteration:
            break
        batch = batch.to(device)
        optimizer.set_idle(idle_groups(model, batch.modalities, names, device))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = combination_loss(model, batch, cfg.train.loss)
        engine.backward(out.total)
        engine.step()
        total += out.total.detach()
        for k, v in {**out.per_combination, **out.auxiliary}.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v
        n += 1
        if log is not None and (step + 1) % 10 == 0:
            log(step, {"loss": float(out.total)})
    seconds = time.perf_counter() - start
    world = dist.get_world_size() if dist.is_initialized() else 1
    samples = n * cfg.train.batch_size * world
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _rss_gib()
    return EpochStats(
        loss=float(total) / max(n, 1), per_combination={k: float(v) / max(n, 1) for k, v in sums.items()},
        samples_per_s=samples / seconds if seconds else 0.0, seconds=seconds,
        lr=engine.get_lr()[0], peak_memory_gib=round(peak, 3), steps=n,
    )


def idle_groups(model: AdaptedSegVol, modalities: list[str], names: list[str], device: torch.device) -> set[str]:
    """The optimizer groups no row of this step trains, on any rank (a group used on one rank is used by all:
    its averaged gradient is real)."""
    used = model.groups_used(modalities)
    flags = torch.tensor([float(n in used) for n in names], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return {n for n, f in zip(names, flags.tolist(), strict=True) if not f}


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def validate(model: AdaptedSegVol, samples: list[dict], cfg: SegevoConfig, device: torch.device,
             dtype: torch.dtype | None) -> dict[str, float]:
    """Dice at threshold 0.5 per prompt combination on fixed samples, averaged over all ranks."""
    model.eval()
    combos = list(cfg.train.loss.combinations)
    sums = torch.zeros(len(combos), device=device)
    count = torch.zeros((), device=device)
    for i in range(0, len(samples), cfg.train.batch_size):
        batch = collate(samples[i : i + cfg.train.batch_size]).to(device)
        prompts = Prompts(batch.class_names, batch.boxes, (batch.point_coords, batch.point_labels))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model.forward_requests(batch.image, batch.modalities, [(c, prompts) for c in combos],
                                            batch.task_ids)
        pred = (logits.float() > 0).flatten(2)
        target = batch.target.flatten(1).unsqueeze(0)
        valid = target >= 0
        tp = (pred & (target == 1) & valid).sum(-1)
        dice = 2 * tp / ((pred & valid).sum(-1) + (target == 1).sum(-1)).clamp(min=1)
        sums += dice.float().sum(1)
        count += batch.image.shape[0]
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(count)
    model.train()
    per = {c: float(v) for c, v in zip(combos, (sums / count.clamp(min=1)).tolist(), strict=True)}
    return {"val_dice": sum(per.values()) / len(per), **{f"val_dice/{c}": v for c, v in per.items()}}


@dataclass
class Progress:
    """What a checkpoint carries besides the weights: where training stands."""

    epoch: int = -1
    best_dice: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, epoch: int, dice: float) -> bool:
        """Record an epoch; True when it is the best so far."""
        self.epoch = epoch
        if dice > self.best_dice:
            self.best_dice, self.best_epoch, self.stale_epochs = dice, epoch, 0
            return True
        self.stale_epochs += 1
        return False

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.stale_epochs >= patience


def device_for_worker() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
