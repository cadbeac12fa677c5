"""Zoom-out-zoom-in on the tiny model: window grid, ROI, prompts per window, batching, and the invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from segevo.config import InferenceConfig, parse_config
from segevo.data.tasks import TaskVocabulary
from segevo.inference import PromptError, Query, ZoomInference, check_query, grow_roi, plan_windows, window_starts
from segevo.inference.windows import window_crop
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


def test_roi_rule_is_segvols():
    """reference/segvol.md 1.8 step 3, computed by hand: the bounding box of the coarse mask; an axis shorter than
    the window grows by half the shortfall on each side (integer halving, as the release's inclusive integer
    ROI), clipped to the volume. Returned as (start, end exclusive)."""
    mask = np.zeros((20, 70, 45), bool)
    mask[1:3, 60:62, 5:40] = True  # box d 1..2, h 60..61, w 5..39
    # d: 2 long, short by 6 -> 1-3..2+3 = -2..5 -> clipped 0..5; h: short by 30 -> 45..76 -> 45..69; w: 35 >= 32
    assert grow_roi(mask, ROI) == ((0, 6), (45, 70), (5, 40))
    middle = np.zeros((20, 70, 45), bool)
    middle[8:10, 30:35, 20:21] = True  # d 8..9 short by 6; h 30..34 short by 27 (odd): 13 each side; w short by 31: 15
    assert grow_roi(middle, ROI) == ((5, 13), (17, 48), (5, 36))
    assert grow_roi(np.zeros((4, 4, 4), bool), ROI) is None


def segvol_roi(mask: np.ndarray, window) -> tuple | None:
    """reference/segvol.md 1.8 step 3 as written there, independent of segevo's code: the inclusive bounding box
    of the foreground; an axis shorter than the window grows by half the deficit on each side, clipped to the
    volume; (start, end exclusive) per axis, None for no foreground."""
    found = np.argwhere(mask)
    if len(found) == 0:
        return None
    roi = []
    for n, w, lo, hi in zip(mask.shape, window, found.min(0), found.max(0), strict=True):
        half = max(0, w - (hi - lo + 1)) // 2
        roi.append((int(max(0, lo - half)), int(min(n - 1, hi + half)) + 1))
    return tuple(roi)


def test_zoom_in_uses_segvols_roi_of_its_own_coarse_mask(model, volume):
    """Through the public API: each query's ROI is the reference rule applied to the coarse logits it reports."""
    for r in ZoomInference(model, InferenceConfig()).run(volume, "MRI", _queries()):
        assert r.roi == segvol_roi(r.coarse > 0, ROI)


def test_shift_rule_keeps_the_window_inside_the_volume():
    mask = np.zeros((20, 70, 45), bool)
    mask[1:3, 60:62, 5:40] = True
    assert grow_roi(mask, ROI, "shift") == ((0, 8), (38, 70), (5, 40))
    small = np.zeros((4, 10, 10), bool)
    small[1, 1, 1] = True
    assert grow_roi(small, ROI, "shift") == ((0, 4), (0, 10), (0, 10))  # smaller than a window: the whole volume


def test_windows_over_the_roi_pad_it_like_monai():
    """SegVol's zoom-in is MONAI's sliding window over the ROI alone: an ROI shorter than the window is padded
    half before, the rest after, and the window sees zeros outside the ROI."""
    roi = ((0, 6), (45, 70), (5, 40))
    wins = plan_windows((20, 70, 45), roi, ROI, 0.5, "roi")
    # d: 6 -> padded 8, 1 before; h: 25 -> 32, 3 before; w: 35 -> grid [0, 3] (stride 16, last flush)
    assert [w.origin for w in wins] == [(-1, 42, 5), (-1, 42, 8)]
    assert all(w.region == roi for w in wins)
    volume = torch.arange(20 * 70 * 45, dtype=torch.float32).reshape(20, 70, 45) + 1
    crop = window_crop(volume, wins[0], ROI)
    assert crop.shape == ROI
    assert (crop[0] == 0).all() and (crop[7] == 0).all() and (crop[:, :3] == 0).all()
    assert torch.equal(crop[1:7, 3:28], volume[0:6, 45:70, 5:37])
    shared = plan_windows((20, 70, 45), roi, ROI, 0.5, "volume")  # today's grid: over the volume, then filtered
    # d grid 0,4,8,12 -> 0,4 meet 0..5; h grid 0,16,32,38 -> 16,32,38 meet 45..69; w grid 0,13 both meet 5..39
    assert [w.origin for w in shared] == [(d, h, w) for d in (0, 4) for h in (16, 32, 38) for w in (0, 13)]
    assert all(w.region == ((0, 20), (0, 70), (0, 45)) for w in shared)


