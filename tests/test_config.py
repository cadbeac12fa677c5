"""The typed config: defaults are SegVol, typos fail with the key path, every shipped profile validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from segevo.config import ConfigError, ModelConfig, load_config, parse_config
from segevo.model import SegVol

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def test_defaults_are_segvol():
    cfg = ModelConfig()
    assert cfg.roi_size == (32, 256, 256) and cfg.patch_size == (4, 16, 16) and cfg.feat_shape == (8, 16, 16)
    assert cfg.text.template == "A computerized tomography of a {}."


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name for p in PROFILES])
def test_every_shipped_profile_validates(profile):
    load_config(profile)


def test_demo_profile_builds():
    cfg = load_config(REPO / "params.yaml")
    SegVol(cfg.model)


def test_full_profile_equals_the_defaults():
    assert load_config(REPO / "configs" / "full.yaml").model == ModelConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"encoder": {"hidden_sise": 8}}}, r"model\.encoder\.hidden_sise: Extra inputs"),
        ({"modle": {}}, r"modle: Extra inputs"),
        ({"model": {"encoder": {"num_layers": "twelve"}}}, r"model\.encoder\.num_layers: .*integer"),
        ({"model": {"roi_size": [32, 256]}}, r"model\.roi_size"),
        ({"model": {"roi_size": [30, 256, 256]}}, r"not a positive multiple of patch_size"),
        ({"model": {"encoder": {"hidden_size": 100, "num_heads": 12}}}, r"not divisible by num_heads"),
        ({"model": {"text": {"template": "CT of organ"}}}, r"placeholder"),
        ([1, 2], r"top level must be a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "params.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
