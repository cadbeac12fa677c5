"""Seconds per volume of ``segevo predict``'s inference: zoom-out only and zoom-out-zoom-in, one text+box query.

Anchor (reference/gpu-anchor.md, issue 6): SegVol's released zoom-out forward takes 4.6 s on this CPU, and runs at
20.8 volumes/s (fp32, batch 1) / 60 volumes/s (bf16, batch 4) on an H200. The model is randomly initialised
(seeded), so the zoom-in ROI comes from a random coarse mask: the JSON records how many windows ran.

usage: python bench/inference.py --size tiny|full [--device cpu|cuda] [--precision fp32|bf16]
                                 [--option KEY=VALUE ...] [--volume D,H,W] [--repeats 3]
                                 --out bench/results/inference_cpu_full.json
(``--option`` sets any other ``inference`` key, e.g. ``window_grid=volume``; the defaults are SegVol's procedure.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

from segevo.config import InferenceConfig, load_config  # noqa: E402
from segevo.data.tasks import TaskVocabulary  # noqa: E402
from segevo.inference import Query, ZoomInference  # noqa: E402
from segevo.training import build_model  # noqa: E402

PROFILES = {"tiny": REPO / "params.yaml", "full": REPO / "configs" / "full.yaml"}
VOLUMES = {"tiny": (48, 192, 192), "full": (96, 384, 384)}  # a foreground-cropped abdomen is about this size


def synthetic_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth body-like volume in [0, 1]: an ellipsoid with two brighter organs and noise."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    body = (x**2 + y**2 / 0.7 + z**2 / 1.5 < 1).astype(np.float32) * 0.4
    body += ((x - 0.3) ** 2 + y**2 + z**2 < 0.12) * 0.3
    body += ((x + 0.4) ** 2 + (y + 0.2) ** 2 + z**2 < 0.05) * 0.25
    return np.clip(body + rng.normal(0, 0.03, shape).astype(np.float32), 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(PROFILES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="another inference key")
    ap.add_argument("--volume", help="D,H,W of the cropped volume (default by size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(PROFILES[args.size])
    shape = tuple(int(v) for v in args.volume.split(",")) if args.volume else VOLUMES[args.size]
    model = build_model(cfg, TaskVocabulary([("demo", "liver")])).to(args.device).eval()
    volume = synthetic_volume(shape)
    d, h, w = shape
    query = Query(text="liver", box=np.array([d * 0.3, h * 0.35, w * 0.5, d * 0.7, h * 0.65, w * 0.85]),
                  task="liver")
    options = {"precision": args.precision, **dict(o.split("=", 1) for o in args.option)}
    row: dict = {"size": args.size, "device": args.device, "options": options, "volume": list(shape),
                 "roi_size": list(cfg.model.roi_size), "modality": "MRI (LoRA expert + priors)"}
    for mode, zoom_in in (("zoom_out", False), ("zoom_out_zoom_in", True)):
        zoom = ZoomInference(model, InferenceConfig.model_validate({**options, "zoom_in": zoom_in}), args.device)
        times, windows = [], 0
        for i in range(args.repeats + 1):  # the first run warms up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            (result,) = zoom.run(volume, "MRI", [query])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
            windows = result.windows
        median = sorted(times)[len(times) // 2]
        row[mode] = {"seconds_per_volume": round(median, 3), "volumes_per_s": round(1 / median, 3),
                     "windows": windows, "times": [round(t, 3) for t in times]}
        print(f"{args.size} {mode}: {median:.3f} s per volume ({windows} windows)")
    extra = row["zoom_out_zoom_in"]["seconds_per_volume"] - row["zoom_out"]["seconds_per_volume"]
    row["zoom_in_seconds_per_window"] = round(extra / max(row["zoom_out_zoom_in"]["windows"], 1), 3)
    row["anchor"] = {"segvol_zoom_out_cpu_s": 4.6, "segvol_zoom_out_h200_fp32_volumes_per_s": 20.8,
                     "segvol_zoom_out_h200_bf16_b4_volumes_per_s": 60}
    write_result(args.out, row)


if __name__ == "__main__":
    main()
