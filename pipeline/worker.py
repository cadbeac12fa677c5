"""The Ray Train worker: the fine-tuning recipe (:class:`segevo.recipe.FineTune`) with Ray and MLflow plugged in.

Ray Train calls :func:`train_worker` once per rank. :class:`RayHooks` restores from Ray's last checkpoint,
reports every epoch's metrics with its saved state as a Ray checkpoint, logs them to MLflow from rank 0, relays a
tuning study's pruning verdict to every rank, and carries the fault-injection test hook.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def train_worker(config: dict) -> None:
    """One Ray Train worker: the recipe, tracked (``config`` is the launcher's ``train_loop_config``)."""
    import ray.train
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from segevo.config import SegevoConfig
    from segevo.recipe import FineTune

    cfg = SegevoConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    recipe = FineTune(cfg, Path(config["root"]), config["split"], rank, world)
    node = ray.util.get_node_ip_address()
    print(f"[rank {rank}] on node {node}", flush=True)
    tracker, node_metrics = _tracking(config, cfg, ctx, node)
    try:
        recipe.run(RayHooks(tracker, config.get("relay"), config.get("fault"), rank, world))
    except BaseException:
        if tracker is not None:
            tracker.close("FAILED")  # a restarted worker group continues the run (RUNNING again)
        raise
    finally:
        if node_metrics is not None:
            node_metrics.close()
    if tracker is not None:
        tracker.close()


class RayHooks:
    """The recipe's surroundings under Ray Train (see :class:`segevo.recipe.Hooks`)."""

    def __init__(self, tracker: Any, relay: Any, fault: str | None, rank: int, world: int):
        self.tracker, self.relay, self.fault, self.rank, self.world = tracker, relay, fault, rank, world

    @contextmanager
    def resume(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def before_epoch(self, epoch: int) -> None:
        _maybe_inject_fault(self.fault, epoch, self.rank, self.world)

    def epoch_end(self, metrics: dict[str, float], state: Path) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(state))
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=int(metrics["epoch"]))

    def should_stop(self, epoch: int) -> bool:
        """Tuning only: rank 0 waits for the driver's verdict on this epoch and every rank gets the same answer."""
        if self.relay is None:
            return False
        import ray
        import torch
        import torch.distributed as dist

        verdict = int(ray.get(self.relay.verdict.remote(epoch))) if self.rank == 0 else 0
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return bool(verdict)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        stop = torch.tensor([verdict], dtype=torch.int32, device=device)
        dist.broadcast(stop, src=0)
        return bool(stop.item())


def _tracking(config: dict, cfg: Any, ctx: Any, node: str) -> tuple[Any, Any]:
    """Rank 0 logs the run; the first rank of every other node attaches that node's system metrics to it."""
    import torch.distributed as dist

    from segevo_pipeline.tracking import NodeMetrics, Tracker

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
