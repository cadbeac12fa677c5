"""Mixture-of-Adapters and context priors on a tiny SegVol: the invariants of DESIGN section 4, routing,
priors without text, adapter checkpoints and the merged export. The expert invariants run for every trained
kind (LoRA, DoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY

from segevo.config import parse_config
from segevo.data.batch import TrainBatch
from segevo.data.tasks import TaskVocabulary
from segevo.losses import combination_loss
from segevo.model import SegVol, load_checkpoint
from segevo.model.adapted import AdaptedSegVol
from segevo.model.adapter_io import build_from_adapters, export_merged, save_adapters
from segevo.model.adapters import UnknownModality
from segevo.model.checkpoint import CheckpointError
from segevo.model.segvol import Prompts

TASKS = TaskVocabulary([("amos", "liver"), ("amos", "spleen"), ("chaos", "liver")])


KINDS = ["lora", "dora"]


def config(kind: str = "lora", **sections):
    """The tiny profile; without an ``adapters`` section, CT is the identity and MRI an expert of ``kind``."""
    adapters = {"experts": {"CT": {"kind": "identity"}, "MRI": {"kind": kind}}}
    return parse_config({"model": TINY, "priors": {"dim": 16, "num_heads": 2}, "adapters": adapters, **sections})


def other(kind: str) -> str:
    """The other trained kind: models with a second expert mix both kinds in the same layers."""
    return "dora" if kind == "lora" else "lora"


def build(cfg, seed: int = 0) -> tuple[AdaptedSegVol, SegVol]:
    torch.manual_seed(seed)
    base = SegVol(cfg.model).eval()
    reference = copy.deepcopy(base)
    return AdaptedSegVol(base, cfg.adapters, cfg.priors, TASKS).eval(), reference


def perturb(model: AdaptedSegVol) -> None:
    """Pretend training happened: non-zero LoRA B matrices, DoRA magnitudes moved off ``||W||``, open gates."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            elif name.endswith("_gate"):
                p.fill_(0.7)


@pytest.fixture()
def image(tiny_cfg):
    return torch.rand(3, 1, *tiny_cfg.roi_size, generator=torch.Generator().manual_seed(5))


def prompts(b: int) -> dict:
    coords = torch.tensor([[2.0, 10.0, 12.0], [3.0, 20.0, 5.0], [5.0, 15.0, 25.0]]).expand(b, 3, 3).clone()
    labels = torch.tensor([[1, 0, 1], [1, -1, -1], [1, 1, -1]])[:b]
    return {"text": ["liver", "spleen", "liver"][:b], "boxes": torch.tensor([[1.0, 2, 3, 6, 20, 24]] * b),
            "points": (coords, labels)}


MODALITIES = ["CT", "MRI", "CT"]


# ---- invariants -------------------------------------------------------------------------------------------

