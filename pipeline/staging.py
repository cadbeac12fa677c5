"""Prepared data staged onto every node's local disk from a DVC remote: the alternative to a shared file system.

The data version is what DVC recorded: the hashes of ``data/prep`` and ``data/split.json`` in ``dvc.lock`` (or
in ``.dvc`` files), whose contents ``dvc push`` put in a remote's content-addressed store
(``files/md5/<2 hex>/<30 hex>``, a folder as a ``.dir`` listing of its files' hashes). Before training one
zero-CPU task per node copies that version from the remote (a local or mounted folder, or any URI pyarrow
opens: ``s3://``, ``gs://``) into ``<staging_dir>/<version>/``, checks every file's md5, and marks it complete;
a node that already holds the version copies nothing. Workers then read the data there, on their own disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import yaml

from segevo_pipeline.cluster import ClusterError, is_uri, on_every_node

DATA_OUTS = ("prep", "split.json")


def data_version(lock: Path, data_root: str = "data") -> dict[str, str]:
    """``{relative path under the data root: md5}`` of the prepared data, from a ``dvc.lock`` or ``.dvc`` file."""
    try:
        doc = yaml.safe_load(lock.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ClusterError(f"train.data_lock {lock}: cannot read it ({err})") from err
    outs = [o for stage in (doc or {}).get("stages", {}).values() for o in stage.get("outs", [])]
    outs += (doc or {}).get("outs", [])
    found: dict[str, str] = {}
    for out in outs:
        rel = Path(out.get("path", "")).as_posix()
        for name in DATA_OUTS:
            if rel in (name, f"{data_root}/{name}") and out.get("md5"):
                found[name] = out["md5"]
    missing = [n for n in DATA_OUTS if n not in found]
    if missing:
        raise ClusterError(f"train.data_lock {lock}: no hash for {', '.join(missing)} (run the data stages and "
                           f"'dvc push' first)")
    return found


class _Remote:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        if is_uri(url):
            from pyarrow import fs

            self.fs, self.root = fs.FileSystem.from_uri(self.url)
        else:
            self.fs, self.root = None, self.url

    def read(self, md5: str) -> bytes:
        rel = f"files/md5/{md5[:2]}/{md5[2:]}"
        try:
            if self.fs is None:
                return (Path(self.root) / rel).read_bytes()
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                return f.read()
        except (OSError, FileNotFoundError) as err:
            raise ClusterError(f"train.data_remote {self.url}: object {md5} is missing ({err}); "
                               f"'dvc push' the data version first") from err


def _write_checked(remote: _Remote, md5: str, target: Path) -> None:
    body = remote.read(md5)
    if hashlib.md5(body).hexdigest() != md5:
        raise ClusterError(f"train.data_remote {remote.url}: object {md5} does not match its hash")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    tmp.write_bytes(body)
    tmp.replace(target)


def stage_here(remote_url: str, version: dict[str, str], staging_dir: str) -> str:
    """Copy ``version`` into ``<staging_dir>/<key>/`` on this node unless it is already complete; the folder."""
    key = hashlib.sha256(json.dumps(version, sort_keys=True).encode()).hexdigest()[:16]
    dest = Path(staging_dir) / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node, whatever runs at once
        if (dest / ".complete").is_file():
            return str(dest)
        shutil.rmtree(dest, ignore_errors=True)
        remote = _Remote(remote_url)
        for name, md5 in version.items():
            if md5.endswith(".dir"):
                for entry in json.loads(remote.read(md5)):
                    _write_checked(remote, entry["md5"], dest / name / entry["relpath"])
            else:
                _write_checked(remote, md5, dest / name)
        (dest / ".complete").write_text(json.dumps(version))
    return str(dest)


def stage_on_every_node(remote_url: str, version: dict[str, str], staging_dir: str,
                        timeout_s: float = 3600) -> tuple[str, dict[str, float]]:
    """One pinned task per alive node; the staged folder (the same path on every node) and seconds per node."""
    import time

    def staging(*args: object) -> tuple[str, float]:
        start = time.perf_counter()
        return stage_here(*args), time.perf_counter() - start

    results = on_every_node(staging, remote_url, version, staging_dir, what="staging the data",
                            timeout_s=timeout_s, retries=1)
    folders = {folder for folder, _ in results.values()}
    return folders.pop(), {address: round(seconds, 2) for address, (_, seconds) in results.items()}
