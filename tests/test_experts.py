"""The ``Expert`` kinds on one adapted layer, checked against the formulas recomputed by hand: LoRA adds
``s B A x``, DoRA computes ``m / ||W + s B A|| * (W + s B A) x`` per output feature; rows of other experts get
the base layer's output bit for bit; merged weights, the registry and the config agree."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from segevo.config import ExpertConfig, parse_config, search_space
from segevo.model import SegVol
from segevo.model.adapted import AdaptedSegVol
from segevo.model.experts import KINDS

LAYER = "image_encoder.blocks.0.mlp.linear1"  # a Linear with a bias, adapted by every trained expert


def mixed_model(perturbed: bool = True) -> AdaptedSegVol:
    cfg = parse_config({"model": TINY, "priors": {"enabled": False}, "adapters": {"experts": {
        "CT": {"kind": "identity"}, "MRI": {"kind": "dora", "rank": 4, "alpha": 16},
        "PET": {"kind": "lora", "rank": 2, "alpha": 4}}}})
    torch.manual_seed(0)
    model = AdaptedSegVol(SegVol(cfg.model), cfg.adapters, cfg.priors)
    if perturbed:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif "lora_magnitude_vector" in name:
                    p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model


def by_hand(model: AdaptedSegVol, expert: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert's effective weight of LAYER from the raw tensors (the paper formulas), and the layer's bias."""
    tensors = dict(model.base.named_parameters())
    weight, bias = tensors[f"{LAYER}.base_layer.weight"], tensors[f"{LAYER}.base_layer.bias"]
    e = model.adapters_cfg.experts[expert]
    a, b = tensors[f"{LAYER}.lora_A.{expert}.weight"], tensors[f"{LAYER}.lora_B.{expert}.weight"]
    combined = weight + (e.alpha / e.rank) * b @ a
    if e.kind == "dora":
        magnitude = tensors[f"{LAYER}.lora_magnitude_vector.{expert}.weight"]
        combined = (magnitude / combined.norm(dim=1))[:, None] * combined
    return combined.detach(), bias.detach()


def test_mixed_rows_follow_their_own_expert_and_other_rows_get_the_base_bits():
    model = mixed_model()
    layer = model.moa.layers[LAYER]
    x = torch.randn(4, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    rows = ["MRI", "CT", "PET", "MRI"]
    with model.moa.route(rows, x.device):
        out = layer(x)
    base = model.moa.experts["MRI"].base_layer(layer)(x)
    assert torch.equal(out[1], base[1])  # the identity row, through a layer holding a DoRA and a LoRA expert
    for i, expert in enumerate(rows):
        if expert != "CT":
            weight, bias = by_hand(model, expert)
            torch.testing.assert_close(out[i], F.linear(x[i], weight, bias), atol=1e-5, rtol=1e-5)
            assert (out[i] - base[i]).abs().max() > 1e-2, f"row {i} was not adapted"


def test_gradients_reach_only_the_expert_of_the_rows():
    model = mixed_model()
    layer = model.moa.layers[LAYER]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    with model.moa.route(["PET", "CT"], x.device):
        layer(x).square().sum().backward()
    grads = {e: [p.grad for n, p in model.moa.expert_parameters(e).items() if n.startswith(f"{LAYER}.")]
             for e in ("MRI", "PET")}
    assert len(grads["MRI"]) == 3 and all(g is None or not g.any() for g in grads["MRI"])  # A, B, magnitude
    assert len(grads["PET"]) == 2 and all(g is not None and g.any() for g in grads["PET"])


@pytest.mark.parametrize("expert", ["MRI", "PET"])
def test_merged_weight_is_the_formula_and_the_export_holds_it(expert):
    model = mixed_model()
    weight, bias = by_hand(model, expert)
    torch.testing.assert_close(model.moa.experts[expert].merged_weight(model.moa.layers[LAYER]), weight,
                               atol=1e-6, rtol=1e-5)
    state = model.moa.merged_state_dict(expert)
    torch.testing.assert_close(state[f"{LAYER}.weight"], weight, atol=1e-6, rtol=1e-5)
    assert torch.equal(state[f"{LAYER}.bias"], bias)
    assert set(state) == set(SegVol(model.base.cfg).state_dict())


def test_a_fresh_dora_expert_is_the_base_layer():
    """peft initialises the magnitude to ``||W||`` and B to zero: the expert starts as the pretrained layer."""
    model = mixed_model(perturbed=False)
    layer = model.moa.layers[LAYER]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    with model.moa.route(["MRI", "MRI"], x.device):
        torch.testing.assert_close(layer(x), model.moa.experts["MRI"].base_layer(layer)(x), atol=1e-6, rtol=1e-6)


def test_every_configurable_kind_is_registered_and_tuned_by_rank():
    assert set(typing.get_args(ExpertConfig.model_fields["kind"].annotation)) == set(KINDS)
    cfg = parse_config({"adapters": {"experts": {"CT": {"kind": "identity"}, "MRI": {"kind": "dora"}}}})
    assert "adapters.experts.MRI.rank" in search_space(cfg) and "adapters.experts.CT.rank" not in search_space(cfg)
