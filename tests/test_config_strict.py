"""Strict config: an empty file, a boolean for a number and a duplicate YAML key are errors naming the key; random
mutations of the shipped profiles either load to a valid config or fail in one line naming a key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segevo.config import ConfigError, SegevoConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
PROFILES = {p.name: yaml.safe_load(p.read_text()) for p in [REPO / "params.yaml", *(REPO / "configs").glob("*.yaml")]}


@pytest.mark.parametrize("text", ["", "\n\n", "   \n", "# only a comment\n", "# a\n\n# b\n"])
def test_an_empty_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml: the config file is empty \(write '\{\}'"):
        load_config(path)


def test_explicit_empty_mapping_is_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path) == SegevoConfig()


@pytest.mark.parametrize(("text", "key"), [
    ("adapters:\n  experts:\n    MRI: {rank: true}\n", "adapters.experts.MRI.rank"),
    ("train:\n  epochs: false\n", "train.epochs"),
    ("train:\n  lr: true\n", "train.lr"),
    ("model:\n  roi_size: [32, true, 256]\n", "model.roi_size"),
    ("train:\n  resources_per_worker: {GPU: true}\n", "train.resources_per_worker"),
    ("tune:\n  seed: true\n", "tune.seed"),
    ("preprocess:\n  channel: true\n", "preprocess.channel"),
    ("priors:\n  tasks: [[demo, true]]\n", "priors.tasks"),
    ("split:\n  subsets: [true]\n", "split.subsets"),
])
def test_a_boolean_is_never_a_number(tmp_path, text, key):
    path = tmp_path / "bool.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"bool.yaml: {key.replace('.', '[.]')}: expected a number or text, got a"):
        load_config(path)


def test_booleans_still_go_where_booleans_belong(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  use_gpu: false\npriors:\n  enabled: true\ntune:\n  space:\n"
                    "    priors.enabled: {type: categorical, choices: [true, false]}\n")
    cfg = load_config(path)
    assert cfg.train.use_gpu is False and cfg.tune.space["priors.enabled"].choices == [True, False]


@pytest.mark.parametrize(("text", "key", "line"), [
    ("train:\n  epochs: 1\n  epochs: 2\n", "epochs", 3),
    ("model: {}\nmodel: {}\n", "model", 2),
    ("adapters:\n  experts:\n    MRI: {rank: 4, rank: 8}\n", "rank", 3),
    ("tune:\n  space:\n    train.lr: {type: float, low: 0.1, high: 1}\n    train.lr: {type: int, low: 1, high: 2}\n",
     "train.lr", 4),
])
def test_a_duplicate_key_is_an_error_naming_it(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup.yaml: not valid YAML \(line {line}\): duplicate key '{key}'"):
        load_config(path)


def test_a_directory_is_not_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)


# ---- property: random mutations of every shipped profile ------------------------------------------------------

def leaves(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict):
        out = [prefix] if prefix else []
        for key, value in node.items():
            out += leaves(value, (*prefix, str(key)))
        return out
    return [prefix]


VALUES = st.one_of(st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True), st.text(max_size=8),
                   st.none(), st.lists(st.integers(-3, 300), max_size=4), st.dictionaries(st.text(max_size=4),
                                                                                        st.integers(), max_size=2))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_mutated_profiles_load_or_fail_in_one_line_naming_a_key(data):
    name = data.draw(st.sampled_from(sorted(PROFILES)))
    doc = copy.deepcopy(PROFILES[name])
    path = data.draw(st.sampled_from(leaves(doc)))
    *parents, leaf = path
    node = doc
    for part in parents:
        node = node[part]
    action = data.draw(st.sampled_from(["set", "delete", "rename"]))
    original = node[leaf]
    if action == "set":
        node[leaf] = data.draw(VALUES)
    elif action == "delete":
        del node[leaf]
    else:
        node[leaf + "_typo"] = node.pop(leaf)
    try:
        cfg = parse_config(doc, name)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(f"{name}: ")
        named = message.removeprefix(f"{name}: ")
        assert any(part in named for part in path), (path, message)
        return
    free_form = ("adapters", "tune", "train.resources_per_worker", "preprocess.channels", "data.merge",
                 "data.checksums", "data.local")  # maps whose keys are the user's own names
    assert action != "rename" or not parents or any(".".join(parents).startswith(f) for f in free_form)
    mutated = node.get(leaf) if action == "set" else None
    if isinstance(mutated, bool) and isinstance(original, int | float) and not isinstance(original, bool):
        pytest.fail(f"{'.'.join(path)}: boolean {mutated} accepted for the number {original}")
    assert isinstance(cfg, SegevoConfig)
