"""SegVol on a tiny config: every prompt subset, batches, gradients and input validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from segevo.model import SegVol
from segevo.model.segvol import Prompts

PROMPTS = ("text", "boxes", "points")
SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(PROMPTS, r)]


def make_prompts(b: int, names: tuple[str, ...], n_points: int = 3) -> dict:
    g = torch.Generator().manual_seed(b * 10 + n_points)
    out: dict = {}
    if "text" in names:
        out["text"] = ["liver", "left kidney", "spleen", "pancreas"][:b]
    if "boxes" in names:
        lo = torch.tensor([1.0, 2.0, 3.0]).expand(b, 3)
        out["boxes"] = torch.cat([lo, lo + torch.tensor([4.0, 20.0, 18.0])], dim=1)
    if "points" in names:
        coords = torch.rand(b, n_points, 3, generator=g) * torch.tensor([8.0, 32.0, 32.0])
        labels = torch.tensor([1, 0, 1, 1, 0][:n_points]).expand(b, n_points).clone()
        if b > 1:  # a row with fewer points, padded with label -1
            labels[1, 1:] = -1
        out["points"] = (coords, labels)
    return out


@pytest.fixture()
def model(tiny_cfg) -> SegVol:
    torch.manual_seed(0)
    return SegVol(tiny_cfg)


@pytest.fixture()
def image(tiny_cfg) -> torch.Tensor:
    return torch.rand(2, 1, *tiny_cfg.roi_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_prompt_subset_runs_forward_and_backward(model, image, tiny_cfg, names):
    logits = model(image, **make_prompts(2, names))
    assert logits.shape == (2, 1, *tiny_cfg.roi_size)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for part in ("image_encoder", "mask_decoder"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part
    assert all(p.grad is None for p in model.text_encoder.clip_text_model.parameters())
    if "text" in names:
        assert model.text_encoder.dim_align.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("names", [("text", "boxes", "points"), ("points",), ("text",)])
def test_batch_rows_equal_single_sample_runs(model, image, names):
    model.eval()
    prompts = make_prompts(2, names)
    with torch.no_grad():
        batched = model(image, **prompts)
        for i in range(2):
            row = {k: ([v[i]] if k == "text" else (v[0][i : i + 1], v[1][i : i + 1]) if k == "points"
                       else v[i : i + 1]) for k, v in prompts.items()}
            torch.testing.assert_close(batched[i : i + 1], model(image[i : i + 1], **row), atol=1e-5, rtol=1e-4)


def test_one_encoder_pass_serves_several_prompt_sets(model, image):
    model.eval()
    with torch.no_grad():
        emb = model.encode_image(image[:1])
        via_decode = model.decode(emb, text="liver")
        direct = model(image[:1], text="liver")
    torch.testing.assert_close(via_decode, direct)


def test_text_changes_output_and_template_is_used(model, image):
    model.eval()
    with torch.no_grad():
        liver = model(image[:1], text="liver")
        spleen = model(image[:1], text="spleen")
    assert not torch.allclose(liver, spleen)
    ids = model.text_encoder.tokenize(["liver"])
    assert ids.shape == (1, 12)  # "A computerized tomography of a liver." + bos/eos


def test_parameter_counts_cover_every_parameter(model):
    counts = model.parameter_counts()
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


BAD_INPUTS = [
    ("image rank", lambda img: dict(image=img[0], text="liver"), "5-D"),
    ("image size", lambda img: dict(image=img[..., :16], text="liver"), "roi_size"),
    ("integer image", lambda img: dict(image=(img * 10).long(), text="liver"), "floating-point"),
    ("nan image", lambda img: dict(image=img.masked_fill(img > 0.5, float("nan")), text="liver"), "NaN"),
    ("no prompt", lambda img: dict(image=img), "no prompt"),
    ("box length", lambda img: dict(image=img, boxes=torch.zeros(2, 4)), "boxes must have shape"),
    ("box batch", lambda img: dict(image=img, boxes=torch.zeros(1, 6)), "boxes must have shape"),
    ("box order", lambda img: dict(image=img, boxes=torch.tensor([[5.0, 0, 0, 1, 4, 4]] * 2)), "start <= end"),
    ("box type", lambda img: dict(image=img, boxes=[[0, 0, 0, 1, 1, 1]] * 2), "torch.Tensor"),
    ("text count", lambda img: dict(image=img, text=["liver"] * 3), "one class name per row"),
    ("empty text", lambda img: dict(image=img, text=["liver", " "]), "non-empty"),
    ("point shape", lambda img: dict(image=img, points=(torch.zeros(2, 3, 2), torch.ones(2, 3))), "(d, h, w)"),
    ("point labels", lambda img: dict(image=img, points=(torch.zeros(2, 3, 3), torch.full((2, 3), 2))), "labels"),
    ("label shape", lambda img: dict(image=img, points=(torch.zeros(2, 3, 3), torch.ones(2, 2))), "labels must"),
    ("points type", lambda img: dict(image=img, points=torch.zeros(2, 3, 3)), "pair"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_a_clear_value_error(model, image, case):
    _, build, message = case
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(**build(image))


def test_too_long_text_is_refused(model, image):
    with pytest.raises(ValueError, match="too long"):
        model(image[:1], text="very " * 100 + "long organ")


COMBOS = ["text", "box", "point", "text+box", "text+point", "box+point", "text+box+point"]


def test_one_decoder_batch_equals_separate_decodes_per_combination(model, image):
    """Mixing combinations of different token counts in one decoder pass changes nothing per row."""
    model.eval()
    prompts = make_prompts(2, ("text", "boxes", "points"))
    with torch.no_grad():
        emb = model.encode_image(image)
        full = Prompts(**prompts)
        other = Prompts(boxes=prompts["boxes"] + 1, points=(prompts["points"][0] + 2, prompts["points"][1]))
        requests = [(c, full) for c in COMBOS] + [("box", other), ("point", other)]
        batched = model.decode_combinations(emb, requests)
        assert batched.shape == (len(requests), 2, 1, *model.cfg.roi_size)
        for k, (combo, p) in enumerate(requests):
            sub = p.subset(combo)
            single = model.decode(emb, text=sub.text, boxes=sub.boxes, points=sub.points)
            torch.testing.assert_close(batched[k], single, atol=1e-5, rtol=1e-4)


def test_a_combination_needing_a_missing_prompt_is_refused(model, image):
    with torch.no_grad(), pytest.raises(ValueError, match="needs box"):
        model.decode_combinations(model.encode_image(image), [("text+box", Prompts(text=["liver", "spleen"]))])


def test_full_shape_layer_norm_matches_nn_layer_norm():
    from segevo.model.mask_decoder import FullShapeLayerNorm

    shape = (6, 4, 8, 8)
    ln = FullShapeLayerNorm(shape)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = torch.nn.LayerNorm(shape)
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(3, *shape) * 5 + 2
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(ln(x1), ref(x2), atol=1e-5, rtol=1e-5)
    g = torch.randn(3, *shape)
    (ln(x1) * g).sum().backward()
    (ref(x2) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ln.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), atol=0.05, rtol=0.02)
