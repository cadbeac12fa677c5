"""Atomic file writes (a reader never sees a half-written output, an interrupted run leaves none behind) and the
validated low-level readers that every file kind's reader builds on: whatever goes wrong, the error names the
file and what it should have been, never a bare ``KeyError`` or numpy message."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from segevo.errors import UserError


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would make shared outputs unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_npy(path: str | os.PathLike[str], array: Any) -> Path:
    """``np.save`` (no pickles) into a temporary file in the same folder, renamed into place."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a readable regular file, else a :class:`UserError` saying which of missing, a directory or
    unreadable it is (a directory is not a "missing file")."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a {what}")
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (expected a {what})")
    return path


def read_json(path: str | os.PathLike[str], what: str, error: type[UserError] = UserError) -> dict[str, Any]:
    """A JSON file whose top level must be an object; every failure is ``error`` naming the file."""
    path = Path(path)
    try:
        text = require_file(path, what).read_text()
        data = json.loads(text)
    except UserError as err:
        raise error(str(err)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read the {what}: {err}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_npy(path: str | os.PathLike[str], what: str = "prepared array", mmap: bool = False) -> Any:
    """A ``.npy`` array without pickles; a truncated or corrupt file is a :class:`UserError` naming it."""
    import numpy as np

    path = require_file(path, what)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: truncated or corrupt {what} ({detail[:160]})") from None
