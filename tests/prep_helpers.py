"""Synthetic prep caches for tests: small volumes written in the manifest's layout (no preprocess needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segevo.data.manifest import PrepCase, write_manifest

ROI = (8, 32, 32)


def nearest(a: np.ndarray, roi: tuple[int, int, int] = ROI) -> np.ndarray:
    """Nearest-neighbour resize to the ROI (what preprocess stores as the zoom-out copies)."""
    idx = [np.minimum(np.arange(r) * s // r, s - 1) for r, s in zip(roi, a.shape, strict=True)]
    return a[np.ix_(*idx)].copy()


def write_case(root: Path, name: str, modality: str, shape, classes, pseudo: bool, seed: int,
               roi: tuple[int, int, int] = ROI) -> PrepCase:
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    image = rng.random(shape).astype(np.float16)
    label = np.zeros(shape, np.uint8)
    d, h, w = shape
    label[d // 4 : d // 2, h // 4 : h // 2, w // 4 : w // 2] = 1
    if len(classes) > 1:
        label[d // 2 : d - 2, h // 2 : h - 3, 2:6] = 2
    arrays = {"image": image, "label": label, "zoom_image": nearest(image, roi), "zoom_label": nearest(label, roi)}
    if pseudo:
        p = (np.arange(np.prod(shape)).reshape(shape) // (np.prod(shape) // 5)).astype(np.int16)
        arrays["pseudo"], arrays["zoom_pseudo"] = p, nearest(p, roi)
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", value)
    rel = {k: f"{name}/{k}.npy" for k in arrays}
    voxels = {c: int((label == i + 1).sum()) for i, c in enumerate(classes)}
    return PrepCase(source=name.split("_")[0], case_id=name, patient_id=name, modality=modality,
                    classes=tuple(classes), image=rel["image"], label=rel["label"], zoom_image=rel["zoom_image"],
                    zoom_label=rel["zoom_label"], pseudo=rel.get("pseudo"), zoom_pseudo=rel.get("zoom_pseudo"),
                    shape=shape, raw_shape=shape[::-1], crop_start=(0, 0, 0), crop_end=shape,
                    spacing=(1.0, 1.0, 1.0), affine=tuple(tuple(r) for r in np.eye(4)), raw_sha256="0" * 64,
                    voxels=voxels)



def write_prep(root: Path, roi: tuple[int, int, int] = ROI, val: tuple[int, ...] = (1,)) -> list[PrepCase]:
    """Three cases (two CT patients, one MRI) + manifest + a split that trains on all and validates on the cases
    ``val`` (indices; the default is the second CT case)."""
    prep = root / "prep"
    cases = [
        write_case(prep, "demo_ct1", "CT", (12, 40, 44), ["liver", "spleen"], pseudo=True, seed=0, roi=roi),
        write_case(prep, "demo_ct2", "CT", (10, 36, 40), ["liver"], pseudo=False, seed=1, roi=roi),
        write_case(prep, "demo_mr1", "MRI-T2", (10, 36, 36), ["liver", "kidney"], pseudo=True, seed=2, roi=roi),
    ]
    write_manifest(prep / "manifest.json", cases, {"synthetic": True})
    keys = [c.key for c in cases]
    split = {"seed": 0, "train": keys, "val": [keys[i] for i in val], "test": [], "subsets": {"2": keys[:2]}}
    (root / "split.json").write_text(json.dumps(split))
    return cases
