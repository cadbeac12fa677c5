"""How many worker processes the data stages can afford: one per core only while memory allows.

A worker holding a 512x512x600 CT needs about 2.5x its float32 size on top of the interpreter (measured by
``bench/preprocess_large.py``); one per core on a 16-core machine with 32 GB would be killed by the kernel half
way through a data set. The count is therefore the smaller of the cores and what the available memory (the
cgroup limit where there is one) holds for the largest volume of the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from segevo.data.cases import Case

PEAK_FACTOR = 2.5  # peak resident memory per worker / float32 size of its volume (bench/preprocess_large.py)
WORKER_BASE = 600 * 2**20  # an idle worker: interpreter, numpy, torch, numba
log = logging.getLogger(__name__)


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _cgroup_free() -> int | None:
    """Bytes left under a cgroup v2 (or v1) memory limit; None when there is no limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:
                return None
            return max(0, int(raw) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, bounded by the cgroup's limit; physical memory where neither exists."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    group = _cgroup_free()
    return free if group is None else min(free, group)


def volume_bytes(case: Case) -> int:
    """float32 size of the one channel a worker holds, from the file header (nothing else is read)."""
    try:
        if case.format == "m3d":
            shape = np.load(case.image, mmap_mode="r").shape[1:]
        else:
            import nibabel as nib

            shape = nib.load(case.image).shape[:3]
    except (OSError, ValueError, EOFError):
        return 0  # unreadable: the job itself reports it
    return 4 * int(np.prod(shape))


def memory_bound_workers(cases: Iterable[Case], memory: int | None = None, n_cores: int | None = None) -> int:
    """Processes for a run over ``cases``: at most one per core, and no more than the available memory holds
    when every worker works on the run's largest volume at once."""
    n_cores = n_cores or cores()
    largest = max((volume_bytes(c) for c in cases), default=0)
    per_worker = int(PEAK_FACTOR * largest) + WORKER_BASE
    memory = available_memory() if memory is None else memory
    n = max(1, min(n_cores, memory // per_worker))
    if n < n_cores:
        log.info("%d workers, not %d: %.1f GiB available, %.1f GiB per worker for the largest volume", n, n_cores,
                 memory / 2**30, per_worker / 2**30)
    return n
