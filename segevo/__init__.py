"""segevo: adapt the SegVol 3D segmentation foundation model to new modalities.

Public API::

    model = segevo.load_model("pytorch_model.bin")          # SegVol ViT-B, strictly loaded, eval mode
    logits = model(image, text=["liver"], boxes=boxes)     # (B, 1, D, H, W)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from segevo.config import ModelConfig, SegevoConfig, load_config

if TYPE_CHECKING:
    from segevo.model import SegVol

__version__ = "0.1.0"


def load_model(
    weights: str | os.PathLike[str] | None = None,
    config: ModelConfig | SegevoConfig | str | os.PathLike[str] | None = None,
    layout: str = "auto",
    trust_pickle: bool = False,
) -> SegVol:
    """Build SegVol from ``config`` (default: the released ViT-B geometry) in eval mode.

    ``weights`` is a released checkpoint (HF ``pytorch_model.bin``, ``SegVol_v1.pth`` or the encoder-only
    ``vit_pretrain.ckpt``), loaded strictly; ``config`` is a ``ModelConfig``, a full config, or a YAML path.
    """
    from segevo.model import SegVol, load_checkpoint

    if config is None:
        model_cfg = ModelConfig()
    elif isinstance(config, ModelConfig):
        model_cfg = config
    elif isinstance(config, SegevoConfig):
        model_cfg = config.model
    else:
        model_cfg = load_config(config).model
    model = SegVol(model_cfg)
    if weights is not None:
        load_checkpoint(model, weights, layout=layout, trust_pickle=trust_pickle)
    return model.eval()


def __getattr__(name: str) -> Any:
    if name == "SegVol":  # torch is imported on first use, so the CLI's --help stays fast
        from segevo.model import SegVol

        return SegVol
    raise AttributeError(f"module 'segevo' has no attribute {name!r}")


__all__ = ["ModelConfig", "SegVol", "SegevoConfig", "__version__", "load_config", "load_model"]
