"""The Medical Segmentation Decathlon (CC BY-SA 4.0): one tarball per task, from the S3 bucket MONAI's
``DecathlonDataset`` uses, with the MD5 sums MONAI pins.

Each tarball unpacks to ``<Task>/{dataset.json, imagesTr, labelsTr, imagesTs}``; ``dataset.json`` names the
labels and the image channels, and lists the training pairs and the (unlabelled) test images. The archives also
carry macOS ``._*`` side files, which are ignored. Case names carry their task ("hippocampus_001"), so they
are the case ids. Every case is a different patient as far as the data says,
so the patient id is the case id (scoped by task).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from segevo.config import DataConfig
from segevo.data.cases import Case, CaseError
from segevo.data.sources.base import Candidate, SourceContext, fetch_and_extract
from segevo.data.vocabulary import label_map

VERSION = 1
BASE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
META = {"licence": "CC BY-SA 4.0", "annotation": "manual", "homepage": "http://medicaldecathlon.com/"}
# task -> (md5 of <task>.tar, modality of its images)
TASKS: dict[str, tuple[str, str]] = {
    "Task01_BrainTumour": ("240a19d752f0d9e9101544901065d872", "MRI"),
    "Task02_Heart": ("06ee59366e1e5124267b774dbd654057", "MRI"),
    "Task03_Liver": ("a90ec6c4aa7f6a3d087205e23d4e6397", "CT"),
    "Task04_Hippocampus": ("9d24dba78a72977dbd1d2e110310f31b", "MRI"),
    "Task05_Prostate": ("35138f08b1efaef89d7424d2bcc928db", "MRI"),
    "Task06_Lung": ("8afd997733c7fc0432f71255ba4e52dc", "CT"),
    "Task07_Pancreas": ("4f7080cfca169fa8066d17ce6eb061e4", "CT"),
    "Task08_HepaticVessel": ("641d79e80ec66453921d997fbf12a29c", "CT"),
    "Task09_Spleen": ("410d4a301da4e5b2f6f86ec3ddba524e", "CT"),
    "Task10_Colon": ("bad7a188931dc2f6acf72b08eb6202d0", "CT"),
}


def options(cfg: DataConfig) -> dict:
    return {"tasks": list(cfg.msd.tasks)}


def patient_id(task: str, case: str) -> str:
    """Shared with M3D-Seg, whose MSD-derived data sets hold the same scans."""
    return f"msd-{task}-{case}"


def fetch(ctx: SourceContext) -> None:
    for task in ctx.config.msd.tasks:
        fetch_and_extract(ctx, ctx.remote(BASE_URL, f"{task}.tar", f"md5:{TASKS[task][0]}"))


def _case_name(path: str) -> str:
    return Path(path).name.removesuffix(".nii.gz")


def candidates(ctx: SourceContext) -> Iterator[Candidate]:
    for task in ctx.config.msd.tasks:
        folder = ctx.dest / task
        spec_path = folder / "dataset.json"
        try:
            spec = json.loads(spec_path.read_text())
            labels = label_map(spec["labels"], context=f"msd/{task}")
            channels = [spec["modality"][k] for k in sorted(spec["modality"], key=int)]
            pairs = [(p["image"], p["label"], "train") for p in spec["training"]]
            pairs += [(p if isinstance(p, str) else p["image"], None, "test") for p in spec.get("test", [])]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CaseError(f"{spec_path}: not a readable MSD dataset.json ({type(err).__name__}: {err})") from None
        for image, label, subset in pairs:
            case = _case_name(image)
            yield Candidate(case, partial(
                Case.from_source, ctx.name, case, patient_id(task, case), TASKS[task][1], folder / image,
                None if label is None else folder / label, labels, subset=subset,
                channels=tuple(channels) if len(channels) > 1 else ()))
