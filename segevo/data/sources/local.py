"""Data a user already has on disk, in the nnU-Net raw layout or as plain image/label NIfTI pairs, so BraTS 2021,
SAML, the T2-weighted prostate set or an in-house collection (sets that need a login or an agreement, see the
README) come in without code: one ``data.local.sets`` entry per folder.

Files are hard-linked into ``<root>/raw/local/<set>/`` (copied when the folder is on another file system), so
the case table keeps its relative paths and the DVC cache can share the same inode. Case ids are
``<set>_<case>``; patient ids are ``local-<set>-<patient>``, the patient being the whole case name or the first
group of ``patient_pattern``.

nnU-Net raw (v2, or v1's ``modality``/``labels`` spelling): ``dataset.json`` names the channels
(``channel_names``) and the labels (name -> value, or value -> name in v1); ``imagesTr/<case>_<XXXX><ending>``
holds channel XXXX, ``labelsTr/<case><ending>`` its labels; ``imagesTs``/``labelsTs`` pairs are the set's own
test list. Only the configured channel is linked. Pairs: ``images/<case>.nii.gz`` with ``labels/<case>.nii.gz``
and ``classes`` in the config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from segevo.config import DataConfig, LocalSet
from segevo.data.cases import Case, CaseError
from segevo.data.sources.base import Candidate, SourceContext
from segevo.data.vocabulary import label_map

VERSION = 1
META = {"licence": "the user's own data: see each set's terms", "annotation": "manual",
        "homepage": "README.md, 'Data that needs a login'"}


def options(cfg: DataConfig) -> dict:
    return {"sets": [s.model_dump(mode="json") for s in cfg.local.sets]}


def fetch(ctx: SourceContext) -> None:
    for spec in ctx.config.local.sets:
        if not Path(spec.path).is_dir():
            raise CaseError(f"data.local.sets.{spec.name}: folder {spec.path} not found")


def place(src: Path, dest: Path) -> Path:
    """``src`` at ``dest``: a hard link (no second copy on disk), a copy across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)
    return dest


def _dataset_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: not found (the nnunet layout needs it; use layout: pairs otherwise)") from None
    except ValueError as err:
        raise CaseError(f"{path}: not valid JSON ({err})") from None


def _nnunet_spec(spec: LocalSet, folder: Path) -> tuple[dict[int, str], list[str], str]:
    """(class map, channel names, file ending) from an nnU-Net ``dataset.json`` (v2, or v1 spelling)."""
    data = _dataset_json(folder)
    try:
        channels = data.get("channel_names") or data["modality"]
        names = [str(channels[k]) for k in sorted(channels, key=int)]
        labels = data["labels"]
        if all(str(k).isdigit() for k in labels):  # v1: value -> name
            raw = {int(k): str(v) for k, v in labels.items()}
        else:  # v2: name -> value (a region list is not a label value)
            raw = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CaseError(f"{folder / 'dataset.json'}: not an nnU-Net dataset.json ({type(err).__name__}: {err})") \
            from None
    return label_map(raw, context=f"local/{spec.name}"), names, str(data.get("file_ending", ".nii.gz"))


def _channel(spec: LocalSet, names: list[str]) -> int:
    if isinstance(spec.channel, int):
        if spec.channel >= len(names):
            raise CaseError(f"data.local.sets.{spec.name}: channel {spec.channel} out of range ({names})")
        return spec.channel
    lowered = [n.lower() for n in names]
    if spec.channel.lower() not in lowered:
        raise CaseError(f"data.local.sets.{spec.name}: channel {spec.channel!r} is not one of {names}")
    return lowered.index(spec.channel.lower())


def _patient(spec: LocalSet, case: str) -> str:
    if spec.patient_pattern is None:
        return f"local-{spec.name}-{case}"
    match = re.search(spec.patient_pattern, case)
    if not match:
        raise CaseError(f"data.local.sets.{spec.name}: patient_pattern does not match case {case!r}")
    return f"local-{spec.name}-{match.group(1)}"


def _case(source: str, spec: LocalSet, dest: Path, case: str, modality: str, image: Path, label: Path,
          labels: dict[int, str], subset: str | None, ending: str) -> Case:
    if not label.is_file():
        raise CaseError(f"{label}: label file not found for image {image}")
    linked_image = place(image, dest / "images" / f"{case}{ending}")
    linked_label = place(label, dest / "labels" / f"{case}{ending}")
    return Case.from_source(source, f"{spec.name}_{case}", _patient(spec, case), modality, linked_image,
                            linked_label, labels, subset=spec.subset or subset)


def _nnunet(ctx: SourceContext, spec: LocalSet) -> Iterator[Candidate]:
    folder = Path(spec.path)
    labels, names, ending = _nnunet_spec(spec, folder)
    index = _channel(spec, names)
    modality = spec.modality or ("CT" if names[index].upper() == "CT" else "MRI")
    suffix = f"_{index:04d}{ending}"
    for images, label_dir, subset in (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test")):
        for image in sorted((folder / images).glob(f"*{suffix}")):
            case = image.name.removesuffix(suffix)
            label = folder / label_dir / f"{case}{ending}"
            if subset == "test" and not label.is_file():
                continue  # an unlabelled test image: nothing to learn or score on
            yield Candidate(f"{spec.name}_{case}", partial(_case, ctx.name, spec, ctx.dest / spec.name, case,
                                                           modality, image, label, labels, subset, ending))


def _pairs(ctx: SourceContext, spec: LocalSet) -> Iterator[Candidate]:
    folder = Path(spec.path)
    labels = label_map(spec.classes, context=f"local/{spec.name}")
    for image in sorted((folder / "images").glob("*.nii*")):
        ending = ".nii.gz" if image.name.endswith(".nii.gz") else ".nii"
        case = image.name.removesuffix(ending)
        yield Candidate(f"{spec.name}_{case}", partial(_case, ctx.name, spec, ctx.dest / spec.name, case,
                                                       str(spec.modality), image, folder / "labels" / image.name,
                                                       labels, None, ending))


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    for spec in ctx.config.local.sets:
        found = list(_nnunet(ctx, spec) if spec.layout == "nnunet" else _pairs(ctx, spec))
        if not found:
            raise CaseError(f"data.local.sets.{spec.name}: no {spec.layout} image found under {spec.path}")
        yield from found
