"""The output pre-flight every verb runs before its work: no output may be one of the verb's inputs (however the
path is spelled: relative, ``./x``, ``../dir/x``, a symlink or a hard link), be a directory where a file goes, or
land in a folder that cannot be written. Found before minutes of inference, not after, and as one line.

Writability is probed by creating and removing a temporary file in the nearest existing folder, because
``os.access`` answers "yes" to root even on a read-only mount.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from segevo.errors import OutputError

Named = tuple[str, "str | os.PathLike[str] | None"]


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both names reach the same file: same inode (hard links, symlinks), or the same resolved path
    when one does not exist yet."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder on the way up that exists (an output's folders are created on write)."""
    for candidate in [path, *path.absolute().parents]:
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(os.sep)


def _check_writable_folder(label: str, path: Path, folder: Path) -> None:
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise OutputError(f"{label} {path}: {base} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".segevo-probe.", dir=base)
    except OSError as err:
        raise OutputError(f"{label} {path}: folder {base} is not writable ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def _check_not_input(label: str, path: Path, inputs: list[tuple[str, Path]]) -> None:
    for in_label, source in inputs:
        if source.is_dir():
            clash, where = path.exists() and _inside(path, source), f"lies in the input {in_label} {source}"
        else:
            clash, where = same_file(path, source), f"is the input {in_label} {source}"
        if clash:
            raise OutputError(f"{label} {path}: {where}; refusing to write over an input")


def _folders(named: Iterable[Named]) -> Iterable[tuple[str, Path]]:
    """The given folder outputs as paths; a file where a folder goes is an error."""
    for label, p in named:
        if p is None:
            continue
        path = Path(p)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{label} {path}: is a file; expected a folder")
        yield label, path


def preflight(outputs: Iterable[Named] = (), inputs: Iterable[Named] = (), folders: Iterable[Named] = (),
              replaced: Iterable[Named] = ()) -> None:
    """Raise :class:`OutputError` (naming the flag or key) unless every output can be written without touching
    an input. ``outputs`` are files; ``folders`` are directories the verb writes files into; ``replaced`` are
    directories the verb swaps whole for new ones, which therefore must not hold (or be) any input. Labels are
    the flag or config key a user would change; ``None`` paths (an option not given) are skipped."""
    given_inputs = [(label, Path(p)) for label, p in inputs if p is not None]
    for label, p in outputs:
        if p is None:
            continue
        path = Path(p)
        if path.is_dir():
            raise OutputError(f"{label} {path}: is a directory; expected a file name")
        _check_not_input(label, path, given_inputs)
        _check_writable_folder(label, path, path.parent)
    for label, path in _folders(folders):
        for in_label, source in given_inputs:
            if not source.is_dir() and source.exists() and same_file(path, source):
                raise OutputError(f"{label} {path}: is the input {in_label} {source}")
        _check_writable_folder(label, path, path)
    for label, path in _folders(replaced):
        for in_label, source in given_inputs:
            if _inside(source, path) or _inside(path, source):
                raise OutputError(f"{label} {path}: holds the input {in_label} {source}; the folder is replaced "
                                  "as a whole, so it must not contain (or be inside) an input")
        _check_writable_folder(label, path, path.parent)
