"""One validated reader per file kind (case table, manifest, split, prepared arrays, adapter metadata): any
document of the wrong shape is an error of that kind naming the file, never a KeyError or AttributeError."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prep_helpers import write_prep

from segevo.data.cases import CaseError, read_case_table
from segevo.data.manifest import ManifestError, check_prep_arrays, read_manifest, read_prep_array
from segevo.data.split import SplitError, read_split
from segevo.errors import UserError
from segevo.model.adapter_io import read_meta
from segevo.model.checkpoint import CheckpointError

JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_prep(root)
    return root


def mutate(doc: Any, data: st.DataObject) -> Any:
    """Replace, delete or retype one node anywhere in a JSON document."""
    doc = copy.deepcopy(doc)
    node, path = doc, []
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append((node, key))
        node = node[key]
    if not path:
        return data.draw(JSON)
    parent, key = path[-1]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[key]
    else:
        parent[key] = data.draw(JSON)
    return doc


def write(tmp: Path, name: str, doc: Any) -> Path:
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


@SETTINGS
@given(data=st.data())
def test_property_manifest_documents(prep, tmp_path, data):
    original = json.loads((prep / "prep" / "manifest.json").read_text())
    path = write(tmp_path, "manifest.json", mutate(original, data))
    try:
        cases, meta = read_manifest(path)
    except ManifestError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
        return
    for case in cases:  # what loads is typed as the manifest promises
        assert all(type(n) is int and n > 0 for n in case.shape) and isinstance(case.image, str)
        assert isinstance(case.classes, tuple) and all(isinstance(c, str) for c in case.classes)
    assert isinstance(meta, dict)


@SETTINGS
@given(data=st.data())
def test_property_split_documents(prep, tmp_path, data):
    known = [c.key for c in read_manifest(prep / "prep" / "manifest.json")[0]]
    original = json.loads((prep / "split.json").read_text())
    path = write(tmp_path, "split.json", mutate(original, data))
    try:
        split = read_split(path, known)
    except SplitError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
        return
    for name in ("train", "val", "test"):
        assert all(k in known for k in split[name])
    assert all(set(v) <= set(split["train"]) for v in split["subsets"].values())


@pytest.mark.parametrize(("doc", "message"), [
    ([], "a manifest must be a JSON object, got list"),
    ("cases", "a manifest must be a JSON object, got str"),
    ({"version": 1}, r"expected 'cases' \(a list\)"),
    ({"version": 2, "cases": []}, "manifest version 2, expected 1"),
    ({"version": 1, "cases": [1]}, "cases.0: Input should be"),
    ({"version": 1, "cases": [], "meta": []}, r"'meta' \(an object\)"),
])
def test_manifest_shapes(tmp_path, doc, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(tmp_path, "manifest.json", doc))


def test_manifest_row_field_names_the_field(prep, tmp_path):
    doc = json.loads((prep / "prep" / "manifest.json").read_text())
    doc["cases"][1]["shape"] = [10, 36, 40.5]
    with pytest.raises(ManifestError, match=r"cases\.1\.shape\.2: Input should be a valid integer"):
        read_manifest(write(tmp_path, "manifest.json", doc))
    doc["cases"][1]["shape"] = [10, 0, 40]
    with pytest.raises(ManifestError, match="empty shape"):
        read_manifest(write(tmp_path, "manifest.json", doc))
    doc["cases"][1]["shape"], doc["cases"][1]["colour"] = [10, 36, 40], "red"
    with pytest.raises(ManifestError, match=r"cases\.1\.colour: Unexpected keyword"):
        read_manifest(write(tmp_path, "manifest.json", doc))


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not valid JSON"), ("", "not valid JSON"), ("\xff", "not valid JSON|cannot read"),
    ('{"train": "a", "val": [], "test": []}', "'train' must be a list of case keys"),
    ('{"train": [], "val": [1], "test": []}', "'val' must be a list of case keys"),
    ('{"train": ["x/1"], "val": [], "test": [], "subsets": {"1": ["x/2"]}}', "'subsets' must map sizes"),
    ('{"train": ["x/1"], "val": [], "test": []}', "case x/1 is not in the manifest"),
    ("[1, 2]", "a split must be a JSON object, got list"),
])
def test_split_shapes(tmp_path, text, message):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(SplitError, match=message):
        read_split(path, known=["demo/a"])


def test_missing_and_directory_are_told_apart(tmp_path):
    with pytest.raises(SplitError, match="no split"):
        read_split(tmp_path / "split.json")
    (tmp_path / "split.json").mkdir()
    with pytest.raises(SplitError, match="is a directory, not a split"):
        read_split(tmp_path / "split.json")
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match="is a directory, not a manifest"):
        read_manifest(tmp_path / "manifest.json")


@pytest.mark.parametrize(("doc", "message"), [
    ([], "a case table must be a JSON object, got list"),
    ({"version": 1, "cases": {}, "sources": {}}, "expected 'cases' and 'skipped' lists"),
    ({"version": 1, "cases": [3], "sources": {}}, r"cases\[0\]: a row must be an object"),
    ({"version": 1, "cases": [{"source": "demo"}], "sources": {}}, r"cases\[0\]: missing key 'image'"),
    ({"version": 1, "cases": [{"source": "demo", "case_id": "../x", "patient_id": "p", "modality": "CT",
                               "image": "a.nii.gz", "label": None, "label_map": {}, "image_sha256": ""}],
      "sources": {}}, r"cases\[0\]: demo/\.\./x: case ids may only hold"),
])
def test_case_table_shapes(tmp_path, doc, message):
    from segevo.data.cases import TABLE_VERSION

    if isinstance(doc, dict):
        doc["version"] = TABLE_VERSION
    path = write(tmp_path, "cases.json", doc)
    with pytest.raises(CaseError, match=message) as err:
        read_case_table(path)
    assert str(err.value).startswith(str(path))


def test_prepared_arrays(prep, tmp_path):
    cases, _ = read_manifest(prep / "prep" / "manifest.json")
    check_prep_arrays(cases, prep / "prep")
    case = cases[0]
    image = case.path(prep / "prep", "image")
    good = image.read_bytes()
    try:
        image.write_bytes(good[: len(good) // 2])
        for mmap in (False, True):
            with pytest.raises(UserError, match=rf"{image}: truncated or corrupt prepared image array of demo/"):
                read_prep_array(case, prep / "prep", "image", mmap=mmap)
        with pytest.raises(UserError, match="truncated or corrupt"):
            check_prep_arrays(cases, prep / "prep")
        image.write_bytes(b"not an array")
        with pytest.raises(UserError, match="truncated or corrupt"):
            read_prep_array(case, prep / "prep", "image")
        np.save(image, np.zeros((2, 2, 2), np.float16))
        with pytest.raises(ManifestError, match=r"shape \(2, 2, 2\), but the manifest gives \(12, 40, 44\)"):
            read_prep_array(case, prep / "prep", "image")
        np.save(image, np.array([object()]), allow_pickle=True)
        with pytest.raises(UserError, match="truncated or corrupt"):  # never unpickled
            read_prep_array(case, prep / "prep", "image")
        image.unlink()
        with pytest.raises(UserError, match=f"{image}: no such prepared image array"):
            read_prep_array(case, prep / "prep", "image")
    finally:
        image.write_bytes(good)


@pytest.mark.parametrize(("meta", "message"), [
    ([], "must be a JSON object, got list"),
    ({"format": "segevo-adapters/0"}, "format 'segevo-adapters/0'"),
    ({"format": "segevo-adapters/1", "model": [], "adapters": {}, "priors": {}, "tasks": []}, "'model' must be"),
    ({"format": "segevo-adapters/1", "model": {}, "adapters": {}, "priors": {}, "tasks": [["a"]]}, "'tasks' must"),
    ({"format": "segevo-adapters/1", "model": {}, "adapters": {}, "priors": {}, "tasks": [],
      "base": {"seed": True}}, "'base' must be an object"),
])
def test_adapter_metadata_shapes(tmp_path, meta, message):
    write(tmp_path, "adapters.json", meta)
    with pytest.raises(CheckpointError, match=message):
        read_meta(tmp_path)


def test_adapter_folder_that_is_a_file_or_missing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; an adapter checkpoint is a folder"):
        read_meta(tmp_path / "file")
    with pytest.raises(CheckpointError, match="does not exist; an adapter checkpoint is a folder"):
        read_meta(tmp_path / "missing")
