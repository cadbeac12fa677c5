"""One case's files: compute its arrays (:mod:`segevo.data.preprocess.case`) and write them atomically with
the fingerprint they were made under, or find them already there and up to date. These are the functions the
pool runs, one call per case.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from segevo.config import PseudoMaskConfig
from segevo.data.cases import Case
from segevo.data.manifest import PrepCase
from segevo.data.preprocess.case import prepare_arrays, pseudo_mask
from segevo.data.readers.base import unreadable
from segevo.io import atomic_write_json, atomic_write_npy, current_umask

CASE_META = "case.json"
ARRAYS = ("image", "label", "pseudo", "zoom_image", "zoom_label", "zoom_pseudo", "locations")


def pseudo_job(case: Case, cfg: PseudoMaskConfig, channel: int | str, out: Path, fingerprint: str,
               meta: dict[str, Any]) -> dict[str, Any]:
    pseudo, info = pseudo_mask(case, cfg, channel)
    atomic_write_npy(out, pseudo)
    sidecar = {"fingerprint": fingerprint, "grid": list(pseudo.shape), "dtype": "int16", **meta, **info}
    atomic_write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def reuse_pseudo(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        sidecar = json.loads(out.with_suffix(".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return sidecar if sidecar.get("fingerprint") == fingerprint and out.is_file() else None


def prep_job(case: Case, roi: tuple[int, ...], channel: int | str, pseudo_path: Path | None,
             folder: Path, fingerprint: str) -> PrepCase:
    pseudo = None
    if pseudo_path is not None:
        try:
            pseudo = np.load(pseudo_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise unreadable(pseudo_path, "pseudo-mask (rerun 'segevo pseudomask')", err) from None
    arrays, fields = prepare_arrays(case, roi, channel, pseudo)
    rel = f"{case.source}/{case.case_id}"
    row = PrepCase(source=case.source, case_id=case.case_id, patient_id=case.patient_id, modality=case.modality,
                   image=f"{rel}/image.npy", label=f"{rel}/label.npy", zoom_image=f"{rel}/zoom_image.npy",
                   zoom_label=f"{rel}/zoom_label.npy", locations=f"{rel}/locations.npy",
                   pseudo=f"{rel}/pseudo.npy" if pseudo is not None else None,
                   zoom_pseudo=f"{rel}/zoom_pseudo.npy" if pseudo is not None else None,
                   raw_sha256=case.image_sha256, annotation=case.annotation, subset=case.subset,
                   segvol_seen=case.segvol_seen, **fields)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide shared data from the other users
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / CASE_META, {"fingerprint": fingerprint, "row": asdict(row)})
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return row


def reuse_prep(folder: Path, fingerprint: str) -> PrepCase | None:
    try:
        meta = json.loads((folder / CASE_META).read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        from segevo.data.manifest import _tupled

        row = PrepCase(**{k: _tupled(v) if k not in ("voxels", "intensity") else v for k, v in meta["row"].items()})
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    root = folder.parent.parent
    if not all((root / getattr(row, a)).is_file() for a in ARRAYS if getattr(row, a) is not None):
        return None
    return row
