"""Typed configuration: the schema of ``params.yaml`` and of every profile in ``configs/``.

Unknown or mistyped keys are errors that name the key path, so a typo never silently falls back to a default.
Defaults describe the released SegVol (ViT-B, 32x256x256 ROI) so ``SegVolConfig()`` builds that model.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from segevo.errors import UserError


class ConfigError(UserError):
    """A config file or key is missing, unknown or of the wrong type."""


class _Section(BaseModel):
    """Every section: unknown keys are errors, and a boolean is never taken for a number (``rank: true`` would
    otherwise become 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if not _admits_bool(annotation) and _holds_bool(value):
            raise ValueError("expected a number or text, got a boolean (true/false)")
        return value


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes booleans anywhere (``bool``, ``bool | None``, ``list[bool | int]``); section
    types check their own fields."""
    if annotation is bool or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    return any(_admits_bool(arg) for arg in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_bool(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_bool(v) for v in value.values())
    return False


class EncoderConfig(_Section):
    """3D ViT image encoder (MONAI-0.9 layout, as in SegVol)."""

    hidden_size: int = Field(768, gt=0)
    mlp_dim: int = Field(3072, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> EncoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class DecoderConfig(_Section):
    """SAM-style two-way transformer mask decoder; its width is the encoder's hidden size."""

    depth: int = Field(2, gt=0)
    num_heads: int = Field(8, gt=0)
    mlp_dim: int = Field(2048, gt=0)
    attention_downsample_rate: int = Field(2, gt=0)
    num_multimask_outputs: int = Field(3, ge=0)
    iou_head_depth: int = Field(3, gt=0)
    iou_head_hidden_dim: int = Field(256, gt=0)


class PromptConfig(_Section):
    """Prompt encoder; ``mask_in_chans`` only sizes SAM's unused mask branch, kept for checkpoint keys."""

    mask_in_chans: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _mask_chans(self) -> PromptConfig:
        if self.mask_in_chans % 4:
            raise ValueError(f"mask_in_chans {self.mask_in_chans} must be a multiple of 4")
        return self


class TextConfig(_Section):
    """CLIP text tower (openai/clip-vit-base-patch32 shapes by default) and SegVol's prompt template."""

    hidden_size: int = Field(512, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(8, gt=0)
    intermediate_size: int = Field(2048, gt=0)
    vocab_size: int = Field(49408, gt=0)
    max_position_embeddings: int = Field(77, gt=2)
    layer_norm_eps: float = Field(1e-5, gt=0)
    template: str = "A computerized tomography of a {}."
    tokenizer_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}' placeholder, got {self.template!r}")
        return self


class ModelConfig(_Section):
    """Geometry and widths of SegVol. Every tensor shape of the model derives from here."""

    roi_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = Field(1, gt=0)
    encoder: EncoderConfig = EncoderConfig()
    prompt: PromptConfig = PromptConfig()
    decoder: DecoderConfig = DecoderConfig()
    text: TextConfig = TextConfig()

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        for axis, (r, p) in enumerate(zip(self.roi_size, self.patch_size, strict=True)):
            if p <= 0 or r <= 0 or r % p:
                raise ValueError(f"roi_size {self.roi_size} is not a positive multiple of patch_size "
                                 f"{self.patch_size} on axis {axis}")
        width = self.encoder.hidden_size
        if width % 8:
            raise ValueError(f"encoder.hidden_size {width} must be a multiple of 8 (decoder upscaling)")
        inner = width // self.decoder.attention_downsample_rate
        if width % self.decoder.attention_downsample_rate or inner % self.decoder.num_heads:
            raise ValueError(f"encoder.hidden_size {width} / decoder.attention_downsample_rate must be a "
                             f"multiple of decoder.num_heads {self.decoder.num_heads}")
        return self

    @property
    def embed_dim(self) -> int:
        return self.encoder.hidden_size

    @property
    def feat_shape(self) -> tuple[int, int, int]:
        return tuple(r // p for r, p in zip(self.roi_size, self.patch_size, strict=True))  # type: ignore[return-value]


VIT_LORA_TARGETS = ("attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2")
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class ExpertConfig(_Section):
    """One Mixture-of-Adapters expert: ``identity`` (the pretrained SegVol, untouched) or a LoRA adapter.

    ``vit_targets`` are module-name suffixes inside the image encoder, ``decoder_targets`` inside the mask
    decoder's two-way transformer (its attention projections by default).
    """

    kind: Literal["identity", "lora"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    vit_targets: tuple[str, ...] = VIT_LORA_TARGETS
    decoder_targets: tuple[str, ...] = DECODER_LORA_TARGETS


class AdaptersConfig(_Section):
    """Top-1 routing by modality: every row of a batch goes through its modality's expert."""

    enabled: bool = True
    experts: dict[str, ExpertConfig] = Field(
        default_factory=lambda: {"CT": ExpertConfig(kind="identity"), "MRI": ExpertConfig()}
    )
    fallback: str | None = None
    templates: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> AdaptersConfig:
        if not self.experts:
            raise ValueError("experts must name at least one modality")
        if self.fallback is not None and self.fallback not in self.experts:
            raise ValueError(f"fallback {self.fallback!r} is not one of the experts {sorted(self.experts)}")
        for modality, template in self.templates.items():
            if modality not in self.experts:
                raise ValueError(f"templates names modality {modality!r}, which has no expert")
            if template.count("{}") != 1:
                raise ValueError(f"template for {modality} must contain exactly one '{{}}' placeholder")
        return self


class PriorsConfig(_Section):
    """HERMES-style context priors on top of SegVol; zero-initialised gates keep step 0 equal to SegVol."""

    enabled: bool = True
    pool_size: int = Field(4, gt=0)
    dim: int = Field(256, gt=0)
    depth: int = Field(1, gt=0)
    num_heads: int = Field(8, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)
    prototype: Literal["additive", "multiplicative"] = "additive"
    fuse_image: bool = True
    apply_to_identity: bool = False
    # Training only: each row's task becomes the null task with this probability, so the null prior that
    # `predict` falls back to (no --text, or a class outside the vocabulary) is trained for that use.
    task_dropout: float = Field(0.1, ge=0, le=1)
    tasks: list[tuple[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PriorsConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        return self


class LossConfig(_Section):
    """The batched training loss: Dice + BCE per prompt combination, all in one decoder batch."""

    combinations: tuple[str, ...] = ("text", "box", "point", "text+box", "text+point", "box+point")
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    pseudo_weight: float = Field(0.1, ge=0)
    pseudo_combinations: tuple[str, ...] = ("box", "point")

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        for name in (*self.combinations, *self.pseudo_combinations):
            parts = name.split("+")
            if not name or len(set(parts)) != len(parts) or not set(parts) <= {"text", "box", "point"}:
                raise ValueError(f"unknown prompt combination {name!r}: use text, box and point joined by '+'")
        if "text" in "+".join(self.pseudo_combinations).split("+"):
            raise ValueError("pseudo_combinations cannot use text: pseudo-mask regions have no class name")
        if not self.combinations:
            raise ValueError("combinations must not be empty")
        return self


class TrainConfig(_Section):
    """Fine-tuning: optimisation, scale (Ray Train workers), checkpoints and fault tolerance."""

    loss: LossConfig = LossConfig()
    run_id: str | None = None
    base_weights: str | None = None
    subset: str | None = None
    epochs: int = Field(10, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0)
    batch_size: int = Field(2, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: int = Field(2, ge=0, le=2)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_workers: int = Field(1, gt=0)
    use_gpu: bool | None = None
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    loader_workers: int = Field(1, ge=0)
    val_samples: int = Field(8, gt=0)
    early_stopping_patience: int = Field(5, ge=0)
    storage_path: str = "runs"
    max_failures: int = Field(2, ge=-1)
    keep_checkpoints: int = Field(2, gt=0)
    ray_address: str | None = None
    output: str = "models/adapter"
    metrics_dir: str = "metrics"
    # A random base is right for the offline demo and wrong everywhere else: refused unless said here.
    allow_random_base: bool = False
    # Seconds a run that asks for GPUs waits for the cluster (autoscaler) to have them, then fails.
    gpu_wait_s: float = Field(600.0, ge=0)
    # Prepared data staged onto every node's local disk from a DVC remote (instead of a shared data.root):
    # the version is the hash of data/prep and data/split.json in data_lock (a dvc.lock or .dvc file).
    data_remote: str | None = None
    data_lock: str = "dvc.lock"
    staging_dir: str = "/tmp/segevo/data"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_id):
            raise ValueError(f"run_id {self.run_id!r} may only hold letters, digits, '.', '_' and '-'")
        return self


class TrackingConfig(_Section):
    """MLflow: a local SQLite store by default, a server when ``tracking_uri`` (or MLFLOW_TRACKING_URI) says so."""

    tracking_uri: str | None = None
    experiment: str = "segevo"
    system_metrics: bool = True


class ParamSpec(_Section):
    """One search-space dimension: ``choices`` (categorical), or ``low``..``high`` (int or float, ``log`` scale)."""

    type: Literal["categorical", "int", "float"]
    choices: list[bool | int | float | str] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.log:
                raise ValueError("categorical takes a non-empty choices list and nothing else")
            return self
        if self.choices is not None or self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} takes low < high, not choices")
        if self.type == "int" and not (isinstance(self.low, int) and isinstance(self.high, int)):
            raise ValueError(f"int bounds must be integers, got {self.low!r}, {self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self

    def extremes(self) -> list[Any]:
        """The values that must all be valid for the key: every choice, or both bounds."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


class PrunerConfig(_Section):
    """Stops unpromising trials from their validation Dice per epoch (epochs count from 0).

    ``median``: below the median of earlier trials at the same epoch, once ``startup_trials`` finished and after
    ``warmup_epochs``; ``successive_halving`` / ``hyperband``: rungs from ``min_epochs`` keeping 1/``reduction_factor``
    of the trials; ``threshold``: Dice below ``min_dice`` after ``warmup_epochs``; ``none``: never.
    """

    kind: Literal["median", "successive_halving", "hyperband", "threshold", "none"] = "median"
    startup_trials: int = Field(2, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    min_epochs: int = Field(1, gt=0)
    reduction_factor: int = Field(3, ge=2)
    min_dice: float = Field(0.0, ge=0, le=1)


class TuneConfig(_Section):
    """``segevo tune``: an Optuna study over this config, maximising validation Dice, one Ray Train run per trial.

    ``storage`` is an RDB URL: the embedded default is a SQLite file in the working directory, ``postgresql://``
    serves studies that several machines share. ``trials`` is the number of finished (complete or pruned) trials
    the study should hold, whichever processes ran them. A dead process's trial is failed once its heartbeat is
    ``grace_s`` old and retried ``retries`` times, resuming the dead run's checkpoint. ``space`` maps dotted config
    keys to their ranges; unset, it is the rank of every LoRA expert, ``priors.pool_size`` and ``train.lr``.
    """

    study: str = "segevo"
    storage: str = "sqlite:///optuna.db"
    trials: int = Field(20, gt=0)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    pruner: PrunerConfig = PrunerConfig()
    heartbeat_s: int = Field(10, gt=0)
    grace_s: int = Field(60, gt=0)
    retries: int = Field(1, ge=0)
    output: str = "reports/tune"
    space: dict[str, ParamSpec] | None = None

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.study):
            raise ValueError(f"study {self.study!r} may only hold letters, digits, '.', '_' and '-'")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s {self.grace_s} must exceed heartbeat_s {self.heartbeat_s}")
        if self.space is not None and not self.space:
            raise ValueError("space must name at least one key (leave it unset for the default)")
        return self


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


PROMPT_TYPES = ("text", "box", "point", "text+box", "text+point", "box+point")


class InferenceConfig(_Section):
    """SegVol's zoom-out-zoom-in (``segevo predict`` and ``segevo evaluate``): a global pass on the volume resized
    to the ROI, then sliding windows of the ROI's size over the coarse mask's bounding box. The defaults are
    SegVol's released procedure; the other values are faster choices (see ``segevo/inference/``)."""

    zoom_in: bool = True
    overlap: float = Field(0.5, ge=0, lt=1)
    window_batch: int = Field(4, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    zoom_out_resize: Literal["nearest-exact", "trilinear"] = "nearest-exact"
    roi_rule: Literal["clip", "shift"] = "clip"
    window_grid: Literal["roi", "volume"] = "roi"
    empty_windows: Literal["run", "skip"] = "run"


class EvaluateConfig(_Section):
    """``segevo evaluate``: which cases, classes and prompts, the metrics' settings and the report."""

    split: Literal["test", "val", "train"] = "test"
    classes: list[str] | None = None
    max_cases: int | None = Field(None, gt=0)
    prompts: tuple[str, ...] = PROMPT_TYPES
    box_jitter: tuple[int, ...] = (0, 1, 5, 10, 50)
    positive_points: int = Field(4, gt=0)
    negative_points: int = Field(3, ge=0)
    nsd_tolerance_mm: float = Field(2.0, ge=0)
    bootstrap: int = Field(2000, ge=100)
    seed: int = 0
    overlays: int = Field(4, ge=0)
    report: str = "reports/eval"

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        unknown = [p for p in self.prompts if p not in PROMPT_TYPES]
        if unknown or not self.prompts:
            raise ValueError(f"prompts must be a non-empty subset of {', '.join(PROMPT_TYPES)}; got {unknown}")
        if any(j < 0 for j in self.box_jitter):
            raise ValueError("box_jitter values are voxels and must be >= 0")
        return self


class SegevoConfig(_Section):
    """The whole configuration tree (one section per concern)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    adapters: AdaptersConfig = AdaptersConfig()
    priors: PriorsConfig = PriorsConfig()
    train: TrainConfig = TrainConfig()
    split: SplitConfig = SplitConfig()
    loader: LoaderConfig = LoaderConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    pseudomask: PseudoMaskConfig = PseudoMaskConfig()
    preprocess: PreprocessConfig = PreprocessConfig()

    @model_validator(mode="after")
    def _check_space(self) -> SegevoConfig:
        """Every tuned key exists and accepts every value the study may give it, so trials never fail on config."""
        base = self.model_copy(update={"tune": TuneConfig()})  # the copy's space is unset: no recursion
        for key, spec in (self.tune.space or {}).items():
            try:
                _locate(base.model_dump(mode="json"), key)
            except ConfigError as err:
                raise ValueError(f"tune.space.{key}: {err}") from None
            for value in spec.extremes():
                try:
                    with_values(base, {key: value})
                except ConfigError as err:
                    raise ValueError(f"tune.space.{key}: value {value!r}: {err}") from None
        return self
    inference: InferenceConfig = InferenceConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def format_error(source: str, err: ValidationError) -> str:
    """The first problem as one line: ``source: dotted.key: what is wrong (and N more)``."""
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    msg = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
    message = f"{path}: {msg}" if path else msg
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {message}{more}"


def with_values(cfg: SegevoConfig, values: dict[str, Any]) -> SegevoConfig:
    """A validated copy of ``cfg`` with dotted keys set, e.g. ``{"priors.pool_size": 8}`` (tuning trials)."""
    data = cfg.model_dump(mode="json")
    for key, value in values.items():
        node, leaf = _locate(data, key)
        node[leaf] = value
    try:
        return SegevoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error("", err).removeprefix(": ")) from None


def _section(data: dict[str, Any], key: str, prefix: str) -> tuple[dict[str, Any], str]:
    """The mapping that holds a dotted key's value, and the key's last part; a missing section is an error."""
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            where = ".".join(parents[:depth]) or "the config"
            raise ConfigError(f"{prefix}not a config key: {where} has no section {part!r}")
        node = node[part]
    return node, leaf


def _locate(data: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The mapping holding the value of a dotted key, and the key's last part; unknown keys name what exists."""
    node, leaf = _section(data, key, f"{key!r} is ")
    parents = key.split(".")[:-1]
    if leaf not in node or key.startswith("tune."):
        known = ", ".join(k for k, v in node.items() if not isinstance(v, dict)) or ", ".join(node)
        raise ConfigError(f"{key!r} is not a tunable config key; {'.'.join(parents) or 'the config'} has: {known}")
    if isinstance(node[leaf], dict):
        raise ConfigError(f"{key!r} is a section, not a value")
    return node, leaf


def search_space(cfg: SegevoConfig) -> dict[str, ParamSpec]:
    """``tune.space``, or the default: the rank of every LoRA expert, the prior pool size, the learning rate."""
    if cfg.tune.space is not None:
        return dict(cfg.tune.space)
    space = {f"adapters.experts.{name}.rank": ParamSpec(type="categorical", choices=[4, 8, 16, 32])
             for name, expert in cfg.adapters.experts.items() if expert.kind == "lora"}
    space["priors.pool_size"] = ParamSpec(type="categorical", choices=[1, 2, 4, 8, 16])
    space["train.lr"] = ParamSpec(type="float", low=1e-5, high=1e-2, log=True)
    return space


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> SegevoConfig:
    """Validate a raw mapping; errors name the source and the dotted key path. ``None`` (no document) is the
    built-in defaults; an empty file is refused by :func:`load_config` before it gets here."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return SegevoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error(source, err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """One YAML document, strictly: an empty file, a duplicate key or invalid YAML is a :class:`ConfigError`."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file: {err}") from None
    if not text.strip() or all(line.lstrip().startswith("#") or not line.strip() for line in text.splitlines()):
        raise ConfigError(f"{path}: the config file is empty (write '{{}}' for the built-in defaults)")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(str(problem).split())}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> SegevoConfig:
    """Load a YAML profile. ``None`` means ``$SEGEVO_CONFIG`` or, failing that, ``params.yaml`` if present."""
    if path is None:
        path = os.environ.get("SEGEVO_CONFIG")
        if path is None:
            if not Path("params.yaml").is_file():
                return parse_config({}, "built-in defaults")
            path = "params.yaml"
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    return parse_config(read_yaml(p), str(p))


def apply_overrides(cfg: SegevoConfig, overrides: list[str]) -> SegevoConfig:
    """``cfg`` with ``KEY=VALUE`` overrides (dotted keys, YAML values: ``train.lr=3e-4``, ``train.use_gpu=true``,
    ``data.sources=[demo]``), validated by the same schema; an error names the override and the key."""
    if not overrides:
        return cfg
    data = cfg.model_dump(mode="json")
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        node, leaf = _section(data, key, f"--set {key}: ")
        parents = key.split(".")[:-1]
        if leaf not in node and not (parents and _open_mapping(parents)):
            raise ConfigError(f"--set {key}: not a config key; {'.'.join(parents) or 'the config'} has: "
                              f"{', '.join(node)}")
        node[leaf] = value
    try:
        return SegevoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("--set " + format_error("", err).removeprefix(": ")) from None


def _open_mapping(parents: list[str]) -> bool:
    """Sections whose keys are the user's own names (a new expert, a tuned key, a per-modality template)."""
    return parents[-1] in ("experts", "templates", "space", "resources_per_worker") or (
        len(parents) >= 2 and parents[-2] in ("experts", "space"))
