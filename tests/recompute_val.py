"""Validation Dice recomputed from exported adapters, in a fresh process: the check on what training reports.

usage: python tests/recompute_val.py CONFIG ADAPTER_DIR... -> one JSON object {adapter dir: val_dice}

Independent of the training process: the model is rebuilt from the adapter file alone, and Dice is counted
here with numpy. The validation samples and their batches are the ones each rank scored (rank r takes
samples r, r + world, ...; batches of ``train.batch_size``), with one thread like a Ray worker, so the
logits match the worker's to rounding and a voxel cannot flip at the threshold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from segevo.config import load_config
from segevo.data.dataset import collate
from segevo.data.manifest import read_manifest
from segevo.model.adapter_io import build_from_adapters
from segevo.model.segvol import Prompts
from segevo.training import validation_samples


def val_dice(cfg, adapter: Path) -> float:
    model = build_from_adapters(adapter).eval()
    root = Path(cfg.data.root)
    cases, _ = read_manifest(root / "prep" / "manifest.json")
    split = json.loads((root / "split.json").read_text())
    by_key = {c.key: c for c in cases}
    val_cases = [by_key[k] for k in split["val"]]
    combos = list(cfg.train.loss.combinations)
    world, scores = cfg.train.num_workers, []
    for rank in range(world):
        samples = validation_samples(cfg, root / "prep", val_cases, model.tasks, rank, world)
        for i in range(0, len(samples), cfg.train.batch_size):
            batch = collate(samples[i : i + cfg.train.batch_size])
            prompts = Prompts(batch.class_names, batch.boxes, (batch.point_coords, batch.point_labels))
            with torch.no_grad():
                logits = model.forward_requests(batch.image, batch.modalities, [(c, prompts) for c in combos],
                                                batch.task_ids).numpy()
            target = batch.target.numpy()
            for row in range(target.shape[0]):
                valid, truth = target[row] >= 0, target[row] == 1
                per_combo = []
                for k in range(len(combos)):
                    pred = (logits[k, row] > 0) & valid
                    denom = pred.sum() + truth.sum()
                    per_combo.append(2 * (pred & truth).sum() / denom if denom else 0.0)
                scores.append(per_combo)
    return float(np.mean(np.asarray(scores), axis=0).mean())


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1])
    print(json.dumps({d: val_dice(cfg, Path(d)) for d in sys.argv[2:]}))


if __name__ == "__main__":
    main()
