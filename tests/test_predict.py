"""``segevo predict`` on the demo volumes: the mask lands on the input's exact grid, affine and orientation
(also for a non-RAS file), prompts in the file's voxel coordinates, and bad input fails cleanly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY

from segevo.config import parse_config
from segevo.data.tasks import TaskVocabulary
from segevo.model.adapter_io import save_adapters
from segevo.training import build_model
from segevo_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The demo's CT and MR NIfTI files (fetched once with pip into the shared cache, then offline)."""
    from segevo.data.cases import read_case_table
    from segevo.data.raw import download_sources
    from segevo.errors import DownloadError

    os.environ.setdefault("SEGEVO_CACHE", str(REPO / ".cache" / "segevo" / "downloads"))
    root = tmp_path_factory.mktemp("demo") / "data"
    try:
        download_sources(parse_config({"data": {"root": str(root)}}).data)
    except DownloadError as err:
        pytest.skip(f"package index unreachable and the demo sdist not cached: {err}")
    table = read_case_table(root / "raw" / "cases.json")
    return {c.case_id: c.image for c in table.cases}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    cfg = parse_config({"model": TINY, "priors": {"dim": 16, "num_heads": 2}})
    model = build_model(cfg, TaskVocabulary([("demo", "liver"), ("demo", "spleen")]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return save_adapters(model, tmp_path_factory.mktemp("adapter") / "adapter")


def predict(*args: str) -> int:
    return main(["predict", *args])


@pytest.mark.parametrize("case,modality", [("example_ct_sm", "CT"), ("example_mr_sm", "MRI")])
def test_mask_on_the_input_grid(demo, adapter, tmp_path, case, modality, capsys):
    out = tmp_path / "mask.nii.gz"
    assert predict("--image", str(demo[case]), "--out", str(out), "--modality", modality, "--text", "liver",
                   "--text", "spleen", "--adapter", str(adapter)) == 0
    src, mask = nib.load(demo[case]), nib.load(out)
    assert mask.shape == src.shape[:3]
    np.testing.assert_allclose(mask.affine, src.affine)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(src.affine)
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
    names = json.loads((tmp_path / "mask.json").read_text())["labels"]
    assert names == {"1": "liver", "2": "spleen"}


def test_non_ras_file_and_voxel_coordinates(demo, adapter, tmp_path):
    """A file stored with permuted, flipped axes (not RAS): the mask follows that file's own grid, affine and
    orientation, with the box given in that file's voxel indices."""
    src = nib.load(demo["example_mr_sm"])
    data = np.asarray(src.dataobj)
    swapped = np.flip(data.transpose(1, 0, 2), axis=2)  # (Y, X, -Z)
    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flip = np.diag([1, 1, -1, 1.0])
    flip[2, 3] = data.shape[2] - 1
    affine = src.affine @ perm @ flip  # voxel (j, i, k') of the new file is voxel (i, j, Z-1-k') of the old
    odd = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(swapped), affine), odd)
    assert nib.aff2axcodes(affine) != nib.aff2axcodes(src.affine)
    out = tmp_path / "odd_mask.nii.gz"
    assert predict("--image", str(odd), "--out", str(out), "--modality", "MRI", "--box", "20,30,5,60,80,15",
                   "--adapter", str(adapter), "--no-zoom-in") == 0
    mask = nib.load(out)
    assert mask.shape == swapped.shape
    np.testing.assert_allclose(mask.affine, affine)
    assert np.asarray(mask.dataobj).any()
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(affine)


def test_bad_input_fails_with_one_line_and_writes_nothing(demo, adapter, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    base = ["--out", str(out), "--modality", "MRI", "--adapter", str(adapter)]
    image = str(demo["example_mr_sm"])

    def error(*args: str) -> str:
        assert predict(*args) == 1
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
        return capsys.readouterr().err.strip()

    assert "outside the volume" in error("--image", image, *base, "--box", "0,0,0,500,10,10")
    assert "outside the volume" in error("--image", image, *base, "--point=-1,3,3")
    assert "at least one prompt" in error("--image", image, *base)
    assert "at most one --text" in error("--image", image, *base, "--text", "a", "--text", "b", "--point", "1,1,1")
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(Path(image).read_bytes()[:5000])
    assert "corrupt or truncated" in error("--image", str(truncated), *base, "--text", "liver")
    src = nib.load(image)
    bad = np.asarray(src.dataobj).astype(np.float32)
    bad[3, 3, 3] = np.nan
    nan_file = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(bad, src.affine), nan_file)
    assert "NaN/Inf" in error("--image", str(nan_file), *base, "--text", "liver")
    assert "no model" in error("--image", image, "--out", str(out), "--modality", "MRI", "--text", "liver")
    msg = error("--image", image, *base[:-2], "--adapter", str(tmp_path / "missing"), "--text", "liver")
    assert "adapter" in msg or "missing" in msg


