"""CHAOS (CC BY-NC-SA 4.0): healthy abdomens, CT with liver labels and MR (T1-DUAL in/opposed phase, T2-SPIR)
with liver, kidneys and spleen, from Zenodo record 3431873.

``CHAOS_Train_Sets.zip`` holds DICOM series with one PNG mask per slice::

    Train_Sets/CT/<n>/DICOM_anon/*.dcm               Train_Sets/CT/<n>/Ground/*.png
    Train_Sets/MR/<n>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm   Train_Sets/MR/<n>/T1DUAL/Ground/*.png
    Train_Sets/MR/<n>/T2SPIR/DICOM_anon/*.dcm        Train_Sets/MR/<n>/T2SPIR/Ground/*.png

Each series becomes one NIfTI case under ``nifti/``. The i-th PNG in file-name order is the mask of the i-th
DICOM file in file-name order (CHAOS names them in step: ``IMG-0004-00001.dcm`` / ``.png``); the pairs are
then stacked along the slice normal. MR masks use grey levels per organ (liver 63, right kidney 126, left
kidney 189, spleen 252, with the ranges the organisers give); CT masks mark the liver only. The in- and
opposed-phase T1 series share one mask. CT and MR patients are different people numbered independently, so
patient ids keep the modality ("chaos-mr-1" is not "chaos-ct-1"); the three MR series of one number are one
patient.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from segevo.config import DataConfig
from segevo.data.cases import Case, CaseError
from segevo.data.formats import FormatError, natural_key, read_dicom_series, save_nifti
from segevo.data.sources.base import Candidate, SourceContext, fetch_and_extract
from segevo.data.vocabulary import label_map

VERSION = 1
BASE_URL = "https://zenodo.org/records/3431873/files"
ARCHIVE = "CHAOS_Train_Sets.zip"
CHECKSUM = "sha256:535f7d3417a0e0f0d9133fb3d962423d2a9cf3f103e4f09a3d8a1daf87d5d2fc"
META = {"licence": "CC BY-NC-SA 4.0", "annotation": "manual", "homepage": "https://chaos.grand-challenge.org/"}
CT_LABELS = {1: "liver"}
MR_LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
# MR mask grey levels: inclusive range -> label value (CHAOS data description)
MR_GREY = (((55, 70), 1), ((110, 135), 2), ((175, 200), 3), ((240, 255), 4))


def options(cfg: DataConfig) -> dict:
    return {"archive": ARCHIVE}


def fetch(ctx: SourceContext) -> None:
    if fetch_and_extract(ctx, ctx.remote(BASE_URL, ARCHIVE, CHECKSUM)):
        shutil.rmtree(ctx.dest / "nifti", ignore_errors=True)  # converted from the previous extraction


def _train_sets(dest: Path) -> Path:
    found = sorted(p for p in dest.rglob("Train_Sets") if (p / "CT").is_dir() or (p / "MR").is_dir())
    if not found:
        raise CaseError(f"{dest}: no Train_Sets/CT or Train_Sets/MR folder in the unpacked CHAOS archive")
    return found[0]


def mask_values(grey: np.ndarray, mr: bool, where: Path) -> np.ndarray:
    """PNG grey levels -> label values; a grey level outside every organ's range is an error."""
    if not mr:
        return (grey > 0).astype(np.uint8)
    out = np.zeros(grey.shape, np.uint8)
    known = grey == 0
    for (low, high), value in MR_GREY:
        hit = (grey >= low) & (grey <= high)
        out[hit] = value
        known |= hit
    if not known.all():
        raise CaseError(f"{where}: mask grey levels {sorted(np.unique(grey[~known]).tolist())[:10]} match no organ")
    return out


def _read_mask(pngs: list[Path], order: list[int], mr: bool) -> np.ndarray:
    from PIL import Image

    planes = []
    for i in order:
        with Image.open(pngs[i]) as im:
            grey = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16") else im)
        planes.append(mask_values(grey, mr, pngs[i]))
    return np.stack(planes, axis=-1).transpose(1, 0, 2)


def convert_series(dicom_dir: Path, ground: Path, image_out: Path, label_out: Path, mr: bool) -> None:
    """One DICOM series and its PNG masks -> two NIfTI files (skipped when both exist: writes are atomic)."""
    if image_out.is_file() and label_out.is_file():
        return
    files = _dicom_files(dicom_dir)
    pngs = sorted(ground.glob("*.png"), key=natural_key)
    if len(files) != len(pngs):
        raise CaseError(f"{dicom_dir}: {len(files)} DICOM slices but {len(pngs)} masks in {ground}")
    volume, affine, order = read_dicom_series(files)
    mask = _read_mask(pngs, order, mr)
    if mask.shape != volume.shape:
        raise FormatError(f"{ground}: masks of {mask.shape[:2]} pixels do not fit slices of {volume.shape[:2]}")
    save_nifti(mask, affine, label_out)
    save_nifti(volume, affine, image_out)


def _series(root: Path) -> Iterator[tuple[str, str, str, Path, Path, bool]]:
    """(case id, patient id, modality, DICOM folder, mask folder, is MR) for every series on disk."""
    for folder in sorted((root / "CT").glob("*"), key=natural_key):
        if folder.is_dir():
            yield (f"ct_{folder.name}", f"chaos-ct-{folder.name}", "CT", folder / "DICOM_anon", folder / "Ground",
                   False)
    for folder in sorted((root / "MR").glob("*"), key=natural_key):
        if not folder.is_dir():
            continue
        t1 = folder / "T1DUAL"
        for phase, tag in (("InPhase", "inphase"), ("OutPhase", "outphase")):
            yield (f"mr_{folder.name}_t1_{tag}", f"chaos-mr-{folder.name}", "MRI-T1", t1 / "DICOM_anon" / phase,
                   t1 / "Ground", True)
        t2 = folder / "T2SPIR"
        yield f"mr_{folder.name}_t2", f"chaos-mr-{folder.name}", "MRI-T2", t2 / "DICOM_anon", t2 / "Ground", True


def _dicom_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=natural_key)


def _case(source: str, case_id: str, patient: str, modality: str, dicom_dir: Path, ground: Path, out: Path,
          labels: dict[int, str], mr: bool) -> Case:
    image, label = out / f"{case_id}.nii.gz", out / f"{case_id}_label.nii.gz"
    convert_series(dicom_dir, ground, image, label, mr)
    return Case.from_source(source, case_id, patient, modality, image, label, labels,
                            hashed=_dicom_files(dicom_dir), subset="train", origin=dicom_dir)


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    maps = {False: label_map(CT_LABELS), True: label_map(MR_LABELS)}
    out = ctx.dest / "nifti"
    for case_id, patient, modality, dicom_dir, ground, mr in _series(_train_sets(ctx.dest)):
        yield Candidate(case_id, partial(_case, ctx.name, case_id, patient, modality, dicom_dir, ground, out,
                                         maps[mr], mr))
