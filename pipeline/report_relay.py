"""Epoch reports from a Ray Train run to the ``segevo tune`` driver, and the driver's stop verdicts back.

Ray Train V2 calls ``UserCallback.after_report`` on its controller actor once every worker has reported an epoch
and its checkpoint is registered. ``ForwardReports`` passes that epoch's validation Dice to a ``ReportRelay``
actor; the driver takes it from there, asks Optuna (``trial.report`` / ``should_prune``) and posts the verdict,
which rank 0 of the run waits for before starting the next epoch. The relay only moves small messages.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.train import UserCallback

VERDICT_TIMEOUT_S = 900.0  # a driver that never answers does not stall training forever: the run goes on


@ray.remote(num_cpus=0)
class ReportRelay:
    """Two one-way channels: epoch reports to the driver, per-epoch stop verdicts to the workers."""

    def __init__(self) -> None:
        self._reports: asyncio.Queue[dict[str, float]] = asyncio.Queue()
        self._verdicts: dict[int, asyncio.Future[bool]] = {}

    def _verdict(self, epoch: int) -> asyncio.Future[bool]:
        if epoch not in self._verdicts:
            self._verdicts[epoch] = asyncio.get_running_loop().create_future()
        return self._verdicts[epoch]

    async def put(self, report: dict[str, float]) -> None:
        await self._reports.put(report)

    async def next_report(self, timeout: float) -> dict[str, float] | None:
        try:
            return await asyncio.wait_for(self._reports.get(), timeout)
        except TimeoutError:
            return None

    async def decide(self, epoch: int, stop: bool) -> None:
        future = self._verdict(epoch)
        if not future.done():
            future.set_result(stop)

    async def verdict(self, epoch: int) -> bool:
        try:
            return await asyncio.wait_for(asyncio.shield(self._verdict(epoch)), VERDICT_TIMEOUT_S)
        except TimeoutError:
            return False


class ForwardReports(UserCallback):
    """Runs on the Ray Train controller: rank 0's epoch and validation Dice go to the relay."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0]
        self.relay.put.remote({"epoch": int(first["epoch"]), "val_dice": float(first["val_dice"])})
