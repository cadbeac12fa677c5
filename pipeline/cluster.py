"""What changes when a run joins a Ray cluster of several nodes, checked before any work starts.

On one machine every path is the same file for the driver and the workers. On a cluster a relative path
resolves inside Ray's per-job working-dir copy (garbage-collected, different on every node) and an absolute
one may be a node's own disk. So before training, every path a worker or the driver reads or writes must be a
URI (``s3://``, ``gs://``, ...: Ray and pyarrow reach it from every node) or an absolute path that every node
sees as the same place: the driver writes a token file into each writable path and a zero-CPU task pinned to
each node reads it back (read-only inputs are compared by size and listing instead). A failure is one line
naming the key, within seconds, not an error at the first checkpoint after a paid epoch.

GPUs are never guessed on a cluster: ``train.use_gpu`` must be set, and a run that asks for GPUs waits for
the autoscaler (``train.gpu_wait_s``) and then fails clearly instead of training on CPUs with gloo.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from segevo.errors import UserError


class ClusterError(UserError):
    """The run cannot work on this cluster as configured (a path, a resource, a service)."""


@dataclass(frozen=True)
class PathUse:
    key: str  # the config key (or flag) it came from, for the error message
    path: str
    write: bool


def is_uri(path: str) -> bool:
    """A remote filesystem URI (``file://`` is a local path)."""
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_multinode() -> bool:
    return len(alive_nodes()) > 1


def check_gpu_choice(use_gpu: bool | None) -> None:
    if use_gpu is None:
        raise ClusterError("train.use_gpu is not set: on a cluster say it (true for GPU workers, false for CPU "
                           "workers with gloo); it is never guessed from what the cluster holds right now")


def wait_for_gpus(needed: float, timeout_s: float, poll_s: float = 2.0) -> None:
    """Ask the autoscaler for ``needed`` GPUs and wait until the cluster has them, at most ``timeout_s``."""
    import ray

    if ray.cluster_resources().get("GPU", 0) >= needed:
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1}] * int(needed))
    except Exception:  # no autoscaler (a fixed cluster): waiting still lets nodes join by hand
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if ray.cluster_resources().get("GPU", 0) >= needed:
            return
    have = ray.cluster_resources().get("GPU", 0)
    raise ClusterError(f"train.use_gpu: the run needs {needed:g} GPUs and the cluster had {have:g} after waiting "
                       f"{timeout_s:g} s (train.gpu_wait_s) for the autoscaler; it will not fall back to CPUs")


def _fingerprint(path: str) -> str:
    """What a node sees at ``path``: kind, size and (for a folder) the sorted top-level names."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_dir():
        names = "\n".join(sorted(os.listdir(p)))
        return "dir:" + hashlib.sha256(names.encode()).hexdigest()[:16]
    return f"file:{p.stat().st_size}"


def _node_view(paths: list[str], tokens: dict[str, str]) -> dict[str, str]:
    """Runs on each node: the fingerprint of every read path, the token found in every write path."""
    seen = {p: _fingerprint(p) for p in paths}
    for path, name in tokens.items():
        try:
            seen[path] = (Path(path) / name).read_text()
        except OSError:
            seen[path] = "no token"
    return seen


def on_every_node(fn: Callable[..., Any], *args: Any, what: str, timeout_s: float,
                  retries: int = 0) -> dict[str, Any]:
    """``fn(*args)`` once on each alive node (a zero-CPU task pinned there); ``{node address: result}``. A task
    that has not finished within ``timeout_s`` is a :class:`ClusterError`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=retries)(fn)
    refs = {n["NodeManagerAddress"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(*args) for n in alive_nodes()}
    try:
        return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
    except ray.exceptions.GetTimeoutError as err:
        raise ClusterError(f"{what} did not finish on every node within {timeout_s:g} s") from err


def check_shared_paths(uses: list[PathUse], timeout_s: float = 60.0) -> None:
    """Every path is a URI or an absolute path that every alive node sees as the same place."""
    nodes = alive_nodes()
    refuse_relative(uses, f"on a cluster of {len(nodes)} nodes it would resolve inside Ray's per-job copy of the "
                          f"working dir on each node")
    local = [use for use in uses if not is_uri(use.path)]
    tokens: dict[str, str] = {}
    expected: dict[str, str] = {}
    created: list[Path] = []  # folders made only to hold a token: removed again, a refused run leaves nothing
    name = f".segevo-shared-{uuid.uuid4().hex}"
    try:
        for use in local:
            if use.write:
                folder = Path(use.path)
                created += [p for p in (folder, *folder.parents) if not p.exists()]
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_text(name)
                except OSError as err:
                    raise ClusterError(f"{use.key} {use.path}: not writable from the driver ({err.strerror})") from err
                tokens[use.path], expected[use.path] = name, name
            else:
                expected[use.path] = _fingerprint(use.path)
                if expected[use.path] == "missing":
                    raise ClusterError(f"{use.key} {use.path}: not found on the driver's node")
        views = on_every_node(_node_view, [u.path for u in local if not u.write], tokens,
                              what="the shared-path check", timeout_s=timeout_s)
        for use in local:
            for address, view in views.items():
                if view[use.path] != expected[use.path]:
                    what = "is not the driver's (not on shared storage)" if view[use.path] != "missing" \
                        else "does not exist"
                    raise ClusterError(f"{use.key} {use.path}: on node {address} it {what}; every node must see "
                                       f"the same shared file system there, or give a URI (s3://, gs://)")
    finally:
        for path in tokens:
            (Path(path) / name).unlink(missing_ok=True)
        for folder in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


def tracking_paths(uri: str, configured: bool) -> list[PathUse]:
    """The tracking store as a cluster must have it: a server every node reaches (checked now), or a SQLite file
    on shared storage; never the default file in the job's working-dir copy."""
    from segevo_pipeline.tracking import check_server

    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            check_server(uri)
        except Exception as err:
            raise ClusterError(f"tracking.tracking_uri {uri}: the tracking server is unreachable ({err}); "
                               f"start it or fix the URI before training on a cluster") from None
        return []
    if not configured:
        raise ClusterError("tracking.tracking_uri is not set: on a cluster every rank and the driver must log to "
                           "one MLflow server (http://...), or a SQLite file on shared storage")
    if scheme == "sqlite":
        return [PathUse("tracking.tracking_uri", str(Path(urlparse(uri).path).parent), True)]
    return []


def refuse_relative(uses: list[PathUse], why: str) -> None:
    for use in uses:
        if not is_uri(use.path) and not os.path.isabs(use.path):
            raise ClusterError(f"{use.key} {use.path!r} is relative: {why}; give an absolute path on shared "
                               f"storage or a URI (s3://, gs://)")


def in_ray_job() -> bool:
    """True in the driver of a ``ray job submit`` job: its working dir is Ray's temporary copy of the upload."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_cluster(cfg, writes: list[PathUse], reads: list[PathUse], tracking_uri: str) -> None:
    """Everything a multi-node run needs before it starts: an explicit GPU choice, shared paths, the tracking
    store. On one node only the outputs of a submitted job are checked: relative ones would be written into
    Ray's copy of the working dir, which is deleted with the job."""
    if in_ray_job():
        refuse_relative(writes, "under 'ray job submit' it would be written into Ray's temporary copy of the "
                                "working dir, deleted with the job")
    if not is_multinode():
        return
    check_gpu_choice(cfg.train.use_gpu)
    configured = bool(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    check_shared_paths([*writes, *reads, *tracking_paths(tracking_uri, configured)])
