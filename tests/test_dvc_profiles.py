"""DVC runs the profile ``profile.yaml`` names: stage commands pass it to ``segevo --config``, and each stage's
params are read from it, so ``dvc exp run -S profile.yaml:profile=configs/full.yaml`` and
``dvc exp run -S configs/full.yaml:train.lr=...`` reach the full profile, and dvc.lock records its values.

Checked on a scratch DVC project holding this repo's dvc.yaml, profiles and code, every output recorded as it
stands (``dvc commit``): the full profile's params are what the lock holds, and a change to one of its keys
makes exactly the stages that read that key out of date.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def _dvc(project: Path, *args: str) -> str:
    out = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, timeout=300,
                         env={"DVC_NO_ANALYTICS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _project(tmp: Path) -> Path:
    project = tmp / "project"
    project.mkdir()
    for name in ("dvc.yaml", "profile.yaml", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    for folder in ("configs", "segevo", "pipeline", "segevo_pipeline"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q")
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    for stage in dvc["stages"].values():
        items = VARS[stage["foreach"].strip("${}")] if "foreach" in stage else [None]
        for item, kind in ((i, k) for i in items for k in ("outs", "metrics", "plots", "deps")):
            for entry in stage.get("do", stage).get(kind, []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                path = project / (name.replace("${item}", item) if item is not None else name)
                if path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x")
    return project


VARS = {k: v for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"] if isinstance(entry, dict)
          for k, v in entry.items()}


def test_stages_read_the_profile_that_profile_yaml_names(tmp_path):
    project = _project(tmp_path)
    (project / "profile.yaml").write_text("profile: configs/full.yaml\n")  # what `dvc exp run -S` writes
    _dvc(project, "commit", "-f", "-q")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock["train"]["params"]) == {"configs/full.yaml"}
    assert lock["train"]["cmd"] == "segevo --config configs/full.yaml train"
    status = json.loads(_dvc(project, "status", "--json"))
    assert status == {}, status

    text = (project / "configs" / "full.yaml").read_text()  # a user's edit of one key
    assert text.count("\n  lr: 0.0001\n") == 1
    (project / "configs" / "full.yaml").write_text(text.replace("\n  lr: 0.0001\n", "\n  lr: 0.00042\n"))
    status = json.loads(_dvc(project, "status", "--json"))
    # exactly the stages that read train.*: the run, the variants' runs and the comparison of the variants
    training = {"train", "compare", *(f"train_variant@{v}" for v in VARS["trained_variants"])}
    assert set(status) == training, status
    assert "configs/full.yaml" in json.dumps(status["train"])

    params = yaml.safe_load((project / "params.yaml").read_text())  # the demo profile is not read at all
    params["train"]["lr"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(json.loads(_dvc(project, "status", "--json"))) == training
