"""The ``segevo`` console script as users run it: help, weights check, model summary, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from segevo_pipeline.cli import VERBS

REPO = Path(__file__).resolve().parents[1]
SEGEVO = str(Path(sys.executable).parent / "segevo")


def segevo(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SEGEVO, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_lists_exactly_the_working_verbs():
    out = segevo("--help")
    assert out.returncode == 0, out.stderr
    commands = out.stdout.split("  COMMAND\n", 1)[1].split("\n\n")[0]
    listed = [line.split()[0] for line in commands.splitlines()]
    assert listed == list(VERBS)
    for verb in VERBS:
        sub = segevo(verb, "--help")
        assert sub.returncode == 0, sub.stderr
    for action in (["model", "summary"], ["weights", "check"], ["weights", "download"]):
        assert segevo(*action, "--help").returncode == 0


def test_weights_check_help():
    out = segevo("weights", "check", "--help")
    assert out.returncode == 0
    assert "--layout" in out.stdout and "--trust-pickle" in out.stdout


@pytest.mark.slow
def test_weights_check_accepts_a_full_size_hf_checkpoint(parity_checkpoint):
    out = segevo("--config", "configs/full.yaml", "weights", "check", str(parity_checkpoint))
    assert out.returncode == 0, out.stderr
    assert "layout: hf (474 tensors loaded strictly" in out.stdout
    for part, n in [("image_encoder", "87,388,416"), ("prompt_encoder", "17,996"),
                    ("mask_decoder", "29,923,716"), ("text_encoder", "63,559,936"), ("total", "180,890,064")]:
        assert any(line.split() == [part, n] for line in out.stdout.splitlines()), (part, out.stdout)


@pytest.mark.slow
def test_weights_check_against_the_wrong_geometry_names_the_profile_that_fits(parity_checkpoint, tmp_path):
    out = segevo("weights", "check", str(parity_checkpoint))  # params.yaml: the small demo model
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("segevo: error: ")
    assert "mis-shaped tensors" in out.stderr and "does not fit the model of params.yaml" in out.stderr
    assert out.stderr.rstrip().endswith("rerun with --config configs/full.yaml")
    import torch

    from segevo.config import parse_config
    from segevo.model import SegVol

    torch.manual_seed(0)  # a checkpoint of a geometry no shipped profile has: the key listing, no profile named
    odd = SegVol(parse_config({"model": {**TINY, "encoder": {**TINY["encoder"], "hidden_size": 48}}}).model)
    torch.save({f"model.{k}": v for k, v in odd.state_dict().items()}, tmp_path / "pytorch_model.bin")
    out = segevo("weights", "check", str(tmp_path / "pytorch_model.bin"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "mis-shaped tensors" in out.stderr
    assert "rerun with" not in out.stderr


def test_weights_check_missing_file_is_one_line(tmp_path):
    out = segevo("weights", "check", str(tmp_path / "nope.bin"))
    assert out.returncode == 1
    assert out.stderr == f"segevo: error: {tmp_path / 'nope.bin'}: no such checkpoint file\n"


def test_weights_check_bad_config_key_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder:\n    hidden_sise: 8\n")
    out = segevo("--config", str(bad), "weights", "check", "x.bin")
    assert out.returncode == 1
    assert out.stderr.startswith(f"segevo: error: {bad}: model.encoder.hidden_sise: Extra inputs")


def test_weights_download_offline_fails_fast(tmp_path):
    out = segevo("weights", "download", "--dest", str(tmp_path / "w"), env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert out.returncode == 1
    assert "looks offline" in out.stderr and out.stderr.count("\n") == 1


def test_model_summary_writes_the_json(tmp_path):
    out = segevo("model", "summary", "--out", str(tmp_path / "model.json"))
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "model.json").read_text())
    from segevo import load_config
    from segevo.model import SegVol
    from segevo.model.adapted import AdaptedSegVol

    cfg = load_config(REPO / "params.yaml")
    model = SegVol(cfg.model)
    assert summary["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert summary["tokens"] == 8 * 8 * 8
    adapted = AdaptedSegVol(model, cfg.adapters, cfg.priors)
    lora = sum(p.numel() for n, p in adapted.named_parameters() if ".lora_" in n)
    priors = sum(p.numel() for p in adapted.priors.parameters())
    assert summary["trainable_per_expert"] == {"CT": 0, "MRI": lora} and summary["trainable_priors"] == priors
    assert summary["trainable_parameters"] == lora + priors
    assert "expert MRI: lora r8 alpha 16" in out.stdout


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from segevo_pipeline.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_before_or_after_the_verb_and_set_on_every_verb(capsys, tmp_path):
    before = _main(capsys, "--config", "params.yaml", "model", "summary")
    assert before[0] == 0
    assert _main(capsys, "model", "summary", "--config", "params.yaml") == before
    assert _main(capsys, "model", "--config", "params.yaml", "summary") == before
    code, out, _ = _main(capsys, "model", "summary", "--set", "priors.pool_size=2", "--set", "priors.dim=32")
    assert code == 0 and "pool 2, dim 32" in out
    code, out, _ = _main(capsys, "--set", "priors.pool_size=3", "model", "summary", "--set", "priors.pool_size=5")
    assert code == 0 and "pool 5," in out, "the verb's --set comes after the front door's"
    code, _, err = _main(capsys, "--config", "params.yaml", "model", "summary", "--config", "configs/full.yaml")
    assert code == 2 and err.count("\n") == 1 and "--config given twice" in err
    for bad, says in [("train.lrr=1", "--set train.lrr: not a config key; train has:"),
                      ("nope.x=1", "--set nope.x: not a config key: the config has no section 'nope'"),
                      ("train.epochs=0", "--set train.epochs: Input should be greater than 0"),
                      ("adapters.experts.MRI.rank=true", "--set adapters.experts.MRI.rank:"),
                      ("train.lr", "--set 'train.lr': expected KEY=VALUE")]:
        code, _, err = _main(capsys, "weights", "check", str(tmp_path / "x.bin"), "--set", bad)
        assert code == 1 and err.count("\n") == 1 and says in err, (bad, err)