def test_prompts_are_checked_against_the_volume():
    shape = (10, 20, 30)
    with pytest.raises(PromptError, match="outside"):
        check_query(Query(box=np.array([0, 0, 0, 5, 5, 5]) + 40), shape)
    with pytest.raises(PromptError, match="outside"):
        check_query(Query(box=np.array([-3, 2, 2, 8, 25, 40])), shape)  # partly outside: refused, not clipped
    with pytest.raises(PromptError, match="start after"):
        check_query(Query(box=np.array([5, 5, 5, 1, 1, 1])), shape)
    with pytest.raises(PromptError, match="outside"):
        check_query(Query(points=np.array([[0, 0, 30]])), shape)
    with pytest.raises(PromptError, match="positive"):
        check_query(Query(points=np.array([[1, 1, 1]]), point_labels=np.array([0])), shape)
    with pytest.raises(PromptError, match="at least one"):
        check_query(Query(), shape)
    with pytest.raises(PromptError, match="non-empty"):
        check_query(Query(text=" "), shape)
    ok = check_query(Query(box=[0, 2, 2, 9, 19, 29], points=[[9, 19, 29]]), shape)
    assert ok.box.tolist() == [0, 2, 2, 9, 19, 29] and ok.point_labels.tolist() == [1]


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


@pytest.mark.parametrize("resize", ["nearest-exact", "trilinear"])
def test_zoom_out_is_the_model_on_the_resized_volume(model, volume, resize):
    """The zoom-out is the model on the volume resized to the ROI (SegVol: nearest-exact; trilinear is the faster
    option), its logits brought back by torch's plain nearest rule: output voxel i reads input floor(i * n / N)."""
    zoom = ZoomInference(model, InferenceConfig(zoom_in=False, zoom_out_resize=resize))
    query = Query(text="liver", task="liver")
    (result,) = zoom.run(volume, "MRI", [query])
    extra = {"align_corners": False} if resize == "trilinear" else {}
    x = F.interpolate(torch.from_numpy(volume)[None, None], size=ROI, mode=resize, **extra)
    with torch.no_grad():
        direct = model(x, "MRI", ["liver"], task=["liver"])[0, 0].numpy()
    index = [np.arange(n) * r // n for n, r in zip(volume.shape, ROI, strict=True)]
    expected = direct[np.ix_(*index)]
    np.testing.assert_allclose(result.logits, expected, atol=1e-5)
    np.testing.assert_allclose(result.coarse, expected, atol=1e-5)
    np.testing.assert_allclose(result.zoom_out, direct, atol=1e-5)
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


def test_segvol_runs_every_window_of_the_roi(model, volume):
    """SegVol's zoom-in runs every window over the ROI, a window with an empty coarse mask with a box of -1s;
    ``empty_windows: skip`` leaves such windows out."""
    box = Query(box=np.array([6, 20, 10, 13, 49, 29]), task="liver")
    (run,) = ZoomInference(model, InferenceConfig()).run(volume, "MRI", [box])
    (skip,) = ZoomInference(model, InferenceConfig(empty_windows="skip")).run(volume, "MRI", [box])
    if run.roi is None:
        pytest.skip("the random tiny model found no foreground")
    assert run.windows == len(plan_windows(volume.shape, run.roi, ROI, 0.5, "roi"))
    assert skip.roi == run.roi and skip.windows <= run.windows


def test_faster_options_run(model, volume):
    fast = InferenceConfig(precision="bf16", zoom_out_resize="trilinear", roi_rule="shift", window_grid="volume",
                           empty_windows="skip")
    for r in ZoomInference(model, fast).run(volume, "MRI", _queries()):
        assert r.logits.shape == volume.shape and np.isfinite(r.logits).all()


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
