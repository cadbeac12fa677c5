"""SegVol forward/backward timings per config and prompt type -> bench/results/model_forward.json.

usage: python bench/model_forward.py [--configs params.yaml configs/full.yaml] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

from segevo.config import load_config  # noqa: E402
from segevo.model import SegVol  # noqa: E402


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def prompts(roi: tuple[int, int, int], device: str) -> dict[str, dict]:
    d, h, w = roi
    box = torch.tensor([[d * 0.25, h * 0.3, w * 0.25, d * 0.75, h * 0.65, w * 0.6]], device=device)
    pts = (torch.tensor([[[d / 2, h / 2, w / 2], [d / 3, h / 2.2, w / 2.1], [d / 1.5, h / 6, w / 1.2]]],
                        device=device), torch.tensor([[1, 1, 0]], device=device))
    return {"text": {"text": "liver"}, "box": {"boxes": box}, "point": {"points": pts},
            "text+box+point": {"text": "liver", "boxes": box, "points": pts}}


def bench_config(path: Path, repeats: int, device: str) -> dict:
    cfg = load_config(path).model
    torch.manual_seed(0)
    model = SegVol(cfg).to(device).eval()
    image = torch.rand(1, 1, *cfg.roi_size, device=device)
    row: dict = {"config": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
                 "roi_size": list(cfg.roi_size), "parameters": sum(model.parameter_counts().values())}
    with torch.no_grad():
        row["encoder_s"] = round(timed(lambda: model.encode_image(image), repeats, device), 4)
        emb = model.encode_image(image)
        row["decode_s"] = {name: round(timed(lambda p=p: model.decode(emb, **p), repeats, device), 4)
                           for name, p in prompts(cfg.roi_size, device).items()}
    model.train()
    p = prompts(cfg.roi_size, device)["text+box+point"]
    row["forward_backward_s"] = round(timed(lambda: model(image, **p).mean().backward(), repeats, device), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["params.yaml", "configs/full.yaml"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "model_forward.json"))
    args = ap.parse_args()
    rows = []
    for c in args.configs:
        path = (REPO / c) if not Path(c).is_absolute() else Path(c)
        rows.append(bench_config(path, args.repeats, args.device))
        print(json.dumps(rows[-1]))
    result = {
        "benchmark": "model_forward",
        "device": args.device,
        "batch_size": 1,
        "repeats": args.repeats,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