def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def segvol(reference: SegVol, image: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Plain SegVol's logits for some rows, through the decoder entry point the adapted model uses (SegVol's
    ``forward`` pads no prompt tokens: in bf16 its bits differ from the batched-combination decoder's)."""
    p = prompts(3)
    sub = Prompts([p["text"][i] for i in rows], p["boxes"][rows], (p["points"][0][rows], p["points"][1][rows]))
    return reference.decode_combinations(reference.encode_image(image[rows]), [("text+box+point", sub)])[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("prototype", ["additive", "multiplicative"])
def test_ct_rows_are_bit_identical_to_segvol_even_after_training(prototype, precision, kind, image):
    """No-grad forwards run each expert's rows as their own batch: CT rows are SegVol's on those rows, exactly.
    (Compared with SegVol on the same rows: on some BLAS kernels a row's bits depend on the batch it is in.)"""
    model, reference = build(config(kind, priors={"dim": 16, "num_heads": 2, "prototype": prototype}))
    perturb(model)
    ct = [0, 2]
    p = prompts(3)
    with torch.no_grad(), _autocast(precision):
        adapted = model(image, MODALITIES, **p, task=[("amos", "liver"), ("amos", "spleen"), None])
        base, plain = segvol(reference, image, ct), segvol(reference, image, [1])
    assert torch.equal(adapted[ct], base)
    assert (adapted[1] - plain[0]).abs().max() > 1e-3  # the MRI row went through its expert and the priors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("prototype", ["additive", "multiplicative"])
def test_ct_rows_of_a_training_forward_are_bit_identical_to_segvol(prototype, precision, kind, image):
    """With gradients every row shares one batch (routing by masks): CT rows equal SegVol's on that batch. For
    DoRA the perturbed magnitudes rescale whole weights: masking only its low-rank path would fail here."""
    model, reference = build(config(kind, priors={"dim": 16, "num_heads": 2, "prototype": prototype,
                                                  "task_dropout": 0.5}))
    perturb(model)
    model.train()
    with _autocast(precision):
        adapted = model(image, MODALITIES, **prompts(3), task=[("amos", "liver"), ("amos", "spleen"), None])
        base = segvol(reference, image, [0, 1, 2])
    assert torch.equal(adapted[0], base[0]) and torch.equal(adapted[2], base[2])
    assert (adapted[1] - base[1]).abs().max() > 1e-3


@pytest.mark.parametrize("prototype", ["additive", "multiplicative"])
def test_priors_at_initialisation_equal_priors_off(prototype, image):
    on, _ = build(config(adapters={"enabled": False}, priors={"dim": 16, "num_heads": 2, "prototype": prototype}))
    off, _ = build(config(adapters={"enabled": False}, priors={"enabled": False}))
    with torch.no_grad():
        for combo in ("text", "box", "point", "text+box+point"):
            p = Prompts(**prompts(3)).subset(combo)
            a = on(image, "MRI", p.text, p.boxes, p.points, task=torch.tensor([1, 2, 0]))
            b = off(image, "MRI", p.text, p.boxes, p.points)
            assert torch.equal(a, b), combo


def batch(image: torch.Tensor, modalities: list[str]) -> TrainBatch:
    b = image.shape[0]
    p = prompts(b)
    target = (image > 0.6).to(torch.int8)
    target[:, :, :2] = -1  # an ignored slab
    return TrainBatch(image=image, target=target, class_names=p["text"], modalities=modalities,
                      task_ids=torch.tensor([1, 2, 3])[:b], boxes=p["boxes"], point_coords=p["points"][0],
                      point_labels=p["points"][1], pseudo_target=(image < 0.3).to(torch.int8),
                      pseudo_boxes=p["boxes"] + 1, pseudo_point_coords=p["points"][0] + 1,
                      pseudo_point_labels=p["points"][1])


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_mri_rows_changes_mri_and_only_mri(kind, image):
    cfg = config(adapters={"experts": {"CT": {"kind": "identity"}, "MRI": {"kind": kind, "rank": 4},
                                       "PET": {"kind": other(kind), "rank": 2}}})
    model, reference = build(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = model(image, MODALITIES, **prompts(3))
    model.train()
    for _ in range(3):
        opt.zero_grad()
        out = combination_loss(model, batch(image, MODALITIES), cfg.train.loss)
        out.total.backward()
        pet = [p.grad for n, p in model.named_parameters() if ".PET." in n]
        mri = [p.grad for n, p in model.named_parameters() if ".MRI." in n]
        assert pet and all(g is None or not g.any() for g in pet), "PET expert had no rows"
        assert any(g is not None and g.any() for g in mri)
        assert all(p.grad is None for p in model.base.parameters() if not p.requires_grad)
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(image, MODALITIES, **prompts(3))
        base = segvol(reference, image, [0, 2])
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert torch.equal(after[[0, 2]], base)
    assert (after[1] - before[1]).abs().max() > 1e-3


# ---- routing ------------------------------------------------------------------------------------------------

def test_unknown_modality_is_refused_unless_a_fallback_is_named(image):
    model, _ = build(config())
    with pytest.raises(UnknownModality, match="unknown modality 'PET'.*adapters.fallback"):
        model(image[:1], "PET", text="liver")
    routed, _ = build(config(adapters={"fallback": "MRI"}))
    perturb(routed)
    with torch.no_grad():
        torch.testing.assert_close(routed(image[:1], "PET", text="liver"), routed(image[:1], "MRI", text="liver"))


def test_per_modality_text_template(image):
    model, _ = build(config(adapters={"templates": {"MRI": "A magnetic resonance image of a {}."}}))
    ids_ct = model.base.text_encoder.tokenize(["liver"], model.templates(["CT"]))
    ids_mri = model.base.text_encoder.tokenize(["liver"], model.templates(["MRI"]))
    assert not torch.equal(ids_ct, ids_mri)


def test_bad_adapter_config_names_the_key():
    from segevo.config import ConfigError

    with pytest.raises(ConfigError, match="adapters: .*fallback 'PET'"):
        config(adapters={"fallback": "PET"})
    with pytest.raises(ConfigError, match=r"adapters\.experts\.MRI\.kind"):
        config(adapters={"experts": {"MRI": {"kind": "ia3"}}})
    typo = config(adapters={"experts": {"CT": {"kind": "identity"}, "MRI": {"vit_targets": ["attn.qvk"],
                                                                         "decoder_targets": []}}})
    with pytest.raises(ConfigError, match=r"adapters\.experts\.MRI: no module matches its vit_targets \['attn.qvk'\]"):
        build(typo)


# ---- priors without text, batches, losses -------------------------------------------------------------------

@pytest.mark.parametrize("combo", ["box", "point", "box+point"])
def test_priors_need_no_text_prompt(combo, image):
    model, _ = build(config())
    perturb(model)
    p = Prompts(**prompts(3)).subset(combo)
    with torch.no_grad():
        known = model(image, "MRI", p.text, p.boxes, p.points, task=torch.tensor([1, 2, 3]))
        unknown = model(image, "MRI", p.text, p.boxes, p.points)  # null task
    assert known.shape == (3, 1, *model.base.cfg.roi_size)
    assert not torch.equal(known, unknown)


def test_task_lookup_by_pair_class_or_unknown():
    assert TASKS.id("amos", "spleen") == 2 and TASKS.id("chaos", "liver") == 3
    assert TASKS.id(None, "liver") == 1 and TASKS.id(None, "brain") == 0 and len(TASKS) == 4
    assert TASKS.closest("livr") == ["liver"]
    assert TaskVocabulary.from_json(TASKS.to_json()).pairs == TASKS.pairs


def test_loss_runs_on_mixed_batches_and_ignores_label_minus_one(image):
    cfg = config()
    model, _ = build(cfg)
    model.train()
    out = combination_loss(model, batch(image, MODALITIES), cfg.train.loss)
    assert set(out.per_combination) == {*cfg.train.loss.combinations, "pseudo:box", "pseudo:point"}
    out.total.backward()
    from segevo.losses import dice_bce

    logits = torch.randn(2, 1, 4, 4, 4)
    target = torch.randint(0, 2, (2, 1, 4, 4, 4)).to(torch.int8)
    target[:, :, 0] = -1
    changed = logits.clone()
    changed[:, :, 0] = 50.0
    for a, b in zip(dice_bce(logits, target), dice_bce(changed, target), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(dice_bce(logits, target.clamp(min=0))[1], dice_bce(changed, target.clamp(min=0))[1])


# ---- checkpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_adapter_checkpoint_round_trip_and_merged_export(kind, image, tmp_path):
    cfg = config(kind, priors={"enabled": False})
    model, reference = build(cfg)
    perturb(model)
    base_path = tmp_path / "base.bin"
    torch.save({f"model.{k}": v for k, v in reference.state_dict().items()}, base_path)
    save_adapters(model, tmp_path / "run")
    size = sum(f.stat().st_size for f in (tmp_path / "run").iterdir())
    assert size < 0.5 * sum(p.numel() * 4 for p in reference.parameters())

    reloaded = build_from_adapters(tmp_path / "run", base_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(image, MODALITIES, **prompts(3)), model(image, MODALITIES, **prompts(3)),
                                   rtol=0, atol=0)

    export_merged(model, "MRI", tmp_path / "mri.bin")
    plain = SegVol(cfg.model).eval()
    load_checkpoint(plain, tmp_path / "mri.bin")
    routed = model(image, "MRI", **prompts(3)).detach()  # with gradients: the masked routing, not a merge
    with torch.no_grad():
        torch.testing.assert_close(plain(image, **prompts(3)), routed, atol=1e-4, rtol=1e-4)
        assert (plain(image, **prompts(3)) - reference(image, **prompts(3))).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_checkpoint_for_another_configuration_is_refused(kind, tmp_path):
    model, _ = build(config(kind))
    save_adapters(model, tmp_path / "run")
    from segevo.model.adapter_io import load_adapters

    smaller, _ = build(config(adapters={"experts": {"CT": {"kind": "identity"}, "MRI": {"kind": kind, "rank": 2}}}))
    with pytest.raises(CheckpointError, match="mis-shaped tensors"):
        load_adapters(smaller, tmp_path / "run")
    switched, _ = build(config(other(kind)))  # the magnitudes are missing or unexpected
    with pytest.raises(CheckpointError, match="missing keys" if kind == "lora" else "unexpected keys"):
        load_adapters(switched, tmp_path / "run")


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_inference_merges_the_expert_and_matches_the_training_path(kind, image):
    model, _ = build(config(kind))
    perturb(model)
    model.eval()
    with torch.no_grad():
        fast = model(image, MODALITIES, **prompts(3))
    routed = model(image, MODALITIES, **prompts(3)).detach()  # with gradients: one batch, masked routing
    torch.testing.assert_close(fast, routed, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2)  # an optimiser step: the cached merged weights must follow
        fast2 = model(image, MODALITIES, **prompts(3))
    torch.testing.assert_close(fast2, model(image, MODALITIES, **prompts(3)).detach(), atol=1e-4, rtol=1e-4)
    assert (fast2[1] - fast[1]).abs().max() > 1e-3 and torch.equal(fast2[0], fast[0])
    if kind == "dora":  # a step that moves only the magnitudes must reach the cached merged weights too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.5)
            fast3 = model(image, MODALITIES, **prompts(3))
        torch.testing.assert_close(fast3, model(image, MODALITIES, **prompts(3)).detach(), atol=1e-4, rtol=1e-4)
        assert (fast3[1] - fast2[1]).abs().max() > 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0])
def test_task_dropout_trains_the_null_prior(dropout, image):
    """`predict` without a known class uses the null task's prior: task dropout is what trains it."""
    cfg = config(priors={"dim": 16, "num_heads": 2, "task_dropout": dropout})
    model, _ = build(cfg)
    perturb(model)  # open gates: at zero gates no prior receives a gradient
    model.train()
    torch.manual_seed(0)
    rows = torch.cat([image] * 4)  # 12 MRI rows, all of a known task
    b = batch(rows[:3], ["MRI"] * 3)
    b = TrainBatch(**{**b.__dict__, "image": rows, "target": torch.cat([b.target] * 4),
                      "class_names": b.class_names * 4, "modalities": ["MRI"] * 12,
                      "task_ids": torch.cat([b.task_ids] * 4), "boxes": torch.cat([b.boxes] * 4),
                      "point_coords": torch.cat([b.point_coords] * 4), "point_labels": torch.cat([b.point_labels] * 4),
                      "pseudo_target": None})
    combination_loss(model, b, cfg.train.loss).total.backward()
    grad = model.priors.task_pool.grad
    null, known = grad[0].abs().sum(), grad[1:].abs().sum()
    if dropout == 0.0:
        assert null == 0 and known > 0
    elif dropout == 1.0:
        assert null > 0 and known == 0
    else:
        assert null > 0 and known > 0
    model.eval()
    with torch.no_grad():  # never at inference: the model sees the task it is given
        assert torch.equal(model(image, "MRI", boxes=prompts(3)["boxes"], task=torch.tensor([1, 2, 3])),
                           model(image, "MRI", boxes=prompts(3)["boxes"], task=torch.tensor([1, 2, 3])))
