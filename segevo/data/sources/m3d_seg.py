"""M3D-Seg: 25 CT data sets preprocessed by SegVol's authors (codes 0000-0024), one zip per data set from the
Hugging Face dataset ``GoodBaiBai88/M3D-Seg``.

A zip unpacks to ``<code>/<code>.json`` (MSD-like: labels, modality, train/test lists) and one folder per case
with ``image.npy`` (1, X, Y, Z), already foreground-normalised, and ``mask_(K, X, Y, Z).npz``, a sparse
(K, X*Y*Z) matrix with one binary channel per label (channels may overlap, so no single label map exists).
Rows use ``format: m3d`` and label values are channel index + 1. Hugging Face shows no checksum here, so the
first download's SHA256 is recorded and checked from then on.

Several data sets re-package sources segevo also fetches directly (0002 AMOS, 0018-0023 MSD tasks). When a
case folder keeps the original name (``spleen_2``, ``amos_0507``), the patient id is the one the direct
source uses, so a patient-level split keeps both copies together. M3D-Seg labels all AMOS scans CT; ids above
500 are MRI (see ``amos22``) and are listed as such, with a note.

SegVol was trained on the train lists of every M3D-Seg data set: those cases are marked ``segvol_seen``, and
the split keeps them, and every case of the same patient in another source, out of the test split.
"""

from __future__ import annotations

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


def options(cfg: DataConfig) -> dict:
    return {"datasets": list(cfg.m3d_seg.datasets)}


def fetch(ctx: SourceContext) -> None:
    for code in ctx.config.m3d_seg.datasets:
        fetch_and_extract(ctx, ctx.remote(BASE_URL, f"{code}.zip", None))


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


def _spec(dest: Path, code: str) -> tuple[Path, dict]:
    found = sorted(p for p in dest.rglob(f"{code}.json") if p.parent.name == code)
    if not found:
        raise CaseError(f"{dest}: no {code}/{code}.json in the unpacked M3D-Seg archive")
    try:
        return found[0], json.loads(found[0].read_text())
    except (OSError, ValueError) as err:
        raise CaseError(f"{found[0]}: not readable JSON ({err})") from None


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    for code in ctx.config.m3d_seg.datasets:
        path, spec = _spec(ctx.dest, code)
        try:
            labels = label_map(spec["labels"], context=f"m3d/{code}")
            kinds = {_MODALITIES.get(str(v).upper()) for v in spec.get("modality", {"0": "CT"}).values()}
            entries = [(e, "train") for e in spec.get("train", [])] + [(e, "test") for e in spec.get("test", [])]
            rows = [(Path(e["image"]).parts[-2:], Path(e["label"]).parts[-2:], subset) for e, subset in entries]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CaseError(f"{path}: unexpected M3D-Seg dataset JSON ({type(err).__name__}: {err})") from None
        if len(kinds) != 1 or None in kinds:
            raise CaseError(f"{path}: modality {spec.get('modality')!r} is not one of CT or MRI")
        modality = kinds.pop()
        for image_parts, label_parts, subset in rows:
            case = image_parts[0]
            patient, kind, notes = _identity(code, case, modality)
            yield Candidate(f"{code}_{case}", partial(
                Case.from_source, ctx.name, f"{code}_{case}", patient, kind, path.parent.joinpath(*image_parts),
                path.parent.joinpath(*label_parts), labels, format="m3d", subset=subset, notes=notes,
                segvol_seen=subset == "train"))
