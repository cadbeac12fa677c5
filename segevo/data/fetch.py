"""Getting archives onto disk safely: resumable HTTP(S) downloads, checksums, and extraction that no member can
escape.

A download streams into ``<file>.part`` and resumes it with a Range request (after a cut connection, or on the
next run); only a file whose checksum matches is renamed to its final name. An archive is checked member by
member before anything is written, extracted into a temporary sibling folder and only then moved into place, so
a refused or interrupted extraction leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from segevo.errors import DownloadError
from segevo.net import check_reachable

USER_AGENT = "segevo/0.1"
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


class ArchiveError(DownloadError):
    """An archive is corrupt or has a member that would land outside the target folder."""


@dataclass(frozen=True)
class Remote:
    """One file a source publishes: where it is, and the checksum the publisher gives (``algo:hex``) if any."""

    url: str
    filename: str
    checksum: str | None = None

    def __post_init__(self) -> None:
        if self.checksum is not None:
            algo, _, digest = self.checksum.partition(":")
            if algo not in ("sha256", "md5") or not re.fullmatch(r"[0-9a-f]+", digest):
                raise ValueError(f"{self.filename}: checksum must be 'sha256:<hex>' or 'md5:<hex>', "
                                 f"got {self.checksum!r}")


def cache_dir() -> Path:
    """Where downloads are kept between runs: ``$SEGEVO_CACHE``, else ``.cache/segevo/downloads`` (git-ignored)."""
    return Path(os.environ.get("SEGEVO_CACHE") or Path(".cache") / "segevo" / "downloads")


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, checksum: str) -> None:
    """Delete ``path`` and raise when its digest is not ``checksum`` (``algo:hex``)."""
    algo, _, expected = checksum.partition(":")
    actual = file_digest(path, algo)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path}: {algo} mismatch (got {actual}, expected {expected}); the file was deleted, "
                            f"run the download again")


def _pinned(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _reuse(path: Path, checksum: str | None) -> bool:
    """A complete file is reused when it matches the published checksum, or the one recorded when it arrived."""
    if not path.is_file():
        return False
    pin = _pinned(path)
    expected = checksum or (f"sha256:{pin.read_text().strip()}" if pin.is_file() else None)
    if expected is None:
        return True
    try:
        verify(path, expected)
    except DownloadError as err:
        log.warning("%s: downloading it again", str(err).split(";")[0])
        return False
    return True


def download(remote: Remote, dest_dir: Path, *, retries: int = 5, timeout: float = 60.0) -> Path:
    """Fetch ``remote`` into ``dest_dir``; a complete verified file is reused, a ``.part`` file is resumed.

    Without a published checksum the file's SHA256 is recorded next to it (``<file>.sha256``) and warned about,
    so later runs at least detect a corrupted cache.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / remote.filename
    if _reuse(path, remote.checksum):
        return path
    if not remote.url.startswith("file:"):
        check_reachable(remote.url, f"download it elsewhere and put it at {path}, or set a mirror "
                                    f"(data.mirrors in the config)")
    part = path.with_name(path.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _fetch_once(remote, part, timeout):
                break
            reason = "the connection closed early"
        except (http.client.HTTPException, urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500 and err.code != 429:
                raise DownloadError(f"{remote.url}: HTTP {err.code} {err.reason}") from None
            reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        progressed = (part.stat().st_size if part.exists() else 0) > before
        failures = 0 if progressed else failures + 1
        if failures >= retries:
            raise DownloadError(f"{remote.url}: {reason} ({retries} tries without progress); "
                                f"run again to resume from {part}")
        time.sleep(min(0.25 * 2 ** failures, 10.0))
    if remote.checksum:
        verify(part, remote.checksum)
    else:
        digest = file_digest(part)
        _pinned(path).write_text(digest + "\n")
        log.warning("%s: the source publishes no checksum; recorded sha256 %s in %s", remote.filename, digest,
                    _pinned(path))
    os.replace(part, path)
    return path


def _fetch_once(remote: Remote, part: Path, timeout: float) -> bool:
    """One request, appended to ``part``; True when the whole file is there."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left past what we have: the .part is complete (or bigger)
            return True
        raise
    with response:
        total = None
        if response.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:  # a range we did not ask for: retry from scratch
                part.unlink(missing_ok=True)
                raise http.client.HTTPException(f"unexpected Content-Range {response.headers.get('Content-Range')}")
            if match.group(2) != "*":
                total = int(match.group(2))
        else:
            offset = 0  # the server ignored the Range header and sends everything
        if total is None and response.headers.get("Content-Length"):
            total = offset + int(response.headers["Content-Length"])
        with open(part, "r+b" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.filename,
            disable=None, leave=False,
        ) as bar:
            f.seek(offset)
            f.truncate()
            while block := response.read(_CHUNK):
                f.write(block)
                bar.update(len(block))
            size = f.tell()
    return total is None or size >= total


# --- extraction --------------------------------------------------------------------------------------------

def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]


def _check_name(archive: Path, name: str) -> None:
    if not name or "\x00" in name:
        raise ArchiveError(f"{archive}: refused: member {name!r} has an empty or NUL-containing name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"{archive}: refused: member {name!r} is an absolute path")
    if ".." in _parts(name):
        raise ArchiveError(f"{archive}: refused: member {name!r} points outside the target folder ('..')")


def _check_link(archive: Path, name: str, target: str, hard: bool) -> None:
    kind = "hard link" if hard else "symlink"
    if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target):
        raise ArchiveError(f"{archive}: refused: {kind} {name!r} points to the absolute path {target!r}")
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        raise ArchiveError(f"{archive}: refused: {kind} {name!r} -> {target!r} points outside the target folder")


def _strip(name: str, n: int) -> str:
    return "/".join(_parts(name)[n:])


def _select_tar(archive: Path, tar: tarfile.TarFile, include: Callable[[str], bool] | None,
                strip: int) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    links = set()
    for m in members:
        _check_name(archive, m.name)
        if m.issym() or m.islnk():
            _check_link(archive, m.name, m.linkname, m.islnk())
            links.add("/".join(_parts(m.name)))
        elif not (m.isfile() or m.isdir()):
            raise ArchiveError(f"{archive}: refused: member {m.name!r} is a device, FIFO or other special file")
    selected = []
    for m in members:
        parts = _parts(m.name)
        through = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in links), None)
        if through:  # a link to a folder, then a member "inside" it: the classic two-step escape
            raise ArchiveError(f"{archive}: refused: member {m.name!r} is written through the link {through!r}")
        if include is not None and not include(m.name):
            continue
        name = _strip(m.name, strip)
        if not name:
            continue
        linkname = _strip(m.linkname, strip) if m.islnk() else m.linkname
        if m.islnk() and not linkname:
            raise ArchiveError(f"{archive}: refused: hard link {m.name!r} targets a stripped folder")
        renamed = copy.copy(m)  # TarInfo.replace() only exists from Python 3.11.4
        renamed.name, renamed.linkname = name, linkname
        selected.append(renamed)
    return selected


def _progress(members: list, archive: Path) -> tqdm:
    return tqdm(members, desc=f"unpacking {archive.name}", unit="file", disable=None, leave=False)


def _extract_tar(archive: Path, tmp: Path, include: Callable[[str], bool] | None, strip: int) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _select_tar(archive, tar, include, strip)
            # where Python has it (3.11.4+), the 'data' filter re-checks every member against the real file
            # system as a second line of defence behind the checks above
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in _progress(members, archive):
                tar.extract(member, tmp, **extra)
    except (tarfile.TarError, EOFError, OSError, KeyError) as err:
        filter_error = getattr(tarfile, "FilterError", None)
        if filter_error is not None and isinstance(err, filter_error):
            raise ArchiveError(f"{archive}: refused: {err}") from None
        raise ArchiveError(f"{archive}: not a readable tar archive ({err})") from None


def _extract_zip(archive: Path, tmp: Path, include: Callable[[str], bool] | None, strip: int) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_name(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    target = zf.read(info).decode("utf-8", "replace")
                    _check_link(archive, info.filename, target, hard=False)
                    raise ArchiveError(f"{archive}: refused: member {info.filename!r} is a symlink "
                                       f"(zip symlinks are not supported)")
            for info in _progress(infos, archive):
                name = _strip(info.filename, strip)
                if (include is not None and not include(info.filename)) or not name:
                    continue
                out = tmp.joinpath(*name.split("/"))
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise ArchiveError(f"{archive}: not a readable zip archive ({err})") from None


def safe_extract(archive: Path, dest: Path, *, include: Callable[[str], bool] | None = None,
                 strip_components: int = 0) -> list[Path]:
    """Extract a tar (any compression) or zip archive into ``dest``; returns the top-level entries written.

    Every member is checked first (absolute paths, ``..``, links leaving the folder or used as a path prefix,
    special files): one bad member refuses the whole archive. ``include`` picks members by their name in the
    archive; ``strip_components`` drops leading folders like ``tar --strip-components``. Each top-level entry
    replaces any existing one of the same name in ``dest`` by a rename.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extracting", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, include, strip_components)
        else:
            _extract_tar(archive, tmp, include, strip_components)
        placed = []
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.exists() or target.is_symlink():
                old = tmp / f".replaced-{entry.name}"
                os.replace(target, old)
            os.replace(entry, target)
            placed.append(target)
        return placed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
