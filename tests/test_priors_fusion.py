"""The context priors as the poster and HERMES describe them: every switch of the fusion block changes the
forward, zero gates give SegVol for every switch combination, per-name modality pools, HERMES' modality
classification loss, the prototype kinds' interface, and the prior analysis' self-attention figure."""

from __future__ import annotations

import itertools
import typing

import pytest
import torch
from conftest import TINY
from test_adapters_priors import MODALITIES, TASKS, batch, build, config, perturb, prompts

from segevo.config import ConfigError, PriorsConfig, parse_config
from segevo.losses import combination_loss, modality_loss
from segevo.model.adapter_io import build_from_adapters, save_adapters
from segevo.model.prototypes import KINDS, prototype_kind
from segevo.model.segvol import Prompts

PRIORS = {"dim": 16, "num_heads": 2}
SWITCH_MODULES = {  # the parameters each switch removes, as key fragments
    "self_attention": (".self_attn.", ".norm_self."),
    "fuse_image": (".image_from_prior.", ".image_mlp.", ".norm_p2.", ".norm_img_mlp.", "priors.image_out.",
                   "priors.image_gate"),
    "posterior_prototype": ("priors.prompt_in.", "priors.norm_task.", "priors.norm_prompt.",
                            "priors.task_from_prompt.", "priors.norm_post.", "priors.posterior_mlp.",
                            "priors.prototype_gate"),
}


@pytest.fixture()
def image(tiny_cfg):
    return torch.rand(3, 1, *tiny_cfg.roi_size, generator=torch.Generator().manual_seed(5))


def run(model, image, modality=MODALITIES, task=(("amos", "liver"), ("amos", "spleen"), None)):
    with torch.no_grad():
        return model(image, modality, **prompts(image.shape[0]), task=list(task)[: image.shape[0]])


# ---- switches ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("switch", list(SWITCH_MODULES))
def test_each_switch_changes_the_forward_with_open_gates(switch, image):
    """Same weights with one part switched off: only that part's parameters go, and MRI rows change (CT rows,
    routed to the identity expert, stay SegVol's)."""
    full, _ = build(config(priors={**PRIORS, "depth": 2}))
    perturb(full)
    ablated, _ = build(config(priors={**PRIORS, "depth": 2, switch: False}))
    result = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(any(f in k for f in SWITCH_MODULES[switch])
                                          for k in result.unexpected_keys)
    a, b = run(full, image), run(ablated, image)
    assert (a[1] - b[1]).abs().max() > 1e-4
    assert torch.equal(a[[0, 2]], b[[0, 2]])


def test_the_image_path_and_the_prototype_path_cannot_both_be_off():
    with pytest.raises(ConfigError, match="priors: .*fuse_image and posterior_prototype are both off"):
        config(priors={**PRIORS, "fuse_image": False, "posterior_prototype": False})
    config(priors={"enabled": False, "fuse_image": False, "posterior_prototype": False})


COMBINATIONS = [
    {"self_attention": sa, "fuse_image": fi, "posterior_prototype": pp, "prototype": kind,
     "modality_pools": pools, "modality_loss_weight": w, "modalities": ["MRI-T2"]}
    for (sa, (fi, pp), kind), (pools, w) in zip(
        itertools.product([True, False], [(True, True), (True, False), (False, True)], KINDS),
        itertools.cycle([("name", 0.01), ("expert", 0.0), ("name", 0.0)]))
]


@pytest.mark.parametrize("switches", COMBINATIONS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()
                                                                         if k != "modalities"))
def test_zero_gates_give_segvol_and_ct_rows_stay_segvol_for_every_switch_combination(switches, image):
    modalities = ["CT", "MRI-T2", "MRI"]
    on, _ = build(config(priors={**PRIORS, **switches}))
    off, reference = build(config(priors={"enabled": False}))
    assert torch.equal(run(on, image, modalities), run(off, image, modalities))
    perturb(on)
    trained = run(on, image, modalities)
    p = prompts(3)
    sub = Prompts(p["text"][:1], p["boxes"][:1], (p["points"][0][:1], p["points"][1][:1]))
    with torch.no_grad():
        segvol = reference.decode_combinations(reference.encode_image(image[:1]), [("text+box+point", sub)])[0]
    assert torch.equal(trained[:1], segvol)
    assert (trained[1:] - run(off, image, modalities)[1:]).abs().max() > 1e-4


