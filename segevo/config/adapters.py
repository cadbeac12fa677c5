"""What fine-tuning adds to SegVol: the Mixture-of-Adapters experts (``adapters``) and the context priors
(``priors``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from segevo.config.base import _Section

VIT_LORA_TARGETS = ("attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2")


DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class ExpertConfig(_Section):
    """One Mixture-of-Adapters expert: ``identity`` (the pretrained SegVol, untouched), ``lora`` or ``dora``
    (LoRA plus a learned per-output magnitude; same rank, alpha, dropout and targets). The kinds are the sibling
    modules of ``segevo.model.experts``.

    ``vit_targets`` are module-name suffixes inside the image encoder, ``decoder_targets`` inside the mask
    decoder's two-way transformer (its attention projections by default).
    """

    kind: Literal["identity", "lora", "dora"] = "lora"
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
