"""SegVol's geometry and widths (``model``): every tensor shape of the model derives from here. Defaults describe
the released SegVol (ViT-B, 32x256x256 ROI), so ``ModelConfig()`` builds that model."""

from __future__ import annotations

from pydantic import Field, model_validator

from segevo.config.base import _Section


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
