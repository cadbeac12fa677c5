"""What each faster ``inference`` option costs in Dice against SegVol's procedure (the default), and saves in time.

Every variant changes one option from the default (``fast`` changes them all). Per variant: Dice of its masks
against the default's masks (mean and worst query), max |logit| difference, seconds and windows run. Two cases:

- ``parity``: reference/parity/zoom_case.npz (full-size SegVol with the synthetic parity weights, text and
  text+box): also Dice against the masks SegVol's released code produced. Its coarse foreground covers the
  volume, so only ``precision`` and ``zoom_out_resize`` can change anything here.
- ``demo``: the demo's evaluate path (prepared cases, the six ``evaluate`` prompt types without the box-jitter
  ablation, the trained demo adapter): also
  Dice against the ground truth (the demo model is a random base with a small adapter: read the differences,
  not the levels).

usage: python bench/inference_options.py --case parity|demo [--data DIR] [--adapter DIR] [--reference DIR]
                                         --out bench/results/inference_options_CASE.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

from segevo.config import InferenceConfig, ModelConfig, load_config  # noqa: E402
from segevo.inference import Predictor, Query  # noqa: E402
from segevo.metrics import dice  # noqa: E402

VARIANTS = {
    "segvol": {},
    "bf16": {"precision": "bf16"},
    "trilinear": {"zoom_out_resize": "trilinear"},
    "shift": {"roi_rule": "shift"},
    "volume_grid": {"window_grid": "volume"},
    "skip_empty": {"empty_windows": "skip"},
    "fast": {"precision": "bf16", "zoom_out_resize": "trilinear", "roi_rule": "shift", "window_grid": "volume",
             "empty_windows": "skip"},
}
ZOOM_SHAPE = (64, 384, 320)


Inputs = list[tuple[np.ndarray, str, list[Query], list[np.ndarray]]]  # (volume, modality, queries, truths)


def parity_inputs(reference: Path) -> tuple[Predictor, Inputs]:
    case = np.load(reference / "parity" / "zoom_case.npz")
    weights = Path(tempfile.mkdtemp()) / "pytorch_model.bin"
    subprocess.run([sys.executable, str(reference / "parity" / "make_synthetic_checkpoint.py"),
                    str(reference / "segvol-keys" / "segvol_hf_keys.json"), str(weights)], check=True,
                   capture_output=True)
    ct = np.load(reference / "fh" / "case_ct_256x256x32.npz")["image"].transpose(2, 0, 1)
    volume = F.interpolate(torch.from_numpy(np.ascontiguousarray(ct))[None, None], size=ZOOM_SHAPE,
                           mode="trilinear", align_corners=False).clamp(0, 1)[0, 0].numpy()
    scale = np.array((32, 256, 256)) / np.array(ZOOM_SHAPE)
    box = case["box"][0].astype(np.float64)
    volume_box = np.concatenate([box[:3] / scale, (box[3:] + 1) / scale - 1])
    queries = [Query(text="liver"), Query(text="liver", box=volume_box)]
    n = int(np.prod(ZOOM_SHAPE))
    released = [np.unpackbits(case[f"{k}_mask_bits"])[:n].reshape(ZOOM_SHAPE).astype(bool)
                for k in ("text", "text_box")]
    predictor = Predictor.load(ModelConfig(), InferenceConfig(), weights=str(weights), device="cpu")
    return predictor, [(volume, "CT", queries, released)]


def demo_inputs(data: Path, adapter: Path) -> tuple[Predictor, Inputs]:
    from segevo.data.manifest import read_manifest, read_prep_array
    from segevo.evaluation import case_queries

    cfg = load_config(REPO / "params.yaml")
    prompts = cfg.evaluate.model_copy(update={"box_jitter": ()})  # the six prompt types; jitter adds nothing here
    cases, _ = read_manifest(data / "prep" / "manifest.json")
    inputs = []
    for case in cases:
        label = read_prep_array(case, data / "prep", "label")
        samples = case_queries(case, label, prompts)
        truths = [label == case.classes.index(s.structure) + 1 for s, _ in samples]
        inputs.append((read_prep_array(case, data / "prep", "image").astype(np.float32), case.modality,
                       [q for _, q in samples], truths))
    return Predictor.load(cfg.model, InferenceConfig(), adapter=str(adapter), device="cpu"), inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("parity", "demo"), required=True)
    ap.add_argument("--data", default=str(REPO / "data"), help="the demo's data root (prep/ inside)")
    ap.add_argument("--adapter", default=str(REPO / "models" / "adapter"))
    ap.add_argument("--reference", default=str(REPO.parent / "shared" / "reference"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.case == "parity":
        predictor, inputs = parity_inputs(Path(args.reference))
        truth_name = "dice_vs_segvol_release"
    else:
        predictor, inputs = demo_inputs(Path(args.data), Path(args.adapter))
        truth_name = "dice_vs_ground_truth"
    base = predictor.options
    rows: dict[str, dict] = {}
    reference: list[tuple[np.ndarray, np.ndarray]] = []
    for name in args.variants.split(","):
        predictor.zoom.options = InferenceConfig.model_validate({**base.model_dump(), **VARIANTS[name]})
        start = time.perf_counter()
        out: list[tuple[np.ndarray, np.ndarray]] = []
        windows = 0
        for image, modality, queries, _ in inputs:
            for r in predictor.run(image, modality, queries):
                out.append((r.mask, r.logits))
                windows += r.windows
        seconds = time.perf_counter() - start
        truths = [t for *_, ts in inputs for t in ts]
        row = {"options": VARIANTS[name], "queries": len(out), "seconds": round(seconds, 2), "windows": windows,
               truth_name: round(float(np.mean([dice(m, t) for (m, _), t in zip(out, truths, strict=True)])), 4)}
        if not reference:
            reference = out
        else:
            agree = [dice(m, ref_m) for (m, _), (ref_m, _) in zip(out, reference, strict=True)]
            row["dice_vs_segvol_default"] = {"mean": round(float(np.mean(agree)), 4),
                                             "min": round(float(np.min(agree)), 4)}
            row["max_logit_difference"] = round(float(max(np.abs(lg - ref_lg).max()
                                                          for (_, lg), (_, ref_lg) in zip(out, reference,
                                                                                          strict=True))), 4)
        rows[name] = row
        print(name, row, flush=True)
    write_result(args.out, {"case": args.case, "variants": rows})


if __name__ == "__main__":
    main()
