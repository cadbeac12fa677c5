"""No wrong answer in silence, no misleading message: non-finite parameters (base, adapter expert, priors) are
refused at load naming the tensor; a prediction emptied by NaN/Inf logits says so; random bytes are "not a
checkpoint" (no --trust-pickle hint); a directory is not a missing file; float64 overflow is not NaN/Inf."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from safetensors.torch import load_file, save_file

from segevo.config import parse_config
from segevo.data.cases import CaseError
from segevo.data.readers import read_image
from segevo.data.tasks import TaskVocabulary
from segevo.model import SegVol
from segevo.model.adapter_io import WEIGHTS, build_from_adapters, save_adapters
from segevo.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from segevo.training import build_model
from segevo_pipeline.cli import main

CFG = {"model": TINY, "priors": {"dim": 16, "num_heads": 2}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny config, its SegVol as an HF checkpoint, an adapter folder, and a small NIfTI image."""
    tmp = tmp_path_factory.mktemp("finite")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(CFG))
    cfg = parse_config(CFG)
    torch.manual_seed(0)
    base = SegVol(cfg.model)
    weights = tmp / "base.bin"
    torch.save({f"model.{k}": v for k, v in base.state_dict().items()}, weights)
    model = build_model(cfg, TaskVocabulary([("demo", "liver")]))
    adapter = save_adapters(model, tmp / "adapter")
    image = tmp / "scan.nii.gz"
    volume = np.random.default_rng(0).random((40, 36, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), image)
    return {"config": config, "weights": weights, "adapter": adapter, "image": image}


def poisoned(src: Path, dst: Path, key_part: str, value: float) -> str:
    state = torch.load(src, weights_only=True)
    key = next(k for k in state if key_part in k and state[k].is_floating_point())
    state[key].view(-1)[3] = value
    torch.save(state, dst)
    return key.removeprefix("model.")


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("segevo: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("part", "value"), [
    ("image_encoder.blocks.0.attn.qkv.weight", float("nan")), ("mask_decoder", float("inf")),
    ("prompt_encoder", float("-inf")), ("text_encoder", float("nan")), ("patch_embedding", float("nan")),
])
def test_weights_check_refuses_a_non_finite_base_naming_the_tensor(files, tmp_path, capsys, part, value):
    bad = tmp_path / "bad.bin"
    key = poisoned(files["weights"], bad, part, value)
    err = one_line_error(capsys, ["--config", str(files["config"]), "weights", "check", str(bad)])
    assert f"{bad}: tensor {key} holds 1 NaN/Inf values" in err


def test_v1_and_vit_layouts_are_checked_too(files, tmp_path):
    state = {k.removeprefix("model."): v for k, v in torch.load(files["weights"], weights_only=True).items()}
    key = "image_encoder.blocks.1.mlp.linear1.weight"
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    v1, vit = tmp_path / "v1.pth", tmp_path / "vit.ckpt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, v1)
    torch.save({"state_dict": {f"model.encoder.{k.removeprefix('image_encoder.')}": v for k, v in state.items()
                               if k.startswith("image_encoder.")}}, vit)
    cfg = parse_config(CFG).model
    with pytest.raises(CheckpointError, match=f"tensor {key} holds 1 NaN/Inf"):
        load_checkpoint(SegVol(cfg), v1)
    with pytest.raises(CheckpointError, match="tensor blocks.1.mlp.linear1.weight holds 1 NaN/Inf"):
        load_checkpoint(SegVol(cfg), vit)


@pytest.mark.parametrize("kind", ["lora", "priors"])
def test_adapter_expert_or_prior_that_is_not_finite_is_refused(files, tmp_path, capsys, kind):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapters.json").write_bytes((files["adapter"] / "adapters.json").read_bytes())
    tensors = load_file(str(files["adapter"] / WEIGHTS))
    key = next(k for k in tensors if (".lora_" in k) == (kind == "lora") and (kind != "priors" or "priors" in k))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointError, match=f"tensor {key.replace('.', '[.]')} holds 1 NaN/Inf"):
        build_from_adapters(folder)
    out = tmp_path / "mask.nii.gz"
    err = one_line_error(capsys, ["--config", str(files["config"]), "predict", "--image", str(files["image"]),
                                  "--out", str(out), "--modality", "MRI", "--box", "2,2,2,20,20,10",
                                  "--adapter", str(folder)])
    assert key in err and not out.exists()


