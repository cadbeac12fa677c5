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
    """HERMES-style context priors on top of SegVol; zero-initialised gates keep step 0 equal to SegVol.

    Each part has a switch for ablations: ``self_attention`` (priors attend to each other in every fusion
    block), ``fuse_image`` (the image path: image tokens attend back to the priors, gated into the ViT
    tokens), ``posterior_prototype`` (the prototype path into the mask decoder, of kind ``prototype``),
    ``modality_pools`` (one modality prior per modality name, or per expert) and ``modality_loss_weight``
    (HERMES' modality classification from the modality posterior tokens of the rows the priors adapt; 0 builds
    no head).
    """

    enabled: bool = True
    pool_size: int = Field(4, gt=0)
    dim: int = Field(256, gt=0)
    depth: int = Field(1, gt=0)
    num_heads: int = Field(8, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)
    self_attention: bool = True
    fuse_image: bool = True
    posterior_prototype: bool = True
    prototype: Literal["additive", "multiplicative"] = "additive"
    modality_pools: Literal["name", "expert"] = "name"
    # Modality names with a pool of their own besides the experts' (e.g. MRI-T1, MRI-T2); training adds the
    # names its cases carry. A name without a pool uses its expert's.
    modalities: list[str] = Field(default_factory=list)
    modality_loss_weight: float = Field(0.01, ge=0)
    apply_to_identity: bool = False
    # Training only: each row's task becomes the null task with this probability, so the null prior that
    # `predict` falls back to (no --text, or a class outside the vocabulary) is trained for that use.
    task_dropout: float = Field(0.1, ge=0, le=1)
    tasks: list[tuple[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PriorsConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.enabled and not (self.fuse_image or self.posterior_prototype):
            raise ValueError("fuse_image and posterior_prototype are both off, so the priors cannot change the "
                             "output: turn one on, or set enabled: false")
        return self
