"""``segevo evaluate --variants``: several models on the same cases with the same seeded prompts, and the paired
difference of each against the references (``compare.references``, default ``base`` and ``lora``).

A variant is a name (its overlay in ``compare.overlays``; its adapter in ``compare.models/<name>``, or the plain
base when the overlay trains nothing) or ``NAME=PATH`` (any adapter folder; ``none`` for the plain base). Each
volume is read once for all models; rows that provably compute the base SegVol (identity expert, no priors, same
base weights) are computed once and shared. The box-jitter ablation stays with the single-model evaluation.

Writes ``metrics/compare.json`` (DVC metrics), ``metrics/compare_cases.csv``, ``metrics/compare_diffs.csv`` (DVC
plots) and the report folder ``compare.report``; logged to the MLflow run ``compare`` (or ``--run-id``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segevo.combinations import headline
from segevo.config import SegevoConfig, apply_overlay
from segevo.errors import UserError
from segevo_pipeline.common import config_from_args, csv_bytes, evaluation_cases, preflight, torch_device, variant_file

METRICS = Path("metrics")
FILES = ("compare.json", "compare_cases.csv", "compare_diffs.csv")
DIFF_FIELDS = ["prompt", "modality", "source", "class", "variant", "reference", "metric", "cases", "diff",
               "diff_lo", "diff_hi", "improved", "worsened"]


@dataclass(frozen=True)
class Entrant:
    """One model of the comparison: its name, its adapter folder (None: the plain base) and what it is."""

    name: str
    adapter: str | None
    about: str


def trains_nothing(cfg: SegevoConfig) -> bool:
    """A configuration with nothing to fine-tune (no priors, every expert the identity) is the base SegVol."""
    experts = cfg.adapters.experts.values() if cfg.adapters.enabled else ()
    return not cfg.priors.enabled and all(e.kind == "identity" for e in experts)


def entrants(cfg: SegevoConfig, specs: list[str]) -> list[Entrant]:
    """The models ``--variants`` names (default: ``compare.variants``), each checked to exist before any work."""
    out = []
    for spec in specs or list(cfg.compare.variants):
        name, sep, path = spec.partition("=")
        if sep:
            out.append(Entrant(name, None if path == "none" else path, f"adapter {path}"))
            continue
        overlay = variant_file(cfg, name)
        about = _first_comment(overlay)
        trained = None if trains_nothing(apply_overlay(cfg, overlay)) else str(Path(cfg.compare.models) / name)
        out.append(Entrant(name, trained, about))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise UserError(f"--variants names a model twice: {' '.join(names)}")
    for e in out:
        if e.adapter is not None and not Path(e.adapter).is_dir():
            raise UserError(f"{e.adapter}: no adapter for variant {e.name} (train it: 'dvc repro train_variant@"
                            f"{e.name}', or 'segevo --variant {e.name} train --set train.output={e.adapter}')")
    return out


def _first_comment(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.stat().st_size else ""
    return first.lstrip("# ").strip() if first.startswith("#") else path.stem


def base_key(model: Any) -> str | None:
    """A string equal for two models exactly when their base SegVol is provably the same: the same config and the
    same checkpoint file (path, size, modification time) or the same seeded random init; None if unknown."""
    origin = model.base_origin
    if origin.get("weights"):
        st = os.stat(origin["weights"])
        source = f"file:{os.path.realpath(origin['weights'])}:{st.st_size}:{st.st_mtime_ns}"
    elif origin.get("seed") is not None:
        source = f"seed:{origin['seed']}"
    else:
        return None
    return json.dumps([source, model.base.cfg.model_dump(mode="json")], sort_keys=True)


def load_entrant(cfg: SegevoConfig, entrant: Entrant, weights: str | None) -> Any:
    """The adapted model, or the plain base: from ``weights``, else the seeded random base the demo trains on."""
    from segevo.inference import load_for_inference

    if entrant.adapter is None and weights is None and not cfg.train.allow_random_base:
        raise UserError(f"variant {entrant.name} is the plain base: give its weights (--weights or "
                        "train.base_weights), or train.allow_random_base: true for the seeded random base")
    return load_for_inference(cfg.model, entrant.adapter, weights, seed=cfg.loader.seed)


def run_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segevo.data.manifest import read_prep_array
    from segevo.evaluation import evaluate_case_models
    from segevo.inference import Predictor

    cfg, _ = config_from_args(args)
    e = cfg.evaluate.model_copy(update={"box_jitter": (0,)})
    split_name = args.split or e.split
    prep, cases = evaluation_cases(cfg, split_name, args.max_cases or e.max_cases)
    models = entrants(cfg, args.variants)
    weights = args.weights or cfg.train.base_weights
    data = Path(cfg.data.root)
    preflight(args, inputs=[*((f"variant {m.name}", m.adapter) for m in models), ("--weights", weights),
                            ("manifest", data / "prep" / "manifest.json"), ("split", data / "split.json")],
              outputs=[("metrics file", METRICS / name) for name in FILES],
              folders=[("metrics folder", METRICS)], replaced=[("compare.report", cfg.compare.report)])
    device = torch_device(args.device)
    loaded = {m.name: load_entrant(cfg, m, weights) for m in models}
    keys = {name: base_key(model) for name, model in loaded.items()}
    if len({k for k in keys.values()}) > 1:
        raise UserError("the variants were not trained on one base SegVol: "
                        + "; ".join(f"{n}: {m.base_origin}" for n, m in loaded.items()))
    predictors = {name: Predictor(model, cfg.inference, device) for name, model in loaded.items()}
    rows: list[dict] = []
    start = time.perf_counter()
    for case in tqdm(cases, desc=f"compare {len(models)} models", unit="case", disable=None):
        image = read_prep_array(case, prep, "image").astype(np.float32)
        label = read_prep_array(case, prep, "label")
        rows.extend(evaluate_case_models(predictors, case, image, label, e, keys))
    if not rows:
        raise UserError(f"no (case, class) to evaluate in the {split_name!r} split: check evaluate.classes")
    seconds = time.perf_counter() - start
    random_base = any(m.base_origin.get("seed") is not None for m in loaded.values())
    summary = summarise_variants(rows, models, cfg, split_name, seconds, str(device), random_base)
    write_outputs(rows, summary)
    from segevo_pipeline.compare_report import write_compare_report

    report = write_compare_report(Path(cfg.compare.report), summary, loaded, cfg)
    _log_to_mlflow(cfg, args.run_id or "compare", summary, report)
    print(f"compared {len(models)} models on {summary['cases']} cases ({summary['computed']} queries run, "
          f"{summary['reused']} shared) in {seconds:.1f} s; report {report / 'report.md'}")
    return 0


def summarise_variants(rows: list[dict], models: list[Entrant], cfg: SegevoConfig, split_name: str,
                       seconds: float, device: str, random_base: bool) -> dict:
    from segevo.comparison import compare
    from segevo.evaluation import summarise
    from segevo.metrics import EMPTY_RULE

    c, e = cfg.compare, cfg.evaluate
    prompts = {r["prompt"] for r in rows}
    head = headline(prompts)
    refs = [r for r in c.references if r in {m.name for m in models}]

    def table(keys: list[str]) -> list[dict]:
        return summarise(rows, ["variant", *keys], e.bootstrap, e.seed)

    def diffs(keys: list[str]) -> list[dict]:
        return compare(rows, refs, keys, e.bootstrap, e.seed)

    return {
        "split": split_name, "headline_prompt": head, "references": refs, "dice_rule": EMPTY_RULE,
        "variants": {m.name: {"adapter": m.adapter, "about": m.about} for m in models},
        "cases": len({r["case"] for r in rows}), "samples": len(rows) // max(len(models), 1),
        "computed": sum(r["reused_from"] is None for r in rows), "reused": sum(r["reused_from"] is not None
                                                                                  for r in rows),
        "seconds": round(seconds, 1), "device": device, "bootstrap": {"n_resamples": e.bootstrap, "seed": e.seed},
        "random_base": random_base, "evaluate_split_is_train": split_name == "train",
        "per_variant": table(["prompt", "modality"]),
        "per_class": table(["prompt", "modality", "source", "class"]),
        "differences": diffs(["prompt", "modality"]),
        "differences_per_class": diffs(["prompt", "modality", "source", "class"]),
    }


def write_outputs(rows: list[dict], summary: dict) -> None:
    from segevo.io import atomic_write_bytes, atomic_write_json

    METRICS.mkdir(exist_ok=True)
    atomic_write_bytes(METRICS / "compare_cases.csv", csv_bytes(rows, list(rows[0])))
    diffs = [{"source": "", "class": "", **d} for d in summary["differences"]] + summary["differences_per_class"]
    atomic_write_bytes(METRICS / "compare_diffs.csv", csv_bytes(diffs, DIFF_FIELDS))
    head = summary["headline_prompt"]
    metrics = {k: v for k, v in summary.items() if k not in ("per_class", "differences_per_class",
                                                              "per_variant", "differences")}
    metrics["dice"] = {f"{r['variant']}/{r['modality']}": r["dice"] for r in summary["per_variant"]
                       if r["prompt"] == head}
    metrics["dice_diff"] = {f"{d['variant']}-{d['reference']}/{d['modality']}": d["diff"]
                            for d in summary["differences"] if d["prompt"] == head and d["metric"] == "dice"}
    atomic_write_json(METRICS / "compare.json", metrics)


def _log_to_mlflow(cfg: SegevoConfig, run_name: str, summary: dict, report: Path) -> None:
    from segevo_pipeline.tracking import Tracker, resolve_uri

    tracker = Tracker(resolve_uri(cfg.tracking.tracking_uri, Path.cwd()), cfg.tracking.experiment, run_name)
    values: dict[str, float] = {}
    for r in summary["per_variant"]:
        values[f"compare/{r['variant']}/{r['modality']}/{r['prompt']}/dice"] = r["dice"]
    for d in summary["differences"]:
        values[f"compare/{d['variant']}-{d['reference']}/{d['modality']}/{d['prompt']}/{d['metric']}"] = d["diff"]
    tracker.log_metrics(values, step=0)
    tracker.log_artifacts(report, "compare")
    tracker.log_artifacts(METRICS / "compare.json", "compare")
    tracker.close()
