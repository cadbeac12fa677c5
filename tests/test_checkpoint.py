"""Strict checkpoint loading: the three released layouts, library-version rewrites, and every refusal."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from segevo.model import CheckpointError, SegVol, load_checkpoint
from segevo.model.checkpoint import canonical_state_dict, read_checkpoint

CONTAINERS = {
    "hf": lambda sd: sd,
    "v1": lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 10},
    "vit": lambda sd: {"state_dict": sd, "epoch": 2000, "global_step": 5},
}


def synthetic_state_dict(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes a key table lists (int64 arange for CLIP's position_ids)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.arange(shape[-1]).expand(*shape).clone() if k.endswith("position_ids")
        else torch.randn(*shape, generator=g)
        for k, shape in keys.items()
    }


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


# ---- full size, from the reference key tables -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "v1", "vit"])
def test_key_table_checkpoints_load_strictly_and_land_in_place(layout, key_table, full_model, tmp_path):
    table = key_table({"hf": "segvol_hf", "v1": "segvol_v1", "vit": "vit_pretrain"}[layout])
    keys = dict(table["keys"])
    if layout == "vit":  # the SimMIM head's entries are in the file too and must be ignored
        keys.update(table["probable_other_keys"])
    sd = synthetic_state_dict(keys, seed=len(layout))
    path = tmp_path / f"ckpt_{layout}.bin"
    torch.save(CONTAINERS[layout](sd), path)

    report = load_checkpoint(full_model, path)

    assert report.layout == layout
    prefix = table["prefix"]
    model_sd = full_model.state_dict()
    target_prefix = "image_encoder." if layout == "vit" else ""
    loaded = 0
    for key, tensor in sd.items():
        if not key.startswith(prefix) or key.endswith("position_ids"):
            continue
        torch.testing.assert_close(model_sd[target_prefix + key[len(prefix):]], tensor, rtol=0, atol=0)
        loaded += 1
    expected = {"hf": 474, "v1": 474, "vit": 137}[layout]
    assert loaded == report.loaded == expected
    if layout != "vit":
        assert report.dropped == ["text_encoder.clip_text_model.text_model.embeddings.position_ids"]
        assert sum(report.parts.values()) == 180_890_064


@pytest.mark.slow
def test_full_size_parameter_counts(full_model, key_table):
    table = key_table("segvol_hf")
    counts = full_model.parameter_counts()
    assert counts == {part: table["submodules"][part]["n_parameters"] for part in counts}
    assert sum(counts.values()) == table["n_parameters_total"] == 180_890_064
    assert len(full_model.state_dict()) == table["n_keys"] - 1  # position_ids is not a persistent buffer here


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["drop", "extra", "reshape"])
def test_mismatched_checkpoint_is_refused_with_a_listing(fault, key_table, full_model, tmp_path):
    sd = synthetic_state_dict(key_table("segvol_hf")["keys"])
    victim = "model.mask_decoder.iou_token.weight"
    if fault == "drop":
        del sd[victim]
    elif fault == "extra":
        sd["model.mask_decoder.extra_head.weight"] = torch.zeros(2)
    else:
        sd[victim] = torch.zeros(2, 768)
    path = tmp_path / "bad.bin"
    torch.save(sd, path)
    before = full_model.mask_decoder.iou_token.weight.clone()
    message = {"drop": r"1 missing keys: mask_decoder\.iou_token\.weight",
               "extra": r"1 unexpected keys: mask_decoder\.extra_head\.weight",
               "reshape": r"1 mis-shaped tensors: mask_decoder\.iou_token\.weight \(2, 768\) vs model \(1, 768\)"}
    with pytest.raises(CheckpointError, match=message[fault]):
        load_checkpoint(full_model, path)
    assert torch.equal(full_model.mask_decoder.iou_token.weight, before)  # nothing half-loaded


# ---- tiny model round trips and rewrites ------------------------------------------------------------------

@pytest.fixture()
def tiny_pair(tiny_cfg):
    torch.manual_seed(1)
    src = SegVol(tiny_cfg).eval()
    torch.manual_seed(2)
    dst = SegVol(tiny_cfg).eval()
    return src, dst


def _with_legacy_position_ids(sd: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    out = dict(sd)
    out["text_encoder.clip_text_model.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return out


@pytest.mark.parametrize("layout", ["hf", "v1"])
def test_tiny_round_trip_gives_identical_outputs(layout, tiny_pair, tiny_cfg, tmp_path):
    src, dst = tiny_pair
    sd = _with_legacy_position_ids(src.state_dict(), tiny_cfg.text.max_position_embeddings)
    path = tmp_path / "tiny.bin"
    torch.save(CONTAINERS[layout](prefixed(sd, {"hf": "model.", "v1": "module."}[layout])), path)
    report = load_checkpoint(dst, path, layout=layout)
    image = torch.rand(1, 1, *tiny_cfg.roi_size)
    with torch.no_grad():
        torch.testing.assert_close(dst(image, text="liver"), src(image, text="liver"), rtol=0, atol=0)
    assert report.loaded == len(src.state_dict())


def test_vit_layout_fills_only_the_image_encoder(tiny_pair, tmp_path):
    src, dst = tiny_pair
    decoder_before = {k: v.clone() for k, v in dst.mask_decoder.state_dict().items()}
    sd = prefixed(src.image_encoder.state_dict(), "model.encoder.")
    sd["model.mask_token"] = torch.zeros(32)
    path = tmp_path / "vit.ckpt"
    torch.save({"state_dict": sd}, path)
    report = load_checkpoint(dst, path)
    assert report.layout == "vit" and list(report.parts) == ["image_encoder"]
    for k, v in src.image_encoder.state_dict().items():
        assert torch.equal(dst.image_encoder.state_dict()[k], v)
    for k, v in dst.mask_decoder.state_dict().items():
        assert torch.equal(decoder_before[k], v)


def test_current_library_layouts_are_mapped_by_name(tiny_pair, tmp_path):
    """transformers >= 5.6 (no ``text_model.`` level) and MONAI >= 1.4 (``norm_cross_attn``) checkpoints."""
    src, dst = tiny_pair
    sd = {}
    for k, v in src.state_dict().items():
        sd[k.replace("clip_text_model.text_model.", "clip_text_model.")] = v
    sd["image_encoder.blocks.0.norm_cross_attn.weight"] = torch.ones(32)
    sd["image_encoder.blocks.0.norm_cross_attn.bias"] = torch.zeros(32)
    path = tmp_path / "modern.bin"
    torch.save(prefixed(sd, "model."), path)
    report = load_checkpoint(dst, path)
    assert sorted(report.dropped) == ["image_encoder.blocks.0.norm_cross_attn.bias",
                                      "image_encoder.blocks.0.norm_cross_attn.weight"]
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_a_listing_shows_ten_keys_and_a_count(tiny_cfg, tiny_pair, tmp_path):
    src, dst = tiny_pair
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("image_encoder.blocks")}
    path = tmp_path / "partial.bin"
    torch.save(prefixed(sd, "model."), path)
    n_missing = len([k for k in src.state_dict() if k.startswith("image_encoder.blocks")])
    with pytest.raises(CheckpointError, match=rf"{n_missing} missing keys: .* \.\.\. and {n_missing - 10} more"):
        load_checkpoint(dst, path)


class _Opaque:
    """Not an allow-listed type: ``weights_only`` unpickling must refuse it."""


def test_pickle_needing_full_unpickling_is_refused_unless_trusted(tiny_pair, tmp_path):
    src, dst = tiny_pair
    path = tmp_path / "pickled.pth"
    torch.save({"model": prefixed(src.state_dict(), "module."), "extra": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(dst, path)
    report = load_checkpoint(dst, path, trust_pickle=True)
    assert report.layout == "v1"


def test_v1_optimizer_state_is_plain_data_and_loads_safely(tiny_pair, tmp_path):
    src, dst = tiny_pair
    opt = torch.optim.AdamW(src.parameters(), lr=1e-4)
    src(torch.rand(1, 1, *src.cfg.roi_size), text="liver").mean().backward()
    opt.step()
    path = tmp_path / "SegVol_v1.pth"
    torch.save({"model": prefixed(src.state_dict(), "module."), "optimizer": opt.state_dict(), "epoch": 3,
                "scheduler": {"last_epoch": 3}}, path)
    assert load_checkpoint(dst, path).layout == "v1"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_unreadable_files_give_a_clear_error(damage, tiny_pair, tmp_path):
    src, _ = tiny_pair
    path = tmp_path / "broken.bin"
    if damage != "missing":
        torch.save(prefixed(src.state_dict(), "model."), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        read_checkpoint(path)


def test_unknown_layouts_are_refused():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        canonical_state_dict({"weights": {"a": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match="unknown layout"):
        canonical_state_dict({}, layout="safetensors")
    with pytest.raises(CheckpointError, match="not a 'vit' checkpoint"):
        canonical_state_dict(collections.OrderedDict(a=torch.zeros(1)), layout="vit")


def test_load_model_returns_eval_mode_and_loads_strictly(tiny_pair, tiny_cfg, tmp_path: Path):
    import segevo

    src, _ = tiny_pair
    path = tmp_path / "tiny.bin"
    torch.save(prefixed(src.state_dict(), "model."), path)
    model = segevo.load_model(path, config=tiny_cfg)
    assert not model.training
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
