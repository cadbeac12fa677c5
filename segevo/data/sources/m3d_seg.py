"""M3D-Seg: 25 CT data sets preprocessed by SegVol's authors (codes 0000-0024), one zip per data set from the
Hugging Face dataset ``GoodBaiBai88/M3D-Seg``.

A zip unpacks to ``<code>/<code>.json`` (MSD-like: labels, modality, train/test lists) and one folder per case
with ``image.npy`` (1, X, Y, Z), already foreground-normalised, and ``mask_(K, X, Y, Z).npz``, a sparse
(K, X*Y*Z) matrix with one binary channel per label (channels may overlap, so no single label map exists).
Rows use ``format: m3d`` and label values are channel index + 1. The code pins no checksum: Hugging Face shows
each file's LFS sha256 on its page, which ``data.checksums["m3d_seg/<file>"]`` pins; otherwise the first
download's SHA256 is recorded and checked from then on. 0024 (LUNA16) is published in several archives
(``data.m3d_seg.parts``), not as one zip.

Several data sets re-package sources segevo also fetches directly (0002 AMOS, 0018-0023 MSD tasks). When a
case folder keeps the original name (``spleen_2``, ``amos_0507``), the patient id is the one the direct
source uses, so a patient-level split keeps both copies together. M3D-Seg labels all AMOS scans CT; ids above
500 are MRI (see ``amos22``) and are listed as such, with a note.

SegVol was trained on the train lists of every M3D-Seg data set: those cases are marked ``segvol_seen``, and
the split keeps them, and every case of the same patient in another source, out of the test split.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from segevo.config import DataConfig
from segevo.data.cases import Case, CaseError
from segevo.data.sources import amos22, msd
from segevo.data.sources.base import Candidate, SourceContext, fetch_and_extract
from segevo.data.vocabulary import label_map

VERSION = 2
BASE_URL = "https://huggingface.co/datasets/GoodBaiBai88/M3D-Seg/resolve/main/M3D_Seg"
META = {"licence": "per original data set (see the M3D-Seg dataset card)", "annotation": "manual",
        "homepage": "https://huggingface.co/datasets/GoodBaiBai88/M3D-Seg"}
NAMES = {
    "0000": "CHAOS", "0001": "HaN-Seg", "0002": "AMOS22", "0003": "AbdomenCT-1k", "0004": "KiTS23",
    "0005": "KiPA22", "0006": "KiTS19", "0007": "BTCV", "0008": "Pancreas-CT", "0009": "3D-IRCADb",
    "0010": "FLARE22", "0011": "TotalSegmentator", "0012": "CT-ORG", "0013": "WORD", "0014": "VerSe19",
    "0015": "VerSe20", "0016": "SLIVER07", "0017": "QUBIQ", "0018": "MSD-Colon", "0019": "MSD-HepaticVessel",
    "0020": "MSD-Liver", "0021": "MSD-Lung", "0022": "MSD-Pancreas", "0023": "MSD-Spleen", "0024": "LUNA16",
}
MSD_TASKS = {"0018": "Task10_Colon", "0019": "Task08_HepaticVessel", "0020": "Task03_Liver", "0021": "Task06_Lung",
             "0022": "Task07_Pancreas", "0023": "Task09_Spleen"}
_MSD_NAME = re.compile(r"^(colon|hepaticvessel|liver|lung|pancreas|spleen)_\d+$")
_AMOS_NAME = re.compile(r"^amos_(\d{4})$")
_MODALITIES = {"CT": "CT", "MR": "MRI", "MRI": "MRI"}
PUBLISHED_IN_PARTS = {"0024"}  # LUNA16: several archives on Hugging Face, no 0024.zip


def options(cfg: DataConfig) -> dict:
    return {"datasets": list(cfg.m3d_seg.datasets), "parts": archives(cfg)}


def archives(cfg: DataConfig) -> dict[str, list[str]]:
    """The archive file names of each requested data set: ``<code>.zip``, or its parts."""
    out = {}
    for code in cfg.m3d_seg.datasets:
        if code in PUBLISHED_IN_PARTS and code not in cfg.m3d_seg.parts:
            raise CaseError(f"M3D-Seg {code} is published in parts, not as {code}.zip: list the part file names "
                            f"under data.m3d_seg.parts.{code} (see the dataset's Hugging Face file listing)")
        out[code] = list(cfg.m3d_seg.parts.get(code, [f"{code}.zip"]))
    return out


def fetch(ctx: SourceContext) -> None:
    for code, names in archives(ctx.config).items():
        if names == [f"{code}.zip"]:
            fetch_and_extract(ctx, ctx.remote(BASE_URL, names[0], None))
            continue
        for name in names:  # each part an archive of its own, unpacked into its own folder (same top folder)
            part = dataclasses.replace(ctx, dest=ctx.dest / f"{code}-parts" / name.split(".", 1)[0])
            fetch_and_extract(part, ctx.remote(BASE_URL, name, None))


def _identity(code: str, case: str, modality: str) -> tuple[str, str, tuple[str, ...]]:
    """(patient id, modality, notes): the direct source's patient id when the case keeps its original name."""
    if code in MSD_TASKS and _MSD_NAME.match(case):
        return msd.patient_id(MSD_TASKS[code], case), modality, ()
    if code == "0002" and (m := _AMOS_NAME.match(case)):
        number = int(m.group(1))
        if amos22.modality_from_id(number) == "MRI":
            return amos22.patient_id(number), "MRI", ("M3D-Seg labels this AMOS MRI scan as CT",)
        return amos22.patient_id(number), modality, ()
    return f"m3d-{code}-{case}", modality, ()


