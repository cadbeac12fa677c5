"""Data stages' throughput: cases per minute of ``segevo pseudomask`` and ``segevo preprocess`` on the demo cases and
on a full-resolution CT (the demo CT resampled to 512x512x300) -> bench/results/preprocess.json.

usage: python bench/preprocess.py [--out FILE] [--config YAML] [--workers N] [--keep DIR]

Everything runs in a temporary data root (the demo comes from the download cache, offline). ``workers`` defaults to
1, so the figures are per core; the numba kernels are loaded once before timing. ``peak_rss_gib`` is this
process's peak resident memory when the stages ran in it (workers = 1): what one worker needs for such a case.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

from segevo.config import SegevoConfig, load_config  # noqa: E402

BIG = (512, 512, 300)


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def time_stages(cfg: SegevoConfig, workers: int) -> dict:
    from segevo.data.preprocess.stages import run_preprocess, run_pseudomask

    t0 = time.perf_counter()
    pseudo = run_pseudomask(cfg, workers=workers, force=True)
    t1 = time.perf_counter()
    prep = run_preprocess(cfg, workers=workers, force=True)
    t2 = time.perf_counter()
    n = prep.computed
    assert pseudo.computed == n and not prep.skipped, "every case must be computed for the timing to mean much"
    return {
        "cases": n,
        "pseudomask_seconds": round(t1 - t0, 2),
        "preprocess_seconds": round(t2 - t1, 2),
        "pseudomask_cases_per_minute": round(60 * n / (t1 - t0), 2),
        "preprocess_cases_per_minute": round(60 * n / (t2 - t1), 2),
        "both_cases_per_minute": round(60 * n / (t2 - t0), 2),
        "peak_rss_gib": _peak_rss_gib(),
    }


def big_ct(demo: SegevoConfig, root: Path) -> SegevoConfig:
    """The demo CT and its label resampled to 512x512x300 (linear / nearest), as NIfTI, in a one-case table."""
    import nibabel as nib
    from scipy import ndimage

    from segevo.data.cases import Case, CaseTable, read_case_table, write_case_table

    table = read_case_table(Path(demo.data.root) / "raw" / "cases.json")
    ct = next(c for c in table.cases if c.case_id == "example_ct")
    img, seg = nib.load(ct.image), nib.load(ct.label)
    factors = [b / s for b, s in zip(BIG, img.shape, strict=True)]
    image = ndimage.zoom(np.asanyarray(img.dataobj).astype(np.float32), factors, order=1).astype(np.int16)
    label = ndimage.zoom(np.asanyarray(seg.dataobj), factors, order=0)
    affine = img.affine @ np.diag([1 / f for f in factors] + [1])
    folder = root / "raw" / "big"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "ct_seg.nii.gz")
    case = Case.from_source("big", "ct_512", "big-ct", "CT", folder / "ct.nii.gz", folder / "ct_seg.nii.gz",
                            ct.label_map, annotation="model")
    write_case_table(root / "raw" / "cases.json", CaseTable([case], {"big": {}}, []))
    return demo.model_copy(update={"data": demo.data.model_copy(update={"root": str(root)})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "preprocess.json"))
    ap.add_argument("--config", default=str(REPO / "params.yaml"), help="profile (default: params.yaml)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", help="build the data roots here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("SEGEVO_CACHE", str(REPO / ".cache" / "segevo" / "downloads"))
    from segevo.data.pseudomask import felzenszwalb_3d
    from segevo.data.raw import download_sources

    felzenszwalb_3d(np.random.default_rng(0).random((8, 8, 8)))  # numba kernels loaded before any timing
    base = load_config(args.config)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="segevo-bench-") as tmp:
        work = Path(args.keep or tmp)
        demo = base.model_copy(update={"data": base.data.model_copy(update={"root": str(work / "demo"),
                                                                            "sources": ["demo"]})})
        download_sources(demo.data)
        demo_result = time_stages(demo, args.workers)
        print("demo:", demo_result)
        big = big_ct(demo, work / "big")
        big_result = time_stages(big, args.workers)
        print(f"{'x'.join(map(str, BIG))}:", big_result)
    result = {
        "benchmark": "preprocess",
        "workers": args.workers,
        "roi_size": list(base.model.roi_size),
        "pseudomask_grid": list(base.pseudomask.grid),
        "demo": demo_result,
        "ct_512x512x300": big_result,
        "load_avg_1min": round(load, 2),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
