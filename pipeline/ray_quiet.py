"""Known-benign messages of Ray and DeepSpeed internals, filtered from what a user reads.

A user reads a warning as a failure. These say nothing actionable: Ray Train's placement-group cleaner polls the
state API and warns on every poll while the dashboard (which serves that API) is not running, as in a local Ray
started without it; DeepSpeed warns that ZeRO runs with a client optimizer, which segevo uses on purpose
(``segevo.optim.GroupedAdamW``). ``install`` runs in every Ray worker process (the runtime env's
``worker_process_setup_hook``) and in the driver.
"""

from __future__ import annotations

import logging

BENIGN = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Failed to query Ray Train Controller actor state",
    "DeepSpeed": "You are using ZeRO with an untested optimizer",
}
HOOK = "segevo_pipeline.ray_quiet.install"


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    for name, text in BENIGN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(text))
