"""Typed configuration: the schema of ``params.yaml`` and of every profile in ``configs/``.

Unknown or mistyped keys are errors that name the key path, so a typo never silently falls back to a default.
Defaults describe the released SegVol (ViT-B, 32x256x256 ROI) so ``SegVolConfig()`` builds that model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or key is missing, unknown or of the wrong type."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    image (MSD BraTS: FLAIR, T1w, t1gd, T2w) to keep: an index, or a sequence name as the case table lists it.

    ``workers`` (default: one per CPU core) changes no output, so the DVC stages do not depend on it.
    """

    workers: int | None = Field(None, ge=1)
    channel: int | str = Field(0)

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if isinstance(self.channel, int) and self.channel < 0:
            raise ValueError(f"channel {self.channel} must be a non-negative index or a sequence name")
        return self


SourceName = Literal["demo", "msd", "amos22", "chaos", "promise12", "m3d_seg"]
MsdTask = Literal["Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
                  "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon"]


class MsdOptions(_Section):
    """Which Medical Segmentation Decathlon tasks to fetch (one tarball each)."""

    tasks: list[MsdTask] = Field(default_factory=lambda: ["Task04_Hippocampus"], min_length=1)


class M3dSegOptions(_Section):
    """Which M3D-Seg data sets (SegVol's preprocessed CT collections, codes 0000-0024) to fetch."""

    datasets: list[str] = Field(default_factory=lambda: ["0023"], min_length=1)

    @model_validator(mode="after")
    def _codes(self) -> M3dSegOptions:
        for code in self.datasets:
            if not (len(code) == 4 and code.isdigit() and int(code) <= 24):
                raise ValueError(f"dataset code {code!r} is not one of 0000-0024")
        return self


class DataConfig(_Section):
    """Raw data: the sources ``segevo download`` fetches into ``<root>/raw/<source>/`` and how.

    ``mirrors`` replaces a source's base URL (a mirror, or a local server in tests); ``skip_bad_cases`` leaves
    unreadable or mislabelled cases out of the case table with a warning instead of stopping.
    """

    root: str = "data"
    sources: list[SourceName] = Field(default_factory=lambda: ["demo"], min_length=1)
    mirrors: dict[SourceName, str] = Field(default_factory=dict)
    skip_bad_cases: bool = False
    msd: MsdOptions = MsdOptions()
    m3d_seg: M3dSegOptions = M3dSegOptions()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources lists a source twice: {self.sources}")
        if "demo" in self.mirrors:
            raise ValueError("mirrors.demo: the demo source comes from the package index; configure pip instead")
        for name, url in self.mirrors.items():
            if not url.startswith(("http://", "https://", "file://")):
                raise ValueError(f"mirrors.{name}: {url!r} is not an http(s):// or file:// URL")
        return self


class SplitConfig(_Section):
    """Patient-level split of the manifest and round-robin training subsets (``segevo split``)."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    subsets: list[int] = Field(default_factory=lambda: [200, 400, 800])

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
    pseudomask: PseudoMaskConfig = PseudoMaskConfig()
    preprocess: PreprocessConfig = PreprocessConfig()


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {path}: {first['msg']}{more}"


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> SegevoConfig:
    """Validate a raw mapping; errors name the source and the dotted key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return SegevoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> SegevoConfig:
    """Load a YAML profile. ``None`` means ``$SEGEVO_CONFIG`` or, failing that, ``params.yaml`` if present."""
    if path is None:
        path = os.environ.get("SEGEVO_CONFIG")
        if path is None:
            return parse_config(yaml.safe_load(Path("params.yaml").read_text())
                                if Path("params.yaml").is_file() else {}, "params.yaml")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_config(data, str(p))
