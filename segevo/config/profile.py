"""A whole profile (``SegevoConfig``): reading YAML strictly, the default profile's lookup, ``--set`` overrides,
variant overlays and the tuned keys' checks. Errors name the file and the dotted key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from segevo.config.adapters import AdaptersConfig, PriorsConfig
from segevo.config.base import ConfigError, _Section
from segevo.config.data import DataConfig, LoaderConfig, PreprocessConfig, PseudoMaskConfig, SplitConfig
from segevo.config.evaluation import CompareConfig, EvaluateConfig, InferenceConfig
from segevo.config.model import ModelConfig
from segevo.config.training import TrackingConfig, TrainConfig
from segevo.config.tune import ParamSpec, TuneConfig


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
    inference: InferenceConfig = InferenceConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()

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
    """``tune.space``, or the default: the rank of every LoRA or DoRA expert, the prior pool size, the learning rate."""
    if cfg.tune.space is not None:
        return dict(cfg.tune.space)
    space = {f"adapters.experts.{name}.rank": ParamSpec(type="categorical", choices=[4, 8, 16, 32])
             for name, expert in cfg.adapters.experts.items() if expert.kind != "identity"}
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


def default_profile() -> str | None:
    """The profile read when none is named: ``$SEGEVO_CONFIG``, else ``./params.yaml`` if present, else None (the
    built-in defaults). The one place this rule lives."""
    path = os.environ.get("SEGEVO_CONFIG")
    if path is None and Path("params.yaml").is_file():
        path = "params.yaml"
    return path


def load_config(path: str | os.PathLike[str] | None = None) -> SegevoConfig:
    """Load a YAML profile; ``None`` means :func:`default_profile`."""
    path = default_profile() if path is None else path
    if path is None:
        return parse_config({}, "built-in defaults")
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
    items = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        items.append((key, value))
    return _set_keys(cfg, items, "--set")


def apply_overlay(cfg: SegevoConfig, path: str | os.PathLike[str]) -> SegevoConfig:
    """``cfg`` with a profile overlay applied: a YAML file of dotted keys and values, each set as ``--set`` would
    (a section's value replaces the whole section). The comparison's variants (``configs/variants/``) are
    overlays, so one variant means the same change on every profile."""
    p = Path(path)
    data = read_yaml(p) if p.is_file() else None
    if data is None:
        raise ConfigError(f"{p}: overlay file not found" if not p.exists() else f"{p}: not a file")
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{p}: an overlay is a mapping of dotted keys to values, e.g. 'priors.enabled: false'")
    return _set_keys(cfg, list(data.items()), str(p))


def _set_keys(cfg: SegevoConfig, items: list[tuple[str, Any]], label: str) -> SegevoConfig:
    """Dotted keys set on a copy of ``cfg`` and validated; an error names ``label`` and the key."""
    data = cfg.model_dump(mode="json")
    for key, value in items:
        node, leaf = _section(data, key, f"{label} {key}: ")
        parents = key.split(".")[:-1]
        if leaf not in node and not (parents and _open_mapping(parents)):
            raise ConfigError(f"{label} {key}: not a config key; {'.'.join(parents) or 'the config'} has: "
                              f"{', '.join(node)}")
        node[leaf] = value
    try:
        return SegevoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{label} " + format_error("", err).removeprefix(": ")) from None


def _open_mapping(parents: list[str]) -> bool:
    """Sections whose keys are the user's own names (a new expert, a tuned key, a per-modality template)."""
    return parents[-1] in ("experts", "templates", "space", "resources_per_worker") or (
        len(parents) >= 2 and parents[-2] in ("experts", "space"))
