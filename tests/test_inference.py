"""Zoom-out-zoom-in on the tiny model: window grid, ROI, prompts per window, batching, and the invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from segevo.config import InferenceConfig, parse_config
from segevo.data.tasks import TaskVocabulary
from segevo.inference import PromptError, Query, ZoomInference, check_query, grow_roi, window_starts
from segevo.training import build_model

ROI = tuple(TINY["roi_size"])  # (8, 32, 32)


@pytest.fixture(scope="module")
def model():
    cfg = parse_config({"model": TINY, "priors": {"dim": 16, "num_heads": 2}})
    m = build_model(cfg, TaskVocabulary([("demo", "liver"), ("demo", "spleen")]))
    with torch.no_grad():  # non-zero gates and LoRA so that priors and experts really act
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.random((20, 70, 45)).astype(np.float32) * 0.2
    v[6:14, 20:50, 10:30] += 0.7
    return v


def test_window_grid_matches_monai():
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    assert window_starts(40, 32, 0.0) == [0, 8]


def test_roi_grows_to_the_window_inside_the_volume():
    mask = np.zeros((20, 70, 45), bool)
    mask[1:3, 60:62, 5:40] = True
    assert grow_roi(mask, ROI) == ((0, 8), (38, 70), (5, 40))
    assert grow_roi(np.zeros((4, 4, 4), bool), ROI) is None
    small = np.zeros((4, 10, 10), bool)
    small[1, 1, 1] = True
    assert grow_roi(small, ROI) == ((0, 4), (0, 10), (0, 10))  # smaller than a window: the whole volume


def test_prompts_are_checked_against_the_volume():
    shape = (10, 20, 30)
    with pytest.raises(PromptError, match="outside"):
        check_query(Query(box=np.array([0, 0, 0, 5, 5, 5]) + 40), shape)
    with pytest.raises(PromptError, match="start after"):
        check_query(Query(box=np.array([5, 5, 5, 1, 1, 1])), shape)
    with pytest.raises(PromptError, match="outside"):
        check_query(Query(points=np.array([[0, 0, 31]])), shape)
    with pytest.raises(PromptError, match="positive"):
        check_query(Query(points=np.array([[1, 1, 1]]), point_labels=np.array([0])), shape)
    with pytest.raises(PromptError, match="at least one"):
        check_query(Query(), shape)
    clipped = check_query(Query(box=np.array([-3, 2, 2, 8, 25, 40])), shape)
    assert clipped.box.tolist() == [0, 2, 2, 8, 19, 29]


def _queries() -> list[Query]:
    box = np.array([6, 20, 10, 13, 49, 29])
    pts = np.array([[9, 30, 20], [10, 35, 15], [2, 5, 40]])
    labels = np.array([1, 1, 0])
    return [Query(text="liver", task="liver"), Query(box=box, task=("demo", "spleen")),
            Query(points=pts, point_labels=labels), Query(text="liver", box=box, points=pts, point_labels=labels,
                                                           task="liver")]


def test_outputs_cover_the_volume_for_every_prompt_type(model, volume):
    zoom = ZoomInference(model, InferenceConfig(precision="fp32"))
    results = list(zoom.run(volume, "MRI", _queries()))
    assert len(results) == 4
    for r in results:
        assert r.logits.shape == volume.shape and r.logits.dtype == np.float32 and np.isfinite(r.logits).all()


def test_batched_windows_equal_one_at_a_time(model, volume):
    one = ZoomInference(model, InferenceConfig(precision="fp32", window_batch=1))
    many = ZoomInference(model, InferenceConfig(precision="fp32", window_batch=8))
    for a, b in zip(one.run(volume, "MRI", _queries()), many.run(volume, "MRI", _queries()), strict=True):
        assert a.windows == b.windows
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


def test_zoom_out_is_the_model_on_the_resized_volume(model, volume):
    zoom = ZoomInference(model, InferenceConfig(precision="fp32", zoom_in=False))
    query = Query(text="liver", task="liver")
    (result,) = zoom.run(volume, "MRI", [query])
    x = F.interpolate(torch.from_numpy(volume)[None, None], size=ROI, mode="trilinear", align_corners=False)
    with torch.no_grad():
        direct = model(x, "MRI", ["liver"], task=["liver"])[0, 0]
    expected = F.interpolate(direct[None, None], size=volume.shape, mode="nearest-exact")[0, 0]
    np.testing.assert_allclose(result.logits, expected.numpy(), atol=1e-5)
    assert result.windows == 0 and result.roi is None


def test_zoom_in_replaces_the_roi_only(model, volume):
    out = ZoomInference(model, InferenceConfig(precision="fp32", zoom_in=False))
    full = ZoomInference(model, InferenceConfig(precision="fp32"))
    query = [Query(text="liver", task="liver")]
    (coarse,), (fine,) = list(out.run(volume, "MRI", query)), list(full.run(volume, "MRI", query))
    if fine.roi is None:
        pytest.skip("the random tiny model found no foreground")
    inside = np.zeros(volume.shape, bool)
    inside[tuple(slice(s, e) for s, e in fine.roi)] = True
    np.testing.assert_array_equal(fine.logits[~inside], coarse.logits[~inside])
    assert fine.windows >= 1 and not np.array_equal(fine.logits[inside], coarse.logits[inside])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ct_through_moa_equals_plain_segvol(model, volume, precision):
    """The identity expert with priors skipped: zoom-out-zoom-in on CT is the base model's, bit for bit, with
    queries of several tasks (batched as plain SegVol batches them) and in either precision."""
    from segevo.config import AdaptersConfig, PriorsConfig
    from segevo.model.adapted import AdaptedSegVol
    from segevo.model.segvol import SegVol

    torch.manual_seed(0)  # build_model's seed: the same base weights, without LoRA layers injected
    plain = AdaptedSegVol(SegVol(model.base.cfg), AdaptersConfig(enabled=False), PriorsConfig(enabled=False)).eval()
    opts = InferenceConfig(precision=precision)
    for a, b in zip(ZoomInference(model, opts).run(volume, "CT", _queries()),
                    ZoomInference(plain, opts).run(volume, "CT", _queries()), strict=True):
        np.testing.assert_array_equal(a.logits, b.logits)


def test_bad_volumes_are_refused(model):
    zoom = ZoomInference(model, InferenceConfig(precision="fp32"))
    bad = np.zeros((8, 32, 32), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        list(zoom.run(bad, "MRI", [Query(text="liver")]))
    with pytest.raises(ValueError, match="3D"):
        list(zoom.run(np.zeros((8, 32)), "MRI", [Query(text="liver")]))
    with pytest.raises(ValueError, match="modality"):
        list(zoom.run(np.zeros((8, 32, 32), np.float32), "PET", [Query(text="liver")]))
