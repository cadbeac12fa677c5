"""The offline demo: three real abdominal volumes (two CT, one MR) from the source archive of TotalSegmentator.

The sdist of ``totalsegmentator==2.18.0`` ships its test references: CT and MR NIfTI images with the label maps
TotalSegmentator predicted for them. It comes through ``pip download`` from whatever package index pip is
configured with, so the demo needs no other host. Its labels are **model output, not manual annotation**: the
case table says so (``annotation: model``), and results on them measure agreement with TotalSegmentator.

Patients: ``example_ct_sm.nii.gz`` is voxel-identical to slices 82-111 of ``example_ct.nii.gz`` (checked when
this source was written), so both CT cases are one scan of one patient and share a patient id; a split must
never put them on different sides. The MR volume has another field of view and orientation and is treated as
a different patient (nothing in the data links them).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from segevo.config import DataConfig
from segevo.data.cases import Case
from segevo.data.fetch import safe_extract, verify
from segevo.data.sources.base import Candidate, SourceContext
from segevo.data.vocabulary import label_map
from segevo.errors import DownloadError
from segevo.io import atomic_write_json

VERSION = 1
REQUIREMENT = "totalsegmentator==2.18.0"
SDIST = "totalsegmentator-2.18.0.tar.gz"
CHECKSUM = "sha256:5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_ROOT = "totalsegmentator-2.18.0/"
REFERENCE = "tests/reference_files"
CLASS_MAP_FILE = "totalsegmentator/map_to_binary.py"
META = {
    "licence": "Apache-2.0 (package); images from the CC BY 4.0 TotalSegmentator data sets",
    "annotation": "model",
    "labels": "TotalSegmentator 2.18.0 model output, not manual annotation",
    "origin": f"sdist of {REQUIREMENT} via pip download",
}

# case id, image, label, TotalSegmentator task (class map), modality, patient id
CASES = (
    ("example_ct_sm", "example_ct_sm.nii.gz", "example_seg.nii.gz", "total", "CT", "ts-example-ct"),
    ("example_ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "total", "CT", "ts-example-ct"),
    ("example_mr_sm", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr", "MRI", "ts-example-mr"),
)
NOTES = {"example_ct_sm": ("voxel-identical to slices 82-111 of example_ct (same scan); its affine keeps "
                           "example_ct's origin, so world coordinates differ by 82 slices",)}
FILES = (CLASS_MAP_FILE, *(f"{REFERENCE}/{name}" for case in CASES for name in case[1:3]))
_WANTED = {_ROOT + f for f in FILES}
log = logging.getLogger(__name__)


def options(cfg: DataConfig) -> dict:
    return {"requirement": REQUIREMENT}


def _pip_download(dest: Path) -> Path:
    """``pip download`` the sdist (no dependencies, no wheel) into ``dest``; pip picks the index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--timeout", "20",
           "--retries", "2", "--disable-pip-version-check", "-d", str(dest), REQUIREMENT]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(-1, "--no-build-isolation")  # pip prepares the sdist's metadata: 2 s instead of 25 s
    log.info("fetching %s with pip (about 38 MB)", REQUIREMENT)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SDIST
    if proc.returncode != 0 or not path.is_file():
        output = proc.stderr + proc.stdout
        offline = re.search(r"Failed to establish a new connection: ([^'\"]+)", output)
        lines = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("ERROR")] or ["no output"]
        reason = f"cannot reach the package index: {offline.group(1).strip()}" if offline else lines[-1][:200]
        raise DownloadError(f"pip could not download {REQUIREMENT} ({reason}); check the network and pip's index "
                            f"settings, or put {SDIST} into {dest.parent}")
    return path


def sdist(cache: Path) -> Path:
    """The verified sdist in the download cache, fetched with pip only when it is missing or corrupt."""
    path = cache / SDIST
    if path.is_file():
        try:
            verify(path, CHECKSUM)
            return path
        except DownloadError as err:
            log.warning("%s: fetching it again", str(err).split(";")[0])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=cache))
    try:
        got = _pip_download(tmp)
        verify(got, CHECKSUM)
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def fetch(ctx: SourceContext) -> None:
    archive = sdist(ctx.cache)
    stamp = ctx.dest / ".extracted.json"
    if not ctx.force and stamp.is_file() and all((ctx.dest / f).is_file() for f in FILES):
        return
    stamp.unlink(missing_ok=True)
    safe_extract(archive, ctx.dest, include=_WANTED.__contains__, strip_components=1)
    atomic_write_json(stamp, {"archive": SDIST, "checksum": CHECKSUM})


def read_class_maps(path: Path) -> dict[str, dict[int, str]]:
    """The ``class_map`` dict of TotalSegmentator's map_to_binary.py, parsed as data (never imported)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "class_map" and isinstance(node.value, ast.Dict)):
            maps = {}
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in ("total", "total_mr"):
                    maps[key.value] = ast.literal_eval(value)
            if set(maps) == {"total", "total_mr"}:
                return maps
    raise DownloadError(f"{path}: no class_map with 'total' and 'total_mr' entries")


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    maps = {task: label_map(raw) for task, raw in read_class_maps(ctx.dest / CLASS_MAP_FILE).items()}
    folder = ctx.dest / REFERENCE
    for case_id, image, label, task, modality, patient in CASES:
        yield Candidate(case_id, partial(Case.from_source, ctx.name, case_id, patient, modality, folder / image,
                                         folder / label, maps[task], annotation="model",
                                         notes=NOTES.get(case_id, ())))
