"""What every source module shares: its run context, lazily built case candidates, and download-then-extract
with a stamp so that a rerun does not unpack the same archive again."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segevo.config import DataConfig
from segevo.data.cases import Case
from segevo.data.fetch import Remote, download, safe_extract
from segevo.io import atomic_write_json


@dataclass(frozen=True)
class SourceContext:
    """Where one source's files go: ``dest`` = ``<data root>/raw/<source>``, ``cache`` keeps its archives."""

    name: str
    dest: Path
    cache: Path
    config: DataConfig
    force: bool = False

    def remote(self, default_base: str, filename: str, checksum: str | None) -> Remote:
        """``filename`` under the source's base URL, or under ``data.mirrors[<source>]`` when set; the checksum
        pinned in ``data.checksums["<source>/<file>"]`` wins over the code's (a publisher's own sha256 or md5)."""
        base = self.config.mirrors.get(self.name, default_base)
        pinned = self.config.checksums.get(f"{self.name}/{filename}", checksum)
        return Remote(f"{base.rstrip('/')}/{filename}", filename, pinned)


@dataclass(frozen=True)
class Candidate:
    """A case found on disk; ``build`` reads (or converts) it, so one bad case fails on its own."""

    case_id: str
    build: Callable[[], Case]


def fetch_and_extract(ctx: SourceContext, remote: Remote, *, strip_components: int = 0,
                      include: Callable[[str], bool] | None = None) -> bool:
    """Download ``remote`` (cached) and extract it into ``ctx.dest``; False when an earlier run already did."""
    archive = download(remote, ctx.cache)
    stamp = ctx.dest / f".extracted-{remote.filename}.json"
    st = archive.stat()
    identity = {"archive": remote.filename, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not ctx.force and stamp.is_file():
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in identity} == identity and all((ctx.dest / e).exists() for e in done["entries"]):
            return False
    stamp.unlink(missing_ok=True)
    placed = safe_extract(archive, ctx.dest, include=include, strip_components=strip_components)
    atomic_write_json(stamp, {**identity, "entries": [p.name for p in placed]})
    return True
