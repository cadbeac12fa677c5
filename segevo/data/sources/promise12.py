"""PROMISE12: 50 prostate T2-weighted MRI with whole-gland labels, MetaImage files, from Zenodo record 8026660.

``training_data.zip`` holds ``CaseNN.mhd`` + ``.raw`` and ``CaseNN_segmentation.mhd`` + ``.raw``; the folder
they sit in is found, not assumed. Each pair is converted once to NIfTI (RAS) under ``nifti/``; the case
table's checksum is that of the original header and data files. One case per patient.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from segevo.config import DataConfig
from segevo.data.cases import Case
from segevo.data.formats import metaimage_files, read_metaimage, save_nifti
from segevo.data.sources.base import Candidate, SourceContext, fetch_and_extract
from segevo.data.vocabulary import label_map

VERSION = 1
BASE_URL = "https://zenodo.org/records/8026660/files"
ARCHIVE = "training_data.zip"
CHECKSUM = "md5:f6d23994117c989daf07e5291edd0aea"
META = {"licence": "PROMISE12 challenge terms, see https://zenodo.org/records/8026660", "annotation": "manual",
        "homepage": "https://promise12.grand-challenge.org/"}
LABELS = {1: "prostate"}
_NAME = re.compile(r"^Case(\d+)\.mhd$")


def options(cfg: DataConfig) -> dict:
    return {"archive": ARCHIVE}


def fetch(ctx: SourceContext) -> None:
    if fetch_and_extract(ctx, ctx.remote(BASE_URL, ARCHIVE, CHECKSUM)):
        shutil.rmtree(ctx.dest / "nifti", ignore_errors=True)  # converted from the previous extraction


def convert(source: Path, target: Path, label: bool = False) -> Path:
    """MetaImage -> NIfTI, once (the write is atomic, so an existing target is complete)."""
    if not target.is_file():
        array, affine = read_metaimage(source)
        if label and array.dtype.kind in "iu" and array.size and array.min() >= 0 and array.max() <= 255:
            array = array.astype(np.uint8)
        save_nifti(array, affine, target)
    return target


def _case(source: str, case: str, header: Path, out: Path, labels: dict[int, str]) -> Case:
    image = convert(header, out / f"{case}.nii.gz")
    label = convert(header.with_name(f"{case}_segmentation.mhd"), out / f"{case}_segmentation.nii.gz", label=True)
    return Case.from_source(source, case, f"promise12-{case}", "MRI-T2", image, label, labels,
                            hashed=metaimage_files(header), subset="train", origin=header)


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    labels = label_map(LABELS)
    out = ctx.dest / "nifti"
    headers = sorted(p for p in ctx.dest.rglob("Case*.mhd") if _NAME.match(p.name) and out not in p.parents)
    for header in headers:
        case = header.name.removesuffix(".mhd")
        yield Candidate(case, partial(_case, ctx.name, case, header, out, labels))
