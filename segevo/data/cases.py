"""The case table: one row per raw image, whatever its source, written by ``segevo download``.

It is the input of every later data stage, so each row carries what they need without opening the source's
own files again: the patient (for patient-level splits), the modality (for the adapter routing), the label map
in the unified vocabulary, the classes actually present, and the SHA256 of the raw image (provenance).

Stored as JSON rather than CSV because a row holds a mapping (label value -> name) and lists (channels,
classes present), and the table carries per-source metadata (licence, whether labels are manual or model
output) that a CSV would have to repeat on every row. Paths are relative to the table's folder, so the data
root can move.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segevo.errors import UserError
from segevo.io import atomic_write_json, read_json

TABLE_VERSION = 1
ANNOTATIONS = ("manual", "model")
_MODALITY = re.compile(r"^(CT|MRI)(-[A-Za-z0-9]+)*$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CaseError(UserError):
    """A raw case is unusable: unreadable, mis-shaped, or labelled outside its source's class map."""


def base_modality(modality: str) -> str:
    """``MRI-T2`` -> ``MRI``: the part the adapters route on."""
    return modality.split("-", 1)[0]


@dataclass(frozen=True)
class Case:
    """One raw image with its label. ``label_map`` maps label values (M3D-Seg: channel index + 1) to names."""

    source: str
    case_id: str
    patient_id: str
    modality: str
    image: Path
    label: Path | None
    label_map: dict[int, str]
    image_sha256: str
    format: str = "nifti"
    subset: str | None = None  # the split the source publishes the case in: train / val / test
    channels: tuple[str, ...] = ()  # sequence per channel of a multi-channel image (MSD BraTS: FLAIR, T1w, ...)
    annotation: str = "manual"  # "model": the labels are a model's output, not a person's
    labels_present: tuple[str, ...] = ()
    origin: Path | None = None  # the file or DICOM folder this NIfTI was converted from
    segvol_seen: bool = False  # listed for training in M3D-Seg, i.e. SegVol was trained on it
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _SAFE_ID.match(self.case_id):
            raise CaseError(f"{self.source}/{self.case_id}: case ids may only hold letters, digits, '.', '_', '-' "
                            f"(later stages name files after them)")
        if not _MODALITY.match(self.modality):
            raise CaseError(f"{self.source}/{self.case_id}: unknown modality {self.modality!r} "
                            f"(expected CT or MRI, optionally refined like MRI-T2)")
        from segevo.data.readers import READERS  # the registry imports this module: looked up on use

        if self.format not in READERS:
            raise CaseError(f"{self.source}/{self.case_id}: unknown format {self.format!r}")
        if self.annotation not in ANNOTATIONS:
            raise CaseError(f"{self.source}/{self.case_id}: unknown annotation kind {self.annotation!r}")

    @classmethod
    def from_source(cls, source: str, case_id: str, patient_id: str, modality: str, image: Path,
                    label: Path | None, label_map: dict[int, str], *, hashed: list[Path] | None = None,
                    **fields: Any) -> Case:
        """A case as a source lists it; the provenance checksum is of ``hashed`` (default: the image file)."""
        return cls(source=source, case_id=case_id, patient_id=patient_id, modality=modality, image=image,
                   label=label, label_map=label_map, image_sha256=sha256_files(hashed or [image]), **fields)

    @property
    def key(self) -> str:
        return f"{self.source}/{self.case_id}"

    def to_row(self, base: Path) -> dict[str, Any]:
        def rel(p: Path | None) -> str | None:
            return None if p is None else Path(p).resolve().relative_to(base.resolve()).as_posix()

        row = dataclasses.asdict(self)
        row.update(image=rel(self.image), label=rel(self.label), origin=rel(self.origin),
                   label_map={str(k): v for k, v in self.label_map.items()},
                   channels=list(self.channels), labels_present=list(self.labels_present), notes=list(self.notes))
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], base: Path) -> Case:
        def path(p: str | None) -> Path | None:
            return None if p is None else base / p

        return cls(**{**row, "image": base / row["image"], "label": path(row.get("label")),
                      "origin": path(row.get("origin")),
                      "label_map": {int(k): v for k, v in row["label_map"].items()},
                      "channels": tuple(row.get("channels", ())), "notes": tuple(row.get("notes", ())),
                      "labels_present": tuple(row.get("labels_present", ()))})


@dataclass
class CaseTable:
    cases: list[Case]
    sources: dict[str, dict[str, Any]]  # per source: licence, annotation, where it came from, options
    skipped: list[dict[str, str]]  # cases left out with data.skip_bad_cases, and why


def write_case_table(path: Path, table: CaseTable) -> Path:
    base = path.parent
    return atomic_write_json(path, {
        "version": TABLE_VERSION,
        "sources": table.sources,
        "cases": [c.to_row(base) for c in table.cases],
        "skipped": table.skipped,
    })


def read_case_table(path: str | Path) -> CaseTable:
    """``cases.json`` checked: an object with ``version``, ``sources``, ``skipped`` and ``cases`` rows that
    :meth:`Case.from_row` accepts; every error names the file (and the row)."""
    path = Path(path)
    if not path.exists():
        raise CaseError(f"{path}: case table not found; run 'segevo download' first")
    data = read_json(path, "case table", CaseError)
    if data.get("version") != TABLE_VERSION:
        raise CaseError(f"{path}: case table version {data.get('version')!r}, expected {TABLE_VERSION}; "
                        f"run 'segevo download --force'")
    rows, sources, skipped = data.get("cases"), data.get("sources"), data.get("skipped", [])
    if not isinstance(rows, list) or not isinstance(sources, dict) or not isinstance(skipped, list):
        raise CaseError(f"{path}: malformed case table: expected 'cases' and 'skipped' lists and a 'sources' object")
    base = path.parent
    cases = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise TypeError(f"a row must be an object, got {type(row).__name__}")
            cases.append(Case.from_row(row, base))
        except CaseError as err:
            raise CaseError(f"{path}: cases[{i}]: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            raise CaseError(f"{path}: malformed case table: cases[{i}]: {detail}") from None
    return CaseTable(cases, sources, skipped)


def sha256_files(paths: Iterable[Path]) -> str:
    """SHA256 of a file, or of several files' bytes in the given order (a DICOM series, a MetaImage pair)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()
