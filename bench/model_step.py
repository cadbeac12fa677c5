"""Train-step cost of MoA and priors against plain LoRA, and inference cost against plain SegVol.

usage: python bench/model_step.py [--size tiny|full] [--device cpu|cuda] [--batch B] [--steps N]
                                  [--infer-repeats N] --out FILE

Same batch for every variant: half CT rows, half MRI rows, six prompt combinations in one decoder batch,
full-resolution Dice + BCE, AdamW step. Variants:
  lora        SegVol with one LoRA adapter applied to every row (the prototype's plain LoRA fine-tuning)
  moa         the same rank, routed per row (identity for CT, LoRA for MRI)
  moa_priors  MoA plus context priors at the default pool size
Variants run interleaved step by step in a shuffled order, so load on the machine hits all of them alike;
medians are reported (and ratios of the minima, the least noisy estimate on a shared machine). Inference
(plain SegVol against moa_priors, also interleaved) is timed first, while both models' weights sit in memory
allocated the same way: timed after the training steps, the plain model (built then) ran in fresh memory and
moa_priors among the optimiser's; on the CPU that gave 1.11 where a fresh process gave 1.00.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

from segevo.config import ModelConfig, SegevoConfig, load_config  # noqa: E402
from segevo.data.batch import TrainBatch  # noqa: E402
from segevo.data.tasks import TaskVocabulary  # noqa: E402
from segevo.losses import combination_loss  # noqa: E402
from segevo.model import SegVol  # noqa: E402
from segevo.model.adapted import AdaptedSegVol  # noqa: E402
from segevo.model.experts.lora import target_regex  # noqa: E402

TINY = {"roi_size": [16, 64, 64], "encoder": {"hidden_size": 96, "mlp_dim": 384, "num_layers": 2, "num_heads": 4},
        "decoder": {"num_heads": 4, "mlp_dim": 256},
        "text": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}}
TASKS = TaskVocabulary([("amos", f"organ{i}") for i in range(15)] + [("chaos", "liver")])


def make_variants(model_cfg: ModelConfig, cfg: SegevoConfig, device: str) -> dict[str, AdaptedSegVol]:
    torch.manual_seed(0)
    base = SegVol(model_cfg)
    no_priors = cfg.priors.model_copy(update={"enabled": False})
    lora_base = copy.deepcopy(base)
    plain = AdaptedSegVol(lora_base, cfg.adapters.model_copy(update={"enabled": False}), no_priors, TASKS)
    expert = cfg.adapters.experts["MRI"]
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=expert.rank, lora_alpha=expert.alpha, target_modules=target_regex(expert)),
                            lora_base, adapter_name="MRI")
    variants = {
        "lora": plain,
        "moa": AdaptedSegVol(copy.deepcopy(base), cfg.adapters, no_priors, TASKS),
        "moa_priors": AdaptedSegVol(copy.deepcopy(base), cfg.adapters, cfg.priors, TASKS),
    }
    for m in variants.values():
        m.to(device).train()
    return variants


def make_batch(model_cfg: ModelConfig, b: int, device: str) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    d, h, w = model_cfg.roi_size
    image = torch.rand(b, 1, d, h, w, generator=g)
    target = torch.zeros(b, 1, d, h, w, dtype=torch.int8)
    target[:, :, d // 4 : 3 * d // 4, h // 3 : 2 * h // 3, w // 4 : w // 2] = 1
    boxes = torch.tensor([[d / 4, h / 3, w / 4, 3 * d / 4 - 1, 2 * h / 3 - 1, w / 2 - 1]] * b)
    n = 10
    coords = torch.rand(b, n, 3, generator=g) * torch.tensor([d, h, w])
    labels = torch.randint(0, 2, (b, n), generator=g)
    labels[1::2, 4:] = -1  # variable point counts
    return TrainBatch(
        image=image, target=target, class_names=["liver"] * b,
        modalities=["CT" if i % 2 == 0 else "MRI" for i in range(b)], task_ids=torch.arange(b) % len(TASKS),
        boxes=boxes, point_coords=coords, point_labels=labels,
    ).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on a GPU, 2 on the CPU")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--infer-repeats", type=int, default=20)
    ap.add_argument("--config", default=str(REPO / "configs" / "full.yaml"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(args.config)
    model_cfg = cfg.model if args.size == "full" else ModelConfig.model_validate(TINY)
    b = args.batch or (4 if args.device == "cuda" else 2)
    variants = make_variants(model_cfg, cfg, args.device)
    batch = make_batch(model_cfg, b, args.device)
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
              for k, m in variants.items()}
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext)

    def step(name: str) -> float:
        model, opt = variants[name], optims[name]
        sync(args.device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = combination_loss(model, batch, cfg.train.loss).total
        loss.backward()
        opt.step()
        sync(args.device)
        return time.perf_counter() - t

    order = random.Random(0)
    segvol = variants["moa"].base  # routed model without priors; plain SegVol = all rows through identity
    plain = SegVol(model_cfg).to(args.device).eval()
    plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in segvol.state_dict().items()
                           if ".lora_" not in k})
    full = variants["moa_priors"].eval()
    with torch.no_grad():  # an adapter that is not zero, so the LoRA merge and the priors do real work
        for p in full.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    points = (batch.point_coords, batch.point_labels)
    infer: dict[str, list[float]] = {"segvol": [], "moa_priors": []}
    calls = {"segvol": lambda: plain(batch.image, text=batch.class_names, points=points),
             "moa_priors": lambda: full(batch.image, batch.modalities, text=batch.class_names, points=points,
                                        task=batch.task_ids)}
    with torch.no_grad(), autocast:
        for i in range(args.infer_repeats + 1):
            names = list(calls)
            order.shuffle(names)
            for name in names:
                fn = calls[name]
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                if i:
                    infer[name].append(time.perf_counter() - t)
    full.train()

    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.steps + 1):  # the first round warms up; the order is shuffled every round
        names = list(variants)
        order.shuffle(names)
        for name in names:
            dt = step(name)
            if i:
                times[name].append(dt)
        print(f"step {i}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    inf = {k: statistics.median(v) for k, v in infer.items()}
    result = {
        "benchmark": "model_step",
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": b,
        "rows": "half CT, half MRI",
        "combinations": list(cfg.train.loss.combinations),
        "steps": args.steps,
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "train_samples_per_s": {k: round(b / v, 3) for k, v in med.items()},
        "ratios": {"moa": round(med["moa"] / med["lora"], 4), "moa_priors": round(med["moa_priors"] / med["lora"], 4)},
        "median_infer_s": {k: round(v, 4) for k, v in inf.items()},
        "infer_ratio": round(inf["moa_priors"] / inf["segvol"], 4),
        "min_ratios": {"moa": round(min(times["moa"]) / min(times["lora"]), 4),
                       "moa_priors": round(min(times["moa_priors"]) / min(times["lora"]), 4),
                       "infer": round(min(infer["moa_priors"]) / min(infer["segvol"]), 4)},
        "all_infer_s": {k: [round(x, 4) for x in v] for k, v in infer.items()},
        "trainable": {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in variants.items()},
        "all_step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "torch": torch.__version__,
    }
    print({k: result[k] for k in ("median_step_s", "ratios", "infer_ratio", "min_ratios")})
    write_result(args.out, result)


if __name__ == "__main__":
    main()
