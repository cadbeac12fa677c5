"""``segevo evaluate`` on a synthetic prep cache with the tiny model: every output is written, numbers are
bounded and seeded, the report and overlays exist, and missing inputs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY
from prep_helpers import write_prep

from segevo.config import parse_config
from segevo.data.dataset import task_vocabulary
from segevo.model.adapter_io import save_adapters
from segevo.training import build_model
from segevo_pipeline.cli import main


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    cases = write_prep(tmp_path / "data")
    split = json.loads((tmp_path / "data" / "split.json").read_text())
    split["test"] = [cases[0].key, cases[2].key]
    (tmp_path / "data" / "split.json").write_text(json.dumps(split))
    raw = {"model": TINY, "priors": {"dim": 16, "num_heads": 2}, "data": {"root": "data"},
           "train": {"output": "models/adapter"}, "tracking": {"experiment": "eval-test"},
           "evaluate": {"bootstrap": 200, "box_jitter": [0, 5], "overlays": 1, "report": "reports/eval"}}
    cfg = parse_config(raw)
    model = build_model(cfg, task_vocabulary(cases))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapters(model, tmp_path / "models" / "adapter")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_evaluate_writes_metrics_tables_and_report(workspace):
    assert main(["evaluate", "--run-id", "train-run"]) == 0
    metrics = json.loads((workspace / "metrics" / "eval.json").read_text())
    assert metrics["split"] == "test" and metrics["cases"] == 2
    assert set(metrics["prompt"]) == {"text", "box", "point", "text+box", "text+point", "box+point"}
    assert set(metrics["box_jitter"]) == {"0", "5"}
    assert {k.split("/")[0] for k in metrics["modality"]} == {"CT", "MRI"}
    for entry in [*metrics["prompt"].values(), *metrics["modality"].values()]:
        assert 0 <= entry["dice_lo"] <= entry["dice"] <= entry["dice_hi"] <= 1
        assert 0 <= entry["nsd"] <= 1
    # 2 classes in the CT case and 2 in the MRI case, 6 prompts each
    assert metrics["samples"] == 4 * 6
    rows = (workspace / "metrics" / "eval_per_class.csv").read_text().splitlines()
    assert rows[0].startswith("prompt,modality,source,class") and len(rows) == 1 + 4 * 6
    cases = (workspace / "metrics" / "eval_cases.csv").read_text().splitlines()
    assert len(cases) == 1 + 4 * 7  # plus the ±5 jitter sample per class
    report = workspace / "reports" / "eval"
    text = (report / "report.md").read_text()
    assert "Dice rule" in text and "Beside the prototype" in text
    for png in ("per_class.png", "prompts.png", "box_jitter.png", "priors_pca.png", "priors_similarity.png"):
        assert (report / png).stat().st_size > 1000
    assert len(list((report / "overlays").glob("*.png"))) == 1
    import mlflow  # logged to the training run it names

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["eval-test"], output_format="list")
    assert run.info.run_name == "train-run" and "eval/dice" in run.data.metrics
    assert "eval/report.md" in [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")]


def test_evaluate_is_deterministic(workspace):
    assert main(["evaluate"]) == 0
    first = json.loads((workspace / "metrics" / "eval.json").read_text())
    assert main(["evaluate"]) == 0
    second = json.loads((workspace / "metrics" / "eval.json").read_text())
    for key in ("prompt", "modality", "box_jitter", "dataset"):
        assert first[key] == second[key]


def test_evaluate_errors_name_the_problem(workspace, capsys):
    assert main(["evaluate", "--split", "val", "--adapter", "missing"]) == 1
    assert "missing: no adapter checkpoint" in capsys.readouterr().err
    split = json.loads((workspace / "data" / "split.json").read_text())
    split["test"] = []
    (workspace / "data" / "split.json").write_text(json.dumps(split))
    assert main(["evaluate"]) == 1
    assert "'test' split is empty" in capsys.readouterr().err
    assert not (workspace / "metrics" / "eval.json").exists()
