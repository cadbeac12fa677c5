"""One-volume overfit on real demo data: the adapted tiny model learns one organ to Dice >= 0.9.

The demo MR volume (TotalSegmentator's example, its labels are model output) is preprocessed at a small ROI;
the MRI expert (LoRA) and the priors train on its liver with the batched six-combination loss, the base stays
frozen. A pipeline that cannot fit one volume cannot fit a data set: this catches broken gradients, routing,
prompts or losses that unit tests miss.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY

from segevo.config import parse_config
from segevo.data.dataset import TrainDataset, collate, task_vocabulary
from segevo.data.manifest import read_manifest
from segevo.losses import combination_loss
from segevo.model import SegVol
from segevo.model.adapted import AdaptedSegVol
from segevo.model.segvol import Prompts

REPO = Path(__file__).resolve().parents[1]
MODEL = {**TINY, "roi_size": [16, 64, 64],  # 4x4x4 tokens: enough resolution for an organ's shape
         "encoder": {"hidden_size": 64, "mlp_dim": 128, "num_layers": 2, "num_heads": 4},
         "decoder": {"depth": 2, "num_heads": 4, "mlp_dim": 128, "iou_head_hidden_dim": 16}}


@pytest.mark.slow
def test_tiny_model_overfits_one_demo_organ(tmp_path):
    os.environ.setdefault("SEGEVO_CACHE", str(REPO / ".cache" / "segevo" / "downloads"))
    from segevo.data.preprocess.stages import run_preprocess, run_pseudomask
    from segevo.data.raw import download_sources

    cfg = parse_config({
        "model": MODEL,
        "adapters": {"experts": {"CT": {"kind": "identity"}, "MRI": {"rank": 16, "alpha": 32}}},
        "priors": {"dim": 32, "num_heads": 4},
        "data": {"root": str(tmp_path / "data"), "sources": ["demo"]},
        "loader": {"resize_probability": 1.0, "flip_probability": 0.0, "intensity_probability": 0.0,
                   "box_jitter": 0.0, "pseudo": False},
    })
    download_sources(cfg.data)
    run_pseudomask(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    cases, _ = read_manifest(tmp_path / "data" / "prep" / "manifest.json")
    mr = [c for c in cases if c.modality.startswith("MRI")]
    assert mr and mr[0].voxels.get("liver", 0) > 0
    case = dataclasses.replace(mr[0], voxels={"liver": mr[0].voxels["liver"]})  # train on the liver only
    tasks = task_vocabulary([case])
    ds = TrainDataset(tmp_path / "data" / "prep", [case], cfg.model.roi_size, cfg.loader, tasks)
    batch = collate([ds[0]])
    assert batch.class_names == ["liver"] and batch.modalities == ["MRI"]

    torch.manual_seed(0)
    base = SegVol(cfg.model).eval()
    reference = copy.deepcopy(base)
    model = AdaptedSegVol(base, cfg.adapters, cfg.priors, tasks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)

    def dice() -> float:
        with torch.no_grad():
            logits = model(batch.image, batch.modalities, batch.class_names, batch.boxes,
                           (batch.point_coords, batch.point_labels), task=batch.task_ids)
        pred, target = logits[0, 0] > 0, batch.target[0, 0] == 1
        return float(2 * (pred & target).sum() / (pred.sum() + target.sum()))

    before = dice()
    for step in range(300):
        model.train()
        opt.zero_grad()
        combination_loss(model, batch, cfg.train.loss).total.backward()
        opt.step()
        if step % 50 == 49 and dice() >= 0.9:
            break
    after = dice()
    assert after >= 0.9, f"Dice {before:.3f} -> {after:.3f} after {step + 1} steps"
    prompts = Prompts(batch.class_names, batch.boxes, None)
    model.eval()
    with torch.no_grad():  # the CT expert is untouched: a CT row still gives the base model's output
        ct = model.forward_requests(batch.image, ["CT"], [("text+box", prompts)], batch.task_ids)[0]
        assert torch.equal(ct, reference(batch.image, batch.class_names, batch.boxes))