def test_empty_because_of_the_model_is_said(files, tmp_path, capsys, monkeypatch):
    """NaN/Inf logits read as background: the mask is written, but stderr and the sidecar say the model failed
    on those voxels, unlike a genuinely empty prediction."""
    from segevo import inference

    real_run = inference.ZoomInference.run

    def failing(self, image, modality, queries):
        for result in real_run(self, image, modality, queries):
            result.logits[...] = np.nan
            yield result

    out = tmp_path / "mask.nii.gz"
    argv = ["--config", str(files["config"]), "predict", "--image", str(files["image"]), "--out", str(out),
            "--modality", "CT", "--box", "2,2,2,20,20,10", "--weights", str(files["weights"]), "--no-zoom-in"]
    assert main(argv) == 0
    healthy = json.loads((tmp_path / "mask.json").read_text())
    assert healthy["non_finite_logits"] == {"1": 0} and "warning" not in capsys.readouterr().err
    monkeypatch.setattr(inference.ZoomInference, "run", failing)
    assert main(argv) == 0
    err = capsys.readouterr().err
    sidecar = json.loads((tmp_path / "mask.json").read_text())
    assert sidecar["voxels"] == {"1": 0} and sidecar["non_finite_logits"]["1"] > 0
    assert "segevo: warning: object: the model produced" in err and "because the model failed" in err
    assert not np.asarray(nib.load(out).dataobj).any()


@pytest.mark.parametrize("content", [
    np.random.default_rng(1).bytes(4096), b"", b"\x00" * 64, b"PK\x03\x04 not really a zip",
    b"\x80\x09 pickle protocol 9", "résumé".encode("latin-1"),
])
def test_random_bytes_are_not_a_checkpoint_and_never_invite_trust_pickle(tmp_path, capsys, content):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    for trust in ([], ["--trust-pickle"]):
        err = one_line_error(capsys, ["weights", "check", str(path), *trust])
        assert "not a torch checkpoint" in err or "not a readable torch checkpoint" in err
        assert "trust-pickle" not in err


class Custom:
    """A pickled object that weights_only=True cannot rebuild: a real case for --trust-pickle."""


def test_a_real_pickle_still_names_trust_pickle(tmp_path):
    path = tmp_path / "custom.pth"
    buffer = io.BytesIO()
    torch.save({"model": Custom()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="needs full unpickling.*--trust-pickle"):
        read_checkpoint(path)
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as f:
        torch.save({"x": torch.zeros(2)}, f, _use_new_zipfile_serialization=False, pickle_protocol=2)
    assert torch.equal(read_checkpoint(legacy)["x"], torch.zeros(2))
    assert pickle.HIGHEST_PROTOCOL >= 2


def test_a_directory_is_not_a_missing_file(tmp_path, capsys):
    err = one_line_error(capsys, ["weights", "check", str(tmp_path)])
    assert "is a directory, not a checkpoint file" in err and "no such" not in err
    err = one_line_error(capsys, ["weights", "check", str(tmp_path / "nope.bin")])
    assert "no such checkpoint file" in err


@pytest.mark.parametrize(("value", "message"), [
    (1e39, "1 voxels are finite but beyond the float32 range"), (-1e300, "beyond the float32 range"),
    (np.nan, "1 NaN/Inf voxels"), (np.inf, "1 NaN/Inf voxels"), (3.4e38, None), (-3.4e38, None),
])
def test_float64_beyond_float32_is_not_called_nan(tmp_path, value, message):
    data = np.random.default_rng(0).random((6, 5, 4))
    data[1, 2, 3] = value
    path = tmp_path / "wide.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float64), np.eye(4)), path)
    if message is None:
        assert np.isfinite(read_image(path)[0]).all()
        return
    with pytest.raises(CaseError, match=message):
        read_image(path)
