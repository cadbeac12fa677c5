"""AMOS22 (CC BY 4.0): 500 CT and 100 MRI abdominal scans, 15 organs, from Zenodo record 7262581.

``amos22.zip`` unpacks to ``amos22/{imagesTr,labelsTr,imagesVa,labelsVa,imagesTs}/amos_XXXX.nii.gz``; the
test images have no labels. Zenodo publishes no checksum for this record, so the first download's SHA256 is
recorded and checked from then on (the older record 7155725 has another file).

Modality comes from the id: AMOS documents ids below 500 as CT and the rest as MRI, but also 500 CT + 100
MRI on ids 1-600, which makes amos_0500 CT. The two readings disagree on that one id only, so for it the
image decides: CT holds air far below -200 HU, MRI magnitudes are never negative. The MRI scans have no
bladder or prostate/uterus labels (values 14, 15); the label map is the same. Each id is treated as its own
patient: the data carries no patient identifier.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from segevo.config import DataConfig
from segevo.data.cases import Case
from segevo.data.fetch import download
from segevo.data.sources.base import Candidate, SourceContext, fetch_and_extract
from segevo.data.vocabulary import label_map

VERSION = 1
BASE_URL = "https://zenodo.org/records/7262581/files"
ARCHIVE = "amos22.zip"
META_CSV = "labeled_data_meta_0000_0599.csv"
META = {"licence": "CC BY 4.0", "annotation": "manual", "homepage": "https://zenodo.org/records/7262581"}
# AMOS22's dataset.json, spelling included ("arota", "postcava")
LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus", 6: "liver",
          7: "stomach", 8: "arota", 9: "postcava", 10: "pancreas", 11: "right adrenal gland",
          12: "left adrenal gland", 13: "duodenum", 14: "bladder", 15: "prostate/uterus"}
SUBSETS = {"Tr": "train", "Va": "val", "Ts": "test"}
_NAME = re.compile(r"^amos_(\d{4})\.nii\.gz$")


def options(cfg: DataConfig) -> dict:
    return {"archive": ARCHIVE}


def patient_id(number: int) -> str:
    """Shared with M3D-Seg, whose AMOS data set (0002) holds the same scans."""
    return f"amos-{number:04d}"


def modality_from_id(number: int) -> str | None:
    """CT below 500, MRI above; None for 500, the one id the documentation leaves open."""
    return "CT" if number < 500 else "MRI" if number > 500 else None


def _modality_from_image(path: Path) -> str:
    import nibabel as nib

    return "CT" if float(np.min(np.asanyarray(nib.load(path).dataobj))) < -200 else "MRI"


def fetch(ctx: SourceContext) -> None:
    fetch_and_extract(ctx, ctx.remote(BASE_URL, ARCHIVE, None))
    download(ctx.remote(BASE_URL, META_CSV, None), ctx.dest)


def _case(source: str, case: str, number: int, image: Path, label: Path | None, labels: dict[int, str],
          subset: str) -> Case:
    modality = modality_from_id(number) or _modality_from_image(image)
    return Case.from_source(source, case, patient_id(number), modality, image, label, labels, subset=subset)


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    labels = label_map(LABELS)
    root = ctx.dest / "amos22"
    for tag, subset in SUBSETS.items():
        for image in sorted((root / f"images{tag}").glob("amos_*.nii.gz")):
            match = _NAME.match(image.name)
            if not match:
                continue
            number = int(match.group(1))
            label = None if tag == "Ts" else root / f"labels{tag}" / image.name
            case = image.name.removesuffix(".nii.gz")
            yield Candidate(case, partial(_case, ctx.name, case, number, image, label, labels, subset))