def _specs(dest: Path, code: str) -> list[tuple[Path, dict]]:
    """Every ``<code>/<code>.json`` unpacked (one per archive part), in path order."""
    found = sorted(p for p in dest.rglob(f"{code}.json") if p.parent.name == code)
    if not found:
        raise CaseError(f"{dest}: no {code}/{code}.json in the unpacked M3D-Seg archive")
    specs = []
    for path in found:
        try:
            specs.append((path, json.loads(path.read_text())))
        except (OSError, ValueError) as err:
            raise CaseError(f"{path}: not readable JSON ({err})") from None
    return specs


def _rows(path: Path, spec: dict, code: str) -> tuple[dict[int, str], str, list]:
    """(class map, modality, [(image parts, label parts, subset)]) of one data set JSON."""
    try:
        labels = label_map(spec["labels"], context=f"m3d/{code}")
        kinds = {_MODALITIES.get(str(v).upper()) for v in spec.get("modality", {"0": "CT"}).values()}
        entries = [(e, "train") for e in spec.get("train", [])] + [(e, "test") for e in spec.get("test", [])]
        rows = [(Path(e["image"]).parts[-2:], Path(e["label"]).parts[-2:], subset) for e, subset in entries]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CaseError(f"{path}: unexpected M3D-Seg dataset JSON ({type(err).__name__}: {err})") from None
    if len(kinds) != 1 or None in kinds:
        raise CaseError(f"{path}: modality {spec.get('modality')!r} is not one of CT or MRI")
    return labels, kinds.pop(), rows


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    for code in ctx.config.m3d_seg.datasets:
        seen: set[str] = set()
        specs = _specs(ctx.dest, code)
        for path, spec in specs:
            labels, modality, rows = _rows(path, spec, code)
            for image_parts, label_parts, subset in rows:
                case = image_parts[0]
                held = len(specs) == 1 or path.parent.joinpath(*image_parts).exists()
                if case in seen or not held:
                    continue  # listed by several parts, or by a part that does not hold it
                seen.add(case)
                patient, kind, notes = _identity(code, case, modality)
                yield Candidate(f"{code}_{case}", partial(
                    Case.from_source, ctx.name, f"{code}_{case}", patient, kind, path.parent.joinpath(*image_parts),
                    path.parent.joinpath(*label_parts), labels, format="m3d", subset=subset, notes=notes,
                    segvol_seen=subset == "train"))
