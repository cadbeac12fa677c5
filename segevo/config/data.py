"""The data side: sources (``data``), pseudo-masks (``pseudomask``), preprocessing (``preprocess``), the split
(``split``) and the training loader (``loader``)."""

from __future__ import annotations

import fnmatch
import re
from typing import Literal

from pydantic import Field, model_validator

from segevo.config.base import _Section


class PseudoMaskConfig(_Section):
    """SegVol's 3D Felzenszwalb-Huttenlocher pseudo-masks (its ``scale`` is unused upstream, so absent here).

    ``grid`` is the FH grid in the raw array order (SegVol: 256x256x32 before its axis transpose);
    ``cleanup_fraction`` is the training-time clean-up's size threshold as a fraction of the voxels.
    """

    sigma: float = Field(0.8, ge=0)
    min_size: int = Field(1000, ge=1)
    percentile: float = Field(25.0, gt=0, le=100)
    grid: tuple[int, int, int] = (256, 256, 32)
    cleanup_fraction: float = Field(0.001, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_grid(self) -> PseudoMaskConfig:
        if min(self.grid) <= 0:
            raise ValueError(f"grid {self.grid} must be positive on every axis")
        return self


class PreprocessConfig(_Section):
    """``segevo pseudomask`` and ``segevo preprocess``: how many processes, and which channel of a multi-channel
    image (MSD BraTS: FLAIR, T1w, t1gd, T2w) to keep: an index, or a sequence name as the case table lists it;
    ``channels`` sets it per source or per group of cases (``{"msd/BRATS_*": t1gd, "msd/prostate_*": T2}``).

    ``workers`` (default: one per CPU core, fewer when the available memory cannot hold that many of the run's
    largest volume, see ``segevo.data.resources``) changes no output, so the DVC stages do not depend on it.
    """

    workers: int | None = Field(None, ge=1)
    channel: int | str = Field(0)
    channels: dict[str, int | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        named = {"channel": self.channel, **{f"channels.{k}": v for k, v in self.channels.items()}}
        for key, value in named.items():
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{key} {value} must be a non-negative index or a sequence name")
        return self

    def channel_for(self, key: str) -> int | str:
        """The channel of the case ``<source>/<case_id>``: the first ``channels`` entry whose pattern (a source
        name, or a glob over case keys such as ``msd/BRATS_*``) matches it, else ``channel``."""
        for pattern, value in self.channels.items():
            if key.split("/", 1)[0] == pattern or fnmatch.fnmatchcase(key, pattern):
                return value
        return self.channel


SourceName = Literal["demo", "msd", "amos22", "chaos", "promise12", "m3d_seg", "local"]


MsdTask = Literal["Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
                  "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon"]


class MsdOptions(_Section):
    """Which Medical Segmentation Decathlon tasks to fetch (one tarball each)."""

    tasks: list[MsdTask] = Field(default_factory=lambda: ["Task04_Hippocampus"], min_length=1)


class M3dSegOptions(_Section):
    """Which M3D-Seg data sets (SegVol's preprocessed CT collections, codes 0000-0024) to fetch.

    ``parts``: the file names of a data set published as several archives instead of ``<code>.zip`` (0024),
    each fetched and unpacked in order, as listed on the dataset's Hugging Face page.
    """

    datasets: list[str] = Field(default_factory=lambda: ["0023"], min_length=1)
    parts: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _codes(self) -> M3dSegOptions:
        for code in [*self.datasets, *self.parts]:
            if not (len(code) == 4 and code.isdigit() and int(code) <= 24):
                raise ValueError(f"dataset code {code!r} is not one of 0000-0024")
        for code, names in self.parts.items():
            if not names or any("/" in n or n in ("", ".", "..") for n in names):
                raise ValueError(f"parts.{code}: give the archive file names, without folders")
        return self


class LocalSet(_Section):
    """One folder of data a user already has (``segevo download`` links its files, it never downloads them).

    ``layout``: ``nnunet`` (nnU-Net raw: ``imagesTr/<case>_<XXXX>.nii.gz``, ``labelsTr/<case>.nii.gz``,
    ``dataset.json`` naming channels and labels; ``imagesTs``/``labelsTs`` when present are its test list) or
    ``pairs`` (``images/<case>.nii.gz`` with ``labels/<case>.nii.gz`` and the class map in ``classes``).
    ``channel`` picks the sequence of a multi-channel set (index or name); ``modality`` defaults to CT when that
    channel is named CT, else MRI; ``patient_pattern`` is a regex whose first group is the patient in a case
    name (default: one patient per case); ``subset`` declares the whole set an official train/val/test list.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    path: str
    layout: Literal["nnunet", "pairs"] = "nnunet"
    modality: str | None = Field(None, pattern=r"^(CT|MRI)(-[A-Za-z0-9]+)*$")
    channel: int | str = 0
    classes: dict[int, str] = Field(default_factory=dict)
    patient_pattern: str | None = None
    subset: Literal["train", "val", "test"] | None = None

    @model_validator(mode="after")
    def _check(self) -> LocalSet:
        if self.layout == "pairs" and (not self.classes or self.modality is None):
            raise ValueError(f"local set {self.name!r}: the pairs layout needs classes and modality")
        if self.patient_pattern is not None:
            try:
                if re.compile(self.patient_pattern).groups < 1:
                    raise ValueError(f"patient_pattern {self.patient_pattern!r} needs a group")
            except re.error as err:
                raise ValueError(f"patient_pattern {self.patient_pattern!r}: {err}") from None
        return self


class LocalOptions(_Section):
    """Data already on disk: BraTS 2021, SAML, in-house sets (see README, "Data that needs a login")."""

    sets: list[LocalSet] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> LocalOptions:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"local set names must be unique: {names}")
        return self


class DataConfig(_Section):
    """Raw data: the sources ``segevo download`` fetches into ``<root>/raw/<source>/`` and how.

    ``mirrors`` replaces a source's base URL (a mirror, or a local server in tests); ``skip_bad_cases`` leaves
    unreadable or mislabelled cases out of the case table with a warning instead of stopping. ``merge`` joins
    classes per source (``{msd: {prostate: [prostate peripheral zone, prostate transition zone]}}``: one class
    for the gland the prototype segments); ``checksums`` pins a published checksum (``algo:hex``) per
    ``<source>/<file>`` where the code has none (a Hugging Face LFS sha256, a Zenodo md5).
    """

    root: str = "data"
    sources: list[SourceName] = Field(default_factory=lambda: ["demo"], min_length=1)
    mirrors: dict[SourceName, str] = Field(default_factory=dict)
    skip_bad_cases: bool = False
    msd: MsdOptions = MsdOptions()
    m3d_seg: M3dSegOptions = M3dSegOptions()
    local: LocalOptions = LocalOptions()
    merge: dict[SourceName, dict[str, list[str]]] = Field(default_factory=dict)
    checksums: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources lists a source twice: {self.sources}")
        if "demo" in self.mirrors:
            raise ValueError("mirrors.demo: the demo source comes from the package index; configure pip instead")
        for name, url in self.mirrors.items():
            if not url.startswith(("http://", "https://", "file://")):
                raise ValueError(f"mirrors.{name}: {url!r} is not an http(s):// or file:// URL")
        for key, checksum in self.checksums.items():
            if not re.fullmatch(r"[a-z0-9_]+/[^/]+", key) or not re.fullmatch(r"(sha256|md5):[0-9a-f]+", checksum):
                raise ValueError(f"checksums: {key!r}: {checksum!r} must be '<source>/<file>': 'sha256:<hex>' "
                                 f"or 'md5:<hex>'")
        if "local" in self.sources and not self.local.sets:
            raise ValueError("sources lists local but local.sets is empty")
        return self


class SplitConfig(_Section):
    """Leak-free split of the manifest and round-robin training subsets (``segevo split``).

    ``official`` maps the lists a source publishes (its ``subset``: train / val / test) to splits, honoured
    before any random draw (null: ignore them); ``segvol_seen: not_test`` keeps every patient or scan SegVol
    was trained on (M3D-Seg train lists) out of the test split, ``allow`` lets it in. Fractions apply per source
    to what the rules leave free.
    """

    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    subsets: list[int] = Field(default_factory=lambda: [200, 400, 800])
    official: dict[Literal["train", "val", "test"], Literal["train", "val", "test"]] | None = Field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    segvol_seen: Literal["not_test", "allow"] = "not_test"

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if any(n <= 0 for n in self.subsets):
            raise ValueError("subset sizes must be positive")
        return self


class LoaderConfig(_Section):
    """Training samples from the prep cache: SegVol's crop/resize choice, flips, jitter, prompts, balance."""

    resize_probability: float = Field(0.25, ge=0, le=1)
    positive_fraction: float = Field(2 / 3, ge=0, le=1)
    flip_probability: float = Field(0.2, ge=0, le=1)
    intensity_probability: float = Field(0.2, ge=0, le=1)
    intensity_scale: float = Field(0.1, ge=0)
    intensity_shift: float = Field(0.1, ge=0)
    box_jitter: float = Field(0.1, ge=0, lt=1)
    max_extra_positive: int = Field(10, ge=0)
    max_negative: int = Field(10, ge=0)
    balance: Literal["none", "class", "modality", "class+modality"] = "class+modality"
    samples_per_epoch: int = Field(1000, gt=0)
    pseudo: bool = True
    pseudo_min_fraction: float = Field(0.001, ge=0, lt=1)
    seed: int = 0

    @property
    def num_points(self) -> int:
        return 1 + self.max_extra_positive + self.max_negative