def test_unknown_class_name_warns_with_the_closest(demo, adapter, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    assert predict("--image", str(demo["example_mr_sm"]), "--out", str(out), "--modality", "MRI",
                   "--text", "livr", "--adapter", str(adapter), "--no-zoom-in") == 0
    err = capsys.readouterr().err
    assert "'livr' is not a trained task" in err and "liver" in err


# ---- the library Predictor behind the verb ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(adapter):
    from segevo.config import InferenceConfig
    from segevo.inference import Predictor

    return Predictor.load(parse_config({"model": TINY}).model, InferenceConfig(), adapter=str(adapter), device="cpu")


def test_file_coordinates_map_onto_the_model_volume():
    """SegVol's axes are the file's reversed; the foreground crop's start is subtracted; a box is cut to the crop."""
    from segevo.inference import PromptError, Query, to_model

    start, end = (2, 5, 1), (10, 40, 30)  # crop on the model grid (D, H, W) = file (Z, Y, X)
    q = to_model(Query(text="liver", box=np.array([3.0, 8, 4, 20, 30, 12]), points=np.array([[25.0, 10, 6]]),
                       point_labels=np.array([1])), start, end)
    # file (x, y, z) -> model (z, y, x) - start: box lo (4, 8, 3) - (2, 5, 1) = (2, 3, 2); hi (12, 30, 20) - start
    # = (10, 25, 19), cut to the crop's size - 1 = (7, 34, 28) -> (7, 25, 19)
    assert q.box.tolist() == [2, 3, 2, 7, 25, 19]
    assert q.points.tolist() == [[4, 5, 24]] and q.task == "liver"
    with pytest.raises(PromptError, match="only background"):
        to_model(Query(box=np.array([0.0, 0, 0, 0, 0, 1])), start, end)


def test_predict_array_is_the_model_space_run_pasted_back(predictor):
    """Two text queries on a raw (X, Y, Z) array: the label map equals the model-space results resolved by hand
    (a voxel takes the most confident query whose mask holds it) and pasted into the raw grid."""
    from segevo.data.preprocess.geometry import paste_back, prepare_image
    from segevo.inference import Query, to_model

    rng = np.random.default_rng(0)
    raw = np.zeros((50, 40, 14), np.float32)
    raw[5:45, 4:36, 2:12] = rng.normal(100, 20, (40, 32, 10))
    queries = [Query(text="liver"), Query(text="spleen")]
    prediction = predictor.predict_array(raw, "MRI", queries, affine=np.eye(4))
    volume, start, end = prepare_image(raw)
    logits = np.stack([r.logits for r in predictor.run(volume, "MRI", [to_model(q, start, end) for q in queries])])
    masked = np.where(logits > 0, logits, -np.inf)
    expected = np.where(np.isfinite(masked).any(0), masked.argmax(0) + 1, 0).astype(np.uint8)
    np.testing.assert_array_equal(prediction.labels, paste_back(expected, raw.shape, start, end))
    assert prediction.labels.shape == raw.shape and prediction.names == {"1": "liver", "2": "spleen"}
    assert [o.voxels for o in prediction.outcomes] == [int((logits[i] > 0).sum()) for i in range(2)]


def test_prompts_are_checked_on_the_file_grid(predictor):
    from segevo.inference import PromptError, Query

    raw = np.ones((20, 30, 10), np.float32)
    with pytest.raises(PromptError, match=r"outside the volume of shape \(20, 30, 10\)"):
        predictor.predict_array(raw, "MRI", [Query(box=np.array([0, 0, 0, 19, 29, 10]))])
    with pytest.raises(PromptError, match="positive"):
        predictor.predict_array(raw, "MRI", [Query(points=np.array([[1, 1, 1]]), point_labels=np.array([0]))])