# ---- modality pools per name ------------------------------------------------------------------------------------

def test_modality_names_get_their_own_pool_on_a_shared_expert(image):
    cfg = config(priors={**PRIORS, "modalities": ["MRI-T1", "MRI-T2"]})
    model, _ = build(cfg)
    perturb(model)
    assert model.modalities == ["CT", "MRI", "MRI-T1", "MRI-T2"]
    assert model.experts_of(["MRI-T1", "MRI-T2"], 2) == ["MRI", "MRI"]
    assert model.modality_ids(["MRI-T1", "MRI-T2", "MRI-T3", "MRI", "CT"], image.device).tolist() == [2, 3, 1, 1, 0]
    pool = model.priors.modality_pool
    assert not torch.equal(pool[2], pool[3])
    t1, t2 = run(model, image, ["MRI-T1"] * 3), run(model, image, ["MRI-T2"] * 3)
    assert (t1 - t2).abs().max() > 1e-4
    assert torch.equal(run(model, image, ["MRI-T3"] * 3), run(model, image, ["MRI"] * 3))  # no pool: the expert's

    per_expert, _ = build(config(priors={**PRIORS, "modalities": ["MRI-T1", "MRI-T2"], "modality_pools": "expert"}))
    perturb(per_expert)
    assert per_expert.modalities == ["CT", "MRI"]
    assert torch.equal(run(per_expert, image, ["MRI-T1"] * 3), run(per_expert, image, ["MRI-T2"] * 3))


def test_training_adds_the_cases_modality_names_and_the_checkpoint_keeps_every_new_part(image, tmp_path):
    from segevo import training

    cfg = parse_config({"model": TINY, "priors": {**PRIORS, "depth": 2}})
    model = training.build_model(cfg, TASKS, ["CT", "MRI-T2", "MRI-T1"]).eval()
    assert model.modalities == ["CT", "MRI", "MRI-T2", "MRI-T1"]
    perturb(model)
    keys = set(model.state_dict())
    for part in ("self_attn", "image_mlp", "modality_head", "posterior_mlp"):
        assert any(f".{part}." in k for k in keys), part
    save_adapters(model, tmp_path / "run")
    reloaded = build_from_adapters(tmp_path / "run")
    rows = ["CT", "MRI-T2", "MRI-T1"]
    assert reloaded.modalities == model.modalities
    assert torch.equal(run(reloaded, image, rows), run(model, image, rows))


# ---- modality classification loss ---------------------------------------------------------------------------------

def test_modality_loss_is_the_cross_entropy_of_each_rows_pool(image):
    weight = 0.5
    cfg = config(priors={**PRIORS, "modalities": ["MRI-T2"], "modality_loss_weight": weight, "task_dropout": 0})
    model, _ = build(cfg)
    perturb(model)
    plain, _ = build(config(priors={**PRIORS, "modalities": ["MRI-T2"], "modality_loss_weight": 0,
                                    "task_dropout": 0}))
    plain.load_state_dict(model.state_dict(), strict=False)
    model.train()
    plain.train()
    rows = ["CT", "MRI-T2", "MRI"]
    b = batch(image, rows)
    out = combination_loss(model, b, cfg.train.loss)
    _, state = model.forward_batch(b.image, rows, [("box", Prompts(boxes=b.boxes))], b.task_ids)
    logits = state["modality_logits"].double()
    assert logits.shape == (3, 3) and state["modality_targets"].tolist() == [0, 2, 1]
    # the rows the priors adapt (MRI-T2, MRI), by hand; the CT row (identity expert) does not count
    expected = -(logits - logits.exp().sum(1, keepdim=True).log())[[1, 2], [2, 1]].mean()
    torch.testing.assert_close(out.auxiliary["modality"].double(), expected, rtol=1e-5, atol=1e-6)
    without = combination_loss(plain, b, cfg.train.loss)
    assert not without.auxiliary
    torch.testing.assert_close(out.total - without.total, weight * out.auxiliary["modality"], rtol=1e-4, atol=1e-5)


