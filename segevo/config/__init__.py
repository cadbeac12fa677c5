"""Typed configuration: the schema of ``params.yaml`` and of every profile in ``configs/``, one module per concern.

Unknown or mistyped keys are errors that name the key path, so a typo never silently falls back to a default.
``segevo.config`` re-exports every section and the loading functions, so callers import from here.
"""

from segevo.config.adapters import DECODER_LORA_TARGETS, VIT_LORA_TARGETS, AdaptersConfig, ExpertConfig, PriorsConfig
from segevo.config.base import ConfigError
from segevo.config.data import (
    DataConfig,
    LoaderConfig,
    LocalOptions,
    LocalSet,
    M3dSegOptions,
    MsdOptions,
    MsdTask,
    PreprocessConfig,
    PseudoMaskConfig,
    SourceName,
    SplitConfig,
)
from segevo.config.evaluation import PROMPT_TYPES, VARIANT_NAME, CompareConfig, EvaluateConfig, InferenceConfig
from segevo.config.model import DecoderConfig, EncoderConfig, ModelConfig, PromptConfig, TextConfig
from segevo.config.profile import (
    SegevoConfig,
    apply_overlay,
    apply_overrides,
    default_profile,
    format_error,
    load_config,
    parse_config,
    read_yaml,
    search_space,
    with_values,
)
from segevo.config.training import LossConfig, TrackingConfig, TrainConfig
from segevo.config.tune import ParamSpec, PrunerConfig, TuneConfig

__all__ = [
    "DECODER_LORA_TARGETS", "PROMPT_TYPES", "VARIANT_NAME", "VIT_LORA_TARGETS", "AdaptersConfig", "CompareConfig",
    "ConfigError", "DataConfig", "DecoderConfig", "EncoderConfig", "EvaluateConfig", "ExpertConfig",
    "InferenceConfig", "LoaderConfig", "LocalOptions", "LocalSet", "LossConfig", "M3dSegOptions", "ModelConfig",
    "MsdOptions", "MsdTask", "ParamSpec", "PreprocessConfig", "PriorsConfig", "PromptConfig", "PrunerConfig",
    "PseudoMaskConfig", "SegevoConfig", "SourceName", "SplitConfig", "TextConfig", "TrackingConfig", "TrainConfig",
    "TuneConfig", "apply_overlay", "apply_overrides", "default_profile", "format_error", "load_config",
    "parse_config", "read_yaml", "search_space", "with_values",
]
