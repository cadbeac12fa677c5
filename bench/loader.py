"""Training samples per second per CPU core from the prep cache -> bench/results/loader.json.

usage: python bench/loader.py [--out FILE] [--config YAML] [--samples N] [--keep DIR]

Builds two prep caches offline (the demo cases, and the demo CT resampled to 512x512x300, as in
bench/preprocess.py) at the profile's ROI (default configs/full.yaml: 32x256x256), then draws samples in one
process (one core): crop or zoom-out choice, flips, intensity jitter, class target, box and point prompts,
pseudo-mask prompts. Anchor: SegVol-style online transforms give 11.2 and 0.2 samples/s per core on these two.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402
from preprocess import big_ct  # noqa: E402

from segevo.config import load_config  # noqa: E402

ANCHOR = {"demo": 11.2, "ct_512x512x300": 0.2}


def measure(cfg, samples: int) -> dict:
    from segevo.data.dataset import TrainDataset
    from segevo.data.manifest import read_manifest

    prep = Path(cfg.data.root) / "prep"
    cases, _ = read_manifest(prep / "manifest.json")
    ds = TrainDataset(prep, cases, cfg.model.roi_size, cfg.loader.model_copy(update={"samples_per_epoch": samples}))
    for i in range(3):  # memory maps opened, caches warm
        ds[i]
    start = time.perf_counter()
    for i in range(samples):
        ds[i]
    seconds = time.perf_counter() - start
    return {"cases": len(cases), "samples": samples, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 2), "ms_per_sample": round(1000 * seconds / samples, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "loader.json"))
    ap.add_argument("--config", default=str(REPO / "configs" / "full.yaml"))
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--keep", help="build the data roots here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("SEGEVO_CACHE", str(REPO / ".cache" / "segevo" / "downloads"))
    from segevo.data.preprocess.stages import run_preprocess, run_pseudomask
    from segevo.data.raw import download_sources

    base = load_config(args.config)
    load = os.getloadavg()[0]
    by_size = {}
    with tempfile.TemporaryDirectory(prefix="segevo-loader-") as tmp:
        work = Path(args.keep or tmp)
        demo = base.model_copy(update={"data": base.data.model_copy(update={"root": str(work / "demo"),
                                                                            "sources": ["demo"]})})
        download_sources(demo.data)
        for name, cfg in (("demo", demo), ("ct_512x512x300", None)):
            cfg = cfg or big_ct(demo, work / "big")
            run_pseudomask(cfg, workers=1)
            run_preprocess(cfg, workers=1)
            by_size[name] = {**measure(cfg, args.samples), "segvol_online_anchor": ANCHOR[name]}
            print(name, by_size[name], flush=True)
    result = {
        "benchmark": "loader",
        "roi_size": list(base.model.roi_size),
        "threads": 1,
        "by_size": by_size,
        "samples_per_s_per_core": min(v["samples_per_s"] for v in by_size.values()),
        "target_per_core": 25,
        "load_avg_1min": round(load, 2),
        "numpy": np.__version__,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