def test_zero_weight_builds_no_head_and_leaves_the_loss_alone(image):
    model, _ = build(config(priors={**PRIORS, "modality_loss_weight": 0}))
    assert model.priors.modality_head is None
    assert not [n for n in model.state_dict() if "modality_head" in n]
    model.train()
    _, state = model.forward_batch(image, MODALITIES, [("box", Prompts(boxes=prompts(3)["boxes"]))])
    assert "modality_logits" not in state and modality_loss(state) is None


def test_identity_rows_give_the_modality_loss_nothing(image):
    """CT rows (identity expert) are not adapted by the priors: their modality loss is an exact 0 with zero
    gradients, so a CT-only step may leave the priors idle."""
    model, _ = build(config(priors={**PRIORS, "modality_loss_weight": 1.0}))
    model.train()
    assert model.groups_used(["CT", "CT"]) == set()
    _, state = model.encode(image[:2], ["CT", "CT"], torch.tensor([1, 2]))
    loss = modality_loss(state)
    loss.backward()
    assert loss == 0 and all(p.grad is None or not p.grad.any() for p in model.priors.parameters())


def test_modality_loss_trains_the_modality_posterior_tokens(image):
    model, _ = build(config(priors={**PRIORS, "modalities": ["MRI-T1", "MRI-T2"], "modality_loss_weight": 1.0}))
    model.train()
    rows = ["MRI", "MRI-T1", "MRI-T2"]
    experts = model.experts_of(rows, 3)
    params = [p for n, p in model.named_parameters() if n.startswith("priors.")]
    opt = torch.optim.Adam(params, lr=1e-2)
    before = model.priors.modality_pool.detach().clone()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        _, state = model.encode(image, experts, torch.tensor([1, 2, 3]), rows)
        loss = modality_loss(state)
        loss.backward()
        if not losses:
            grad = model.priors.modality_pool.grad
            assert grad[[1, 2, 3]].abs().sum(dim=(1, 2)).gt(0).all() and not grad[0].any()  # CT: no row
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.priors.modality_pool.detach(), before)


# ---- prototype kinds, prior analysis ----------------------------------------------------------------------------

def test_prototype_kinds_are_chosen_in_one_place():
    assert set(typing.get_args(PriorsConfig.model_fields["prototype"].annotation)) == set(KINDS)
    proto = torch.randn(2, 32)
    add, mul = prototype_kind("additive"), prototype_kind("multiplicative")
    assert add.width(32) == 32 and mul.width(32) == 4
    assert add.decoder_inputs(proto).mask_token_delta is proto and add.decoder_inputs(proto).extra_kernel is None
    assert mul.decoder_inputs(proto).extra_kernel is proto and mul.decoder_inputs(proto).mask_token_delta is None
    with pytest.raises(ValueError, match="priors.prototype 'scaled' is not one of additive, multiplicative"):
        prototype_kind("scaled")


def test_self_attention_affinity_matches_a_direct_computation(tmp_path):
    from segevo_pipeline.report import prior_analysis

    model, _ = build(config(priors={**PRIORS, "pool_size": 3}))
    perturb(model)
    pr = model.priors
    affinity = pr.self_attention_affinity()
    n = len(TASKS) - 1 + len(model.modalities)
    assert affinity.shape == (n, n)
    # by hand: all tokens of all priors (null task left out) in one sequence, LayerNorm, per-head q.k / sqrt(d)
    block = pr.blocks[0]
    src = pr.source_embedding
    x = torch.cat([(pr.task_pool[1:] + src[1]).reshape(-1, 16), (pr.modality_pool + src[2]).reshape(-1, 16)])
    x = torch.nn.functional.layer_norm(x, (16,), block.norm_self.weight, block.norm_self.bias)
    q = x @ block.self_attn.q.weight.T
    k = x @ block.self_attn.kv.weight[:16].T
    scores = sum(q[:, h * 8:(h + 1) * 8] @ k[:, h * 8:(h + 1) * 8].T / 8 ** 0.5 for h in range(2)) / 2
    expected = scores.detach().reshape(n, 3, n, 3).mean(dim=(1, 3)).softmax(dim=1)
    torch.testing.assert_close(affinity, expected, rtol=1e-4, atol=1e-6)

    result = prior_analysis(model, tmp_path)
    assert (tmp_path / result["attention"]).stat().st_size > 0 and 0 < result["attention_self_share"] < 1
    without, _ = build(config(priors={**PRIORS, "self_attention": False}))
    assert "attention" not in prior_analysis(without, tmp_path / "off")
