"""The project's DVC storage settings, exercised offline in a scratch repository: a data set is stored once
(workspace files are read-only links into the cache), the default remote is a local folder that push and pull
reach, and ``data/raw`` survives a rerun of the download stage (persist)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"dvc {' '.join(args)}: {out.stdout}{out.stderr}"
    return out.stdout


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    return tmp_path


def test_data_is_stored_once_and_round_trips_through_the_default_remote(scratch: Path):
    raw = scratch / "data" / "raw" / "src"
    raw.mkdir(parents=True)
    payload = os.urandom(1 << 20)
    (raw / "case.nii.gz").write_bytes(payload)
    dvc(scratch, "add", "-q", "data/raw")
    cached = [p for p in (scratch / ".dvc" / "cache").rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    assert len(cached) == 1
    work = raw / "case.nii.gz"
    assert work.is_symlink() or os.stat(work).st_ino == os.stat(cached[0]).st_ino, "one copy on disk, not two"
    assert work.stat().st_mode & 0o222 == 0, "linked files must be read-only: an edit would corrupt the cache"
    dvc(scratch, "push", "-q")
    remote = scratch / ".cache" / "segevo" / "dvc-storage"
    assert any(p.is_file() for p in remote.rglob("*")), "push reached the default local remote"
    shutil.rmtree(scratch / ".dvc" / "cache")
    shutil.rmtree(scratch / "data" / "raw")
    dvc(scratch, "pull", "-q")
    assert (raw / "case.nii.gz").read_bytes() == payload


def test_project_settings():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    raw = stages["download"]["outs"][0]
    assert raw == {"data/raw": {"persist": True}}, "a code edit must not wipe hundreds of GB of raw data"
    listing = dvc(REPO, "config", "--list", "--project")
    assert "cache.type=hardlink,symlink" in listing
    assert "core.remote=storage" in listing
