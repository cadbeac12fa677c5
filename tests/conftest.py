"""Shared fixtures: tiny configs for fast CPU tests, the reference folder, full-size synthetic checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from segevo.config import ModelConfig, parse_config

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run and machine: a CI failure is reproducible, never a dice roll.
settings.register_profile("segevo", derandomize=True)
settings.load_profile("segevo")

TINY = {
    "roi_size": [8, 32, 32],
    "patch_size": [4, 16, 16],
    "encoder": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 4},
    "prompt": {"mask_in_chans": 8},
    "decoder": {"depth": 2, "num_heads": 2, "mlp_dim": 64, "iou_head_hidden_dim": 16},
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
}


def reference_dir() -> Path:
    """``$SEGEVO_REFERENCE`` or ``../shared/reference`` next to the checkout (where CI puts it)."""
    return Path(os.environ.get("SEGEVO_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> Path:
    ref = reference_dir()
    if not (ref / "segvol-keys").is_dir():
        pytest.skip(f"reference folder not found at {ref} (set SEGEVO_REFERENCE)")
    return ref


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return parse_config({"model": TINY}).model


@pytest.fixture(scope="session")
def key_table(reference: Path):
    def load(name: str) -> dict:
        return json.loads((reference / "segvol-keys" / f"{name}_keys.json").read_text())

    return load


@pytest.fixture(scope="session")
def parity_checkpoint(reference: Path, tmp_path_factory) -> Path:
    """SegVol's parity checkpoint, written by the reference script (seeded, HF layout, full size)."""
    out = tmp_path_factory.mktemp("parity") / "pytorch_model.bin"
    subprocess.run(
        [sys.executable, str(reference / "parity" / "make_synthetic_checkpoint.py"),
         str(reference / "segvol-keys" / "segvol_hf_keys.json"), str(out)],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def full_model():
    """One full-size SegVol for the whole session (180.9M parameters, ~0.7 GB)."""
    from segevo.model import SegVol

    torch.manual_seed(0)
    return SegVol(ModelConfig()).eval()
