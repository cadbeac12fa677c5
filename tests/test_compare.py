"""The comparison: variant overlays, the paired bootstrap (against hand-computed cases), and ``segevo evaluate
--variants`` on a synthetic prep cache with the tiny model, including the shared base rows."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from prep_helpers import write_prep

from segevo.comparison import compare, paired_difference
from segevo.config import apply_overlay, load_config, parse_config
from segevo.data.dataset import task_vocabulary
from segevo.model.adapter_io import save_adapters
from segevo.training import build_model
from segevo_pipeline.cli import main
from segevo_pipeline.compare import trains_nothing

REPO = Path(__file__).resolve().parents[1]
VARIANTS = REPO / "configs" / "variants"
SEGEVO = str(Path(sys.executable).parent / "segevo")
PROFILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


# ---- paired bootstrap ---------------------------------------------------------------------------------------------


def test_a_constant_difference_has_a_point_interval_however_hard_the_cases():
    reference = {"a": 0.05, "b": 0.9, "c": 0.4, "d": 0.7}
    variant = {k: v + 0.1 for k, v in reference.items()}
    d = paired_difference(variant, reference, 2000, seed=0)
    # paired: every resample's mean difference is 0.1; an unpaired bootstrap would span about +-0.35
    assert d["diff"] == pytest.approx(0.1) and d["diff_lo"] == pytest.approx(0.1)
    assert d["diff_hi"] == pytest.approx(0.1)
    assert d["improved"] == 1.0 and d["worsened"] == 0.0 and d["cases"] == 4


def test_two_cases_by_hand():
    # differences 0 and 1: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # percentiles are 0 and 1; one case improved, none worse
    d = paired_difference({"x": 0.5, "y": 1.0}, {"x": 0.5, "y": 0.0}, 2000, seed=3)
    assert (d["diff"], d["diff_lo"], d["diff_hi"]) == (0.5, 0.0, 1.0)
    assert (d["improved"], d["worsened"]) == (0.5, 0.0)


def test_fractions_and_only_shared_cases():
    variant = {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.9, "only-variant": 1.0}
    reference = {"a": 0.3, "b": 0.5, "c": 0.3, "d": 0.6, "only-reference": 0.0}
    d = paired_difference(variant, reference, 500, seed=0)
    assert d["cases"] == 4 and d["diff"] == pytest.approx((0.2 - 0.1 + 0 + 0.3) / 4)
    assert (d["improved"], d["worsened"]) == (0.5, 0.25)
    assert paired_difference({"a": 1.0}, {"b": 1.0}, 100, 0) is None


def test_compare_groups_pairs_by_case_and_never_compares_a_variant_with_itself():
    rows = [{"case": c, "prompt": "text", "variant": v, "dice": dice, "nsd": None}
            for c, scores in {"c1": (0.2, 0.5, 0.6), "c2": (0.6, 0.7, 0.6)}.items()
            for v, dice in zip(("base", "lora", "moa"), scores, strict=True)]
    out = compare(rows, ["base", "lora"], ["prompt"], 200, 0)
    pairs = {(d["variant"], d["reference"]): d for d in out}
    assert set(pairs) == {("lora", "base"), ("moa", "base"), ("base", "lora"), ("moa", "lora")}
    assert pairs[("moa", "base")]["diff"] == pytest.approx(0.2) and pairs[("base", "lora")]["diff"] == -0.2
    assert all(d["metric"] == "dice" for d in out)  # no NSD values: no NSD rows


# ---- the variants -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_variant_validates_on_every_profile(profile):
    cfg = load_config(profile)
    assert sorted(p.stem for p in VARIANTS.glob("*.yaml")) == sorted(cfg.compare.variants)
    made = {name: apply_overlay(cfg, VARIANTS / f"{name}.yaml") for name in cfg.compare.variants}
    kinds = {n: (c.adapters.enabled and c.adapters.experts["CT"].kind, c.priors.enabled) for n, c in made.items()}
    assert kinds == {"base": (False, False), "lora": ("lora", False), "moa": ("identity", False),
                     "moa+priors": ("identity", True), "lora+priors": ("lora", True)}
    assert [n for n, c in made.items() if trains_nothing(c)] == ["base"]
    assert made["moa+priors"].priors.apply_to_identity is False


def test_dvc_trains_every_variant_that_trains_something():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    trained = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][1]["trained_variants"]
    cfg = load_config(REPO / "params.yaml")
    assert trained == [v for v in cfg.compare.variants
                       if not trains_nothing(apply_overlay(cfg, VARIANTS / f"{v}.yaml"))]
    assert stages["stages"]["train_variant"]["foreach"] == "${trained_variants}"
    assert "--variants" in stages["stages"]["compare"]["cmd"]


def test_overlay_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("priors.nope: 1\n")
    with pytest.raises(Exception, match=r"bad.yaml priors.nope: not a config key"):
        apply_overlay(parse_config({}), bad)
    bad.write_text("- a list\n")
    with pytest.raises(Exception, match=r"bad.yaml: an overlay is a mapping"):
        apply_overlay(parse_config({}), bad)


# ---- segevo evaluate --variants -------------------------------------------------------------------------------------


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    cases = write_prep(tmp_path / "data")
    split = json.loads((tmp_path / "data" / "split.json").read_text())
    split["test"] = [cases[0].key, cases[2].key]  # one CT and one MRI case
    (tmp_path / "data" / "split.json").write_text(json.dumps(split))
    raw = {"model": TINY, "priors": {"dim": 16, "num_heads": 2}, "data": {"root": "data"},
           "train": {"allow_random_base": True}, "tracking": {"experiment": "compare-test"},
           "evaluate": {"bootstrap": 200, "prompts": ["text", "box", "text+point"]},
           "compare": {"overlays": str(VARIANTS)}}
    cfg = parse_config(raw)
    for i, name in enumerate(("lora", "moa", "moa+priors", "lora+priors")):
        model = build_model(apply_overlay(cfg, VARIANTS / f"{name}.yaml"), task_vocabulary(cases))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        save_adapters(model, tmp_path / "models" / "variants" / name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_variants_are_scored_on_the_same_queries_and_base_rows_are_shared(workspace):
    assert main(["evaluate", "--variants"]) == 0
    rows = _rows(workspace / "metrics" / "compare_cases.csv")
    names = ("base", "lora", "moa", "moa+priors", "lora+priors")
    queries = {v: sorted((r["case"], r["class"], r["prompt"]) for r in rows if r["variant"] == v) for v in names}
    assert all(q == queries["base"] for q in queries.values()) and len(queries["base"]) == 4 * 3
    shared = {(r["variant"], r["modality"]) for r in rows if r["reused_from"]}
    assert shared == {("moa", "CT"), ("moa+priors", "CT")}  # identity expert, no priors: the base's rows
    mri = {v: [r["dice"] for r in rows if r["variant"] == v and r["modality"] == "MRI"] for v in names}
    assert mri["moa"] != mri["base"] and mri["lora"] != mri["base"]
    metrics = json.loads((workspace / "metrics" / "compare.json").read_text())
    assert metrics["reused"] == 2 * 2 * 3 and metrics["computed"] == 5 * 12 - 12
    assert "moa+priors-base/MRI" in metrics["dice_diff"] and "lora-base/CT" in metrics["dice_diff"]
    report = workspace / "reports" / "compare"
    text = (report / "report.md").read_text()
    assert "## Paired differences" in text and "| moa+priors | base | MRI |" in text
    assert "Demo scale" not in text or "random base" in text
    assert (report / "differences.png").stat().st_size > 1000
    assert (report / "priors-moa+priors" / "priors_similarity.png").is_file()
    diffs = _rows(workspace / "metrics" / "compare_diffs.csv")
    assert {d["reference"] for d in diffs} == {"base", "lora"}


def test_shared_rows_equal_the_rows_computed_alone(workspace):
    """The sharing is sound: the moa model's CT rows, computed on their own, are the base's rows."""
    assert main(["evaluate", "--variants", "base", "moa"]) == 0
    together = {(r["case"], r["class"], r["prompt"]): r for r in _rows(workspace / "metrics" / "compare_cases.csv")
                if r["variant"] == "moa" and r["modality"] == "CT"}
    assert all(r["reused_from"] == "base" for r in together.values())
    assert main(["evaluate", "--variants", "moa", "--run-id", "alone"]) == 0
    alone = {(r["case"], r["class"], r["prompt"]): r for r in _rows(workspace / "metrics" / "compare_cases.csv")
             if r["modality"] == "CT"}
    assert not any(r["reused_from"] for r in alone.values())
    assert {k: (r["dice"], r["nsd"], r["predicted_voxels"]) for k, r in together.items()} == \
        {k: (r["dice"], r["nsd"], r["predicted_voxels"]) for k, r in alone.items()}


def test_a_missing_variant_is_one_line_naming_it(workspace, capsys):
    assert main(["evaluate", "--variants", "base", "nope"]) == 1
    assert "--variant nope: no overlay" in capsys.readouterr().err
    shutil.rmtree(workspace / "models" / "variants" / "moa")
    assert main(["evaluate", "--variants", "base", "moa"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models/variants/moa: no adapter for variant moa" in err
    assert not (workspace / "metrics" / "compare.json").exists()


# ---- the README's commands, as written ------------------------------------------------------------------------------


def _readme_commands(prefix: str) -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("## The comparison", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#")[0].strip() for line in section.split("```bash", 1)[1].split("```", 1)[0].splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(prefix)]


def test_readme_evaluate_commands(workspace):
    shutil.copytree(workspace / "models" / "variants" / "moa", workspace / "models" / "adapter")
    commands = _readme_commands("segevo evaluate")
    assert len(commands) == 2
    for argv in commands:
        out = subprocess.run([SEGEVO, *argv[1:]], cwd=workspace, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(workspace / "metrics" / "compare_cases.csv")
    assert {r["variant"] for r in rows} == {"base", "mine"}
    assert {r["reused_from"] for r in rows if r["variant"] == "mine" and r["modality"] == "CT"} == {"base"}


@pytest.mark.slow
def test_readme_variant_training_command(workspace):
    """The README's variant training line, run as written on a tiny profile: the overlay reaches the Ray workers
    (the exported adapter has a CT LoRA expert and no priors) and the outputs land where the --set puts them."""
    (argv,) = _readme_commands("segevo --variant")
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["loader"] = {"samples_per_epoch": 2}
    raw["train"].update({"epochs": 1, "batch_size": 1, "num_workers": 1, "val_samples": 1,
                         "storage_path": str(workspace / "runs"), "loader_workers": 0})
    raw["tracking"]["tracking_uri"] = f"sqlite:///{workspace / 'mlflow.db'}"
    raw["tracking"]["system_metrics"] = False
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.rmtree(workspace / "models" / "variants" / "lora")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    out = subprocess.run([SEGEVO, *argv[1:]], cwd=workspace, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    meta = json.loads((workspace / "models" / "variants" / "lora" / "adapters.json").read_text())
    assert meta["adapters"]["experts"]["CT"]["kind"] == "lora" and meta["priors"]["enabled"] is False
    summary = json.loads((workspace / "metrics" / "variants" / "lora" / "train.json").read_text())
    assert summary["run_id"].startswith("lora-")


def test_a_second_run_in_one_process_logs_to_its_own_store(workspace, tmp_path_factory, monkeypatch):
    """MLflow copies the URI a run sets into MLFLOW_TRACKING_URI; the next verb in the same process (another
    workspace) must still log to its own store, not to the first one's."""
    assert main(["evaluate", "--variants", "base", "--run-id", "first"]) == 0
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(workspace, other, dirs_exist_ok=True)
    (other / "mlflow.db").unlink()
    monkeypatch.chdir(other)
    assert main(["evaluate", "--variants", "base", "--run-id", "second"]) == 0
    import mlflow

    for folder, name in ((workspace, "first"), (other, "second")):
        client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("compare-test").experiment_id])
        assert [r.info.run_name for r in runs] == [name]
