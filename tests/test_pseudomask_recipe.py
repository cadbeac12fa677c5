"""SegVol's pseudo-mask recipe end to end on the demo CT, against an independent computation: the image read with
nibabel, normalised by the formula, resized by MONAI's own ``Resize`` (default area mode, as SegVol's
``pseudo_mask_process.py`` calls it) and partitioned by the condensed port of SegVol's pure-Python FH."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_data_pseudomask_stage import demo_cache
from test_pseudomask import same_partition, segvol_fh

from segevo.config import PseudoMaskConfig, parse_config
from segevo.data.cases import read_case_table
from segevo.data.preprocess.case import segvol_intensity
from segevo.data.preprocess.transforms import resize_linear
from segevo.data.pseudomask import felzenszwalb_3d, pseudomask_case, resize_area
from segevo.data.readers import read_case

GRID = (64, 64, 16)  # small enough for the pure-Python FH (SegVol's grid takes it 100 s)
MIN_SIZE = 100


@pytest.fixture(scope="module")
def demo_ct(tmp_path_factory) -> tuple:
    from segevo.data.raw import download_sources
    from segevo.errors import DownloadError

    root = tmp_path_factory.mktemp("demo")
    cfg = parse_config({"data": {"root": str(root / "data")}})
    mp = pytest.MonkeyPatch()
    mp.setenv("SEGEVO_CACHE", str(demo_cache()))
    try:
        download_sources(cfg.data)
    except DownloadError as err:
        pytest.skip(f"package index unreachable and the demo sdist not cached: {err}")
    finally:
        mp.undo()
    table = read_case_table(root / "data" / "raw" / "cases.json")
    return next(c for c in table.cases if c.case_id == "example_ct")


def segvol_normalise(image: np.ndarray) -> np.ndarray:
    """ForegroundNormalization then MinMaxNormalization, written from SegVol's description."""
    fg = image[image > image.mean()]
    low, high = np.percentile(fg, [0.05, 99.95])
    out = (np.clip(image, low, high) - fg.mean()) / max(fg.std(), 1e-8)
    out = out - out.min()
    return out / max(out.max(), 1e-8)


def test_area_resize_is_monais_default(demo_ct):
    from monai.transforms import Resize

    raw = nib.load(demo_ct.image).get_fdata(dtype=np.float32)
    reference = np.asarray(Resize(spatial_size=GRID)(segvol_normalise(raw)[None]))[0]
    ours = resize_area(segvol_intensity(read_case(demo_ct)), GRID)
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    assert np.abs(resize_linear(segvol_intensity(read_case(demo_ct)), GRID) - reference).max() > 1e-2


def test_demo_ct_partition_matches_segvol_recipe(demo_ct):
    from monai.transforms import Resize

    raw = nib.load(demo_ct.image).get_fdata(dtype=np.float32)
    image = np.asarray(Resize(spatial_size=GRID)(segvol_normalise(raw)[None]), dtype=np.float32)[0]
    expected = segvol_fh(image, 0.8, MIN_SIZE)
    assert len(np.unique(expected)) > 5
    cfg = PseudoMaskConfig(grid=GRID, min_size=MIN_SIZE)
    normalised = segvol_intensity(read_case(demo_ct))
    ours = pseudomask_case(normalised, np.zeros((0, *normalised.shape), np.uint8), cfg)  # no class: FH alone
    assert same_partition(ours, expected)
    trilinear = felzenszwalb_3d(resize_linear(normalised, GRID), 0.8, MIN_SIZE)
    assert not same_partition(trilinear, expected), "the resize mode matters: the test can tell them apart"
