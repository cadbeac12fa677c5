"""The training signals under DeepSpeed (one gloo rank, in process): no-grad forwards see the live weights after
optimizer steps at ZeRO 0, 1 and 2, and a step leaves experts without rows (and unused priors) bit-identical;
for a LoRA and a DoRA MRI expert (the PET expert is the other kind)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TINY
from prep_helpers import write_case

from segevo import training
from segevo.config import parse_config
from segevo.data.dataset import task_vocabulary
from segevo.model.segvol import Prompts

WORLD_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def deepspeed_rank():
    """One gloo rank in this process (an in-memory store: no port), as DeepSpeed expects it."""
    saved = {k: os.environ.get(k) for k in WORLD_ENV}
    os.environ.update(WORLD_ENV)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> tuple[Path, list, list]:
    root = tmp_path_factory.mktemp("prep")
    ct = [write_case(root, "ct_a", "CT", (12, 40, 44), ["liver", "spleen"], pseudo=False, seed=0),
          write_case(root, "ct_b", "CT", (10, 36, 40), ["liver"], pseudo=False, seed=1)]
    mri = [write_case(root, "mr_a", "MRI-T2", (10, 36, 36), ["liver", "kidney"], pseudo=False, seed=2)]
    return root, ct, mri


def setup(prep, stage: int, kind: str, **train):
    root, ct, mri = prep
    cfg = parse_config({
        "model": TINY, "priors": {"dim": 16, "num_heads": 2},
        "adapters": {"experts": {"CT": {"kind": "identity"}, "MRI": {"kind": kind, "rank": 4},
                                 "PET": {"kind": "dora" if kind == "lora" else "lora", "rank": 2}}},
        "loader": {"samples_per_epoch": 4},
        "train": {"zero_stage": stage, "lr": 1e-2, "batch_size": 2, "loader_workers": 0, "val_samples": 2,
                  "warmup_fraction": 0.0, **train},
    })
    tasks = task_vocabulary(ct + mri)
    model = training.build_model(cfg, tasks)
    engine = training.make_engine(model, cfg, total_steps=20)
    loaders = {name: training.make_loaders(cfg, root, cases, cases, tasks, 0, 1)
               for name, cases in (("ct", ct), ("mri", mri))}
    return cfg, model, engine, loaders


def no_grad_logits(model, samples: list[dict]) -> torch.Tensor:
    from segevo.data.dataset import collate

    batch = collate(samples)
    prompts = Prompts(batch.class_names, batch.boxes, (batch.point_coords, batch.point_labels))
    with torch.no_grad():
        return model.forward_requests(batch.image, batch.modalities, [("text+box", prompts), ("point", prompts)],
                                      batch.task_ids)


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_no_grad_forward_after_steps_sees_the_live_weights(deepspeed_rank, prep, stage, kind):
    cfg, model, engine, loaders = setup(prep, stage, kind)
    samples = loaders["mri"].val
    device = torch.device("cpu")
    for epoch in range(2):  # the loop's order: train, validate (eval, no-grad forwards, back to train), train
        training.train_epoch(engine, loaders["mri"], cfg, epoch, device, None)
        training.validate(model, samples, cfg, device, None)
    model.eval()
    live = no_grad_logits(model, samples)
    model.moa.invalidate()  # drop the cache by hand: what a fresh process would compute
    fresh = no_grad_logits(model, samples)
    assert torch.equal(live, fresh)
    # Steps taken without any train/eval switch (a user's own loop in eval mode) must be seen too.
    before = no_grad_logits(model, samples)
    training.train_epoch(engine, loaders["mri"], cfg, 2, device, None)
    model.eval()
    for p in model.parameters():  # an update through .data, as ZeRO writes it, bypasses version counters
        if p.requires_grad:
            p.data.mul_(1.5)
    after = no_grad_logits(model, samples)
    model.moa.invalidate()
    assert torch.equal(after, no_grad_logits(model, samples))
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("stage", [0, 2])
def test_a_ct_only_step_leaves_other_experts_and_the_priors_untouched(deepspeed_rank, prep, stage, kind):
    cfg, model, engine, loaders = setup(prep, stage, kind)
    device = torch.device("cpu")
    training.train_epoch(engine, loaders["mri"], cfg, 0, device, None)  # the MRI expert now has moments
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    training.train_epoch(engine, loaders["ct"], cfg, 1, device, None)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), f"{name} moved in a CT-only epoch"
    training.train_epoch(engine, loaders["mri"], cfg, 2, device, None)
    moved = {n.split(".")[0] if n.startswith("priors") else n.rsplit(".", 2)[-2]
             for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])}
    assert moved == {"priors", "MRI"}, "MRI rows train the MRI expert and the priors, and never the PET expert"
