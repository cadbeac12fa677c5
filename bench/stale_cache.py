"""How far a no-grad forward in the training process is from the true model after optimizer steps, per ZeRO stage.

usage: python bench/stale_cache.py [--steps N] [--lr LR] [--out FILE]

The tiny model on one gloo rank (in process), as the training loop runs it: a validation forward (eval mode,
no grad: the experts' merged weights get built), back to train mode, N DeepSpeed steps on MRI rows, then
eval mode again. Reported per stage: max |no-grad logits - logits of the gradient path| (the routed path,
which never merges and so cannot be stale). Before the fix this was 0.115 at ZeRO 1 and 2 (0, up to rounding,
at ZeRO 0): the merged-weight cache was keyed on version counters that ZeRO's ``.data`` writes do not bump.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

from segevo import training  # noqa: E402
from segevo.config import parse_config  # noqa: E402
from segevo.data.batch import TrainBatch  # noqa: E402
from segevo.data.tasks import TaskVocabulary  # noqa: E402
from segevo.losses import combination_loss  # noqa: E402
from segevo.model.segvol import Prompts  # noqa: E402

TINY = {
    "roi_size": [8, 32, 32], "patch_size": [4, 16, 16],
    "encoder": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 4},
    "prompt": {"mask_in_chans": 8},
    "decoder": {"depth": 2, "num_heads": 2, "mlp_dim": 64, "iou_head_hidden_dim": 16},
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
}


def batch(seed: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 1, 8, 32, 32, generator=g)
    coords = torch.tensor([[[2.0, 10.0, 12.0], [3.0, 20.0, 5.0]]] * 2)
    return TrainBatch(image=image, target=(image > 0.6).to(torch.int8), class_names=["liver", "liver"],
                      modalities=["MRI", "MRI"], task_ids=torch.tensor([1, 1]),
                      boxes=torch.tensor([[1.0, 2, 3, 6, 20, 24]] * 2), point_coords=coords,
                      point_labels=torch.tensor([[1, 0]] * 2))


def logits(model, b: TrainBatch) -> torch.Tensor:
    prompts = Prompts(b.class_names, b.boxes, (b.point_coords, b.point_labels))
    return model.forward_requests(b.image, b.modalities, [("text+box", prompts), ("point", prompts)], b.task_ids)


def measure(stage: int, steps: int, lr: float) -> float:
    cfg = parse_config({"model": TINY, "priors": {"dim": 16, "num_heads": 2},
                        "train": {"zero_stage": stage, "lr": lr, "batch_size": 2, "warmup_fraction": 0.0}})
    model = training.build_model(cfg, TaskVocabulary([("demo", "liver")]))
    engine = training.make_engine(model, cfg, total_steps=steps)
    val = batch(1)
    model.eval()
    with torch.no_grad():
        logits(model, val)
    model.train()
    for step in range(steps):
        engine.backward(combination_loss(model, batch(100 + step), cfg.train.loss).total)
        engine.step()
    model.eval()
    with torch.no_grad():
        fast = logits(model, val)
    true = logits(model, val).detach()
    return float((fast - true).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "stale_cache.json"))
    args = parser.parse_args()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rows = {f"zero{stage}": measure(stage, args.steps, args.lr) for stage in (0, 1, 2)}
    for name, diff in rows.items():
        print(f"{name}: max |no-grad - true| = {diff:.3g}")
    write_result(args.out, {"benchmark": "stale_cache", "steps": args.steps, "lr": args.lr,
                            "max_abs_diff": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
