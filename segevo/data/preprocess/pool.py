"""Running per-case jobs: in this process or a process pool, one progress bar, a bad case raised or left out
(``data.skip_bad_cases``), and the clean-up of outputs no case produces any more.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from segevo.data.cases import Case, CaseError

log = logging.getLogger(__name__)


def pool_context() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported the heavy modules once, so each worker starts in milliseconds instead of
    importing torch and numba again; never a plain fork of this process (its torch/numba threads would not
    survive it). Spawn where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["segevo.data.preprocess.jobs", "segevo.data.pseudomask"])
    return ctx


def init_worker() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@dataclass
class StageReport:
    """What a stage run did: outputs (key -> row), how many were computed, and the cases left out."""

    outputs: dict[str, Any]
    computed: int
    reused: int
    skipped: list[dict[str, str]]
    unlabelled: int
    path: Path
    notes: dict[str, list[str]] = field(default_factory=dict)


def run_jobs(jobs: list[tuple[str, Callable[..., Any], tuple]], workers: int, desc: str, skip_bad: bool,
             on_result: Callable[[str, Any], None]) -> list[dict[str, str]]:
    """Run ``fn(*args)`` per job, in a process pool when ``workers > 1``; bad cases raise or are collected."""
    skipped: list[dict[str, str]] = []

    def failed(key: str, err: BaseException) -> None:
        if isinstance(err, BrokenProcessPool):
            raise RuntimeError(f"{key}: a worker process died (out of memory? lower preprocess.workers or pass "
                               f"--workers)") from err
        if not isinstance(err, CaseError):
            raise RuntimeError(f"{key}: unexpected {type(err).__name__}: {err}") from err
        message = str(err) if str(err).startswith(key) else f"{key}: {err}"
        if not skip_bad:
            raise CaseError(f"{message} (set data.skip_bad_cases: true to leave such cases out)") from None
        log.warning("skipped %s", message)
        source, case_id = key.split("/", 1)
        skipped.append({"source": source, "case_id": case_id, "reason": message})

    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=None)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for key, fn, args in jobs:
                try:
                    result = fn(*args)
                except Exception as err:
                    failed(key, err)
                else:
                    on_result(key, result)
                bar.update()
            return skipped
        ctx = pool_context()
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                 initializer=init_worker) as pool:
            pending: dict[Future, str] = {pool.submit(fn, *args): key for key, fn, args in jobs}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        key = pending.pop(fut)
                        err = fut.exception()
                        if err is not None:
                            failed(key, err)
                        else:
                            on_result(key, fut.result())
                        bar.update()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    return skipped


def labelled(cases: Iterable[Case]) -> tuple[list[Case], int]:
    cases = list(cases)
    labelled = [c for c in cases if c.label is not None]
    return labelled, len(cases) - len(labelled)


def largest_first(cases: list[Case]) -> list[Case]:
    """Largest first, so the pool does not end waiting on one big volume."""
    def size(c: Case) -> int:
        try:
            return c.image.stat().st_size
        except OSError:
            return 0

    return sorted(cases, key=size, reverse=True)


def prune(root: Path, keep: set[Path], pattern: str) -> int:
    """Remove earlier outputs (matched by ``pattern`` under ``root``) of cases no longer produced, and leftovers
    of interrupted runs (dot-prefixed temporary files and folders)."""
    removed = 0
    if not root.is_dir():
        return 0
    for path in root.glob(pattern):
        if path not in keep:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    for source in (p for p in root.iterdir() if p.is_dir()):
        for tmp in source.glob(".*"):
            if ".tmp" in tmp.name or ".old-" in tmp.name:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return removed
