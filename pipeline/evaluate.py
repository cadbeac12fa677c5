"""``segevo evaluate``: zoom-out-zoom-in on the held-out split with every prompt type and the box-jitter ablation;
Dice and NSD per case, class, data set, modality and prompt, with bootstrap 95% confidence intervals over cases.

Writes ``metrics/eval.json`` (DVC metrics), ``metrics/eval_per_class.csv`` and ``metrics/eval_cases.csv``,
``metrics/eval_classes.csv`` (DVC plots), and the report folder (``evaluate.report``): a markdown report beside
the prototype's published rows, PNG plots that open offline, overlays of a few cases and the prior analysis.
Everything is also logged to the training run in MLflow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from segevo.combinations import headline
from segevo.errors import UserError
from segevo_pipeline.common import config_from_args, csv_bytes, evaluation_cases, preflight, torch_device
from segevo_pipeline.flags import device, int_at_least, run_name

METRICS = Path("metrics")
EVAL_FILES = ("eval.json", "eval_per_class.csv", "eval_cases.csv", "eval_classes.csv")


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--adapter", help="adapter checkpoint folder (default: train.output); 'none' for plain SegVol")
    p.add_argument("--weights", help="base SegVol checkpoint (default: train.base_weights, else the adapter's)")
    p.add_argument("--split", choices=("test", "val", "train"), help="default: evaluate.split")
    p.add_argument("--max-cases", type=int_at_least(1), help="evaluate at most this many cases")
    p.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--run-id", type=run_name,
                   help="MLflow run to log to (default: the training run in metrics/train.json; 'compare' for "
                        "--variants)")
    p.add_argument("--variants", nargs="*", metavar="NAME[=PATH]",
                   help="compare several models on the same cases and prompts (default list: compare.variants): a "
                        "variant name, or NAME=ADAPTER_FOLDER ('none' for the plain base); writes compare.report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segevo.data.manifest import read_prep_array
    from segevo.evaluation import Sample, evaluate_case
    from segevo.inference import Predictor

    if args.variants is not None:
        from segevo_pipeline.compare import run_compare

        return run_compare(args)
    cfg, _ = config_from_args(args)
    e = cfg.evaluate
    split_name = args.split or e.split
    prep, cases = evaluation_cases(cfg, split_name, args.max_cases or e.max_cases)
    adapter = None if args.adapter == "none" else (args.adapter or cfg.train.output)
    if adapter is None and not (args.weights or cfg.train.base_weights):
        raise UserError("--adapter none evaluates plain SegVol: give its weights (--weights or train.base_weights)")
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"{adapter}: no adapter checkpoint (run 'segevo train', or pass --adapter none)")
    weights = args.weights or cfg.train.base_weights
    data = Path(cfg.data.root)
    preflight(args, inputs=[("--adapter", adapter), ("--weights", weights),
                            ("manifest", data / "prep" / "manifest.json"), ("split", data / "split.json")],
              outputs=[("metrics file", METRICS / name) for name in EVAL_FILES],
              folders=[("metrics folder", METRICS)], replaced=[("evaluate.report", e.report)])
    device = torch_device(args.device)
    run_id = args.run_id or _training_run_id()
    predictor = Predictor.load(cfg.model, cfg.inference, adapter, weights, device=device)
    overlay_prompt = headline(e.prompts)
    rows: list[dict] = []
    overlays: list[dict] = []
    start = time.perf_counter()
    for i, case in enumerate(tqdm(cases, desc="evaluate", unit="case", disable=None)):
        image = read_prep_array(case, prep, "image").astype(np.float32)
        label = read_prep_array(case, prep, "label")
        want = i < e.overlays

        def keep(s: Sample, want: bool = want) -> bool:
            return want and s.prompt == overlay_prompt and not s.jitter

        case_rows, kept = evaluate_case(predictor, case, image, label, e, keep)
        rows.extend(case_rows)
        if kept:
            overlays.append(_overlay_case(case, image, label, kept))
    if not rows:
        raise UserError(f"no (case, class) to evaluate in the {split_name!r} split: check evaluate.classes")
    seconds = time.perf_counter() - start
    summary = summarise_all(rows, cfg, split_name, adapter, seconds, device)
    write_outputs(rows, summary)
    from segevo_pipeline.report import write_report

    report = write_report(Path(e.report), rows, summary, overlays, predictor.model, cfg)
    _log_to_mlflow(cfg, run_id, summary, report)
    head = summary["headline"]
    print(f"evaluated {summary['cases']} cases, {summary['samples']} samples in {seconds:.1f} s; "
          f"{head['prompt']} Dice {head['dice']:.3f} [{head['dice_lo']:.3f}, {head['dice_hi']:.3f}], "
          f"NSD {head['nsd']:.3f}; report {report / 'report.md'}")
    return 0


def _overlay_case(case, image: np.ndarray, label: np.ndarray, kept: dict) -> dict:
    """The slice through the most of each kept class, as small arrays (the volumes are not kept)."""
    panels = []
    for sample, pred in kept.items():
        truth = label == case.classes.index(sample.structure) + 1
        z = int(np.argmax(truth.sum(axis=(1, 2))))
        panels.append({"class": sample.structure, "prompt": sample.prompt, "image": image[z],
                       "truth": truth[z], "pred": pred[z], "slice": z})
    panels.sort(key=lambda p: -int(p["truth"].sum()))
    return {"case": case.key, "modality": case.modality, "panels": panels[:3]}


def summarise_all(rows: list[dict], cfg, split_name: str, adapter: str | None, seconds: float, device) -> dict:
    from segevo.evaluation import summarise
    from segevo.metrics import EMPTY_RULE

    e = cfg.evaluate
    plain = [r for r in rows if not r["jitter"]]
    boot = {"n_resamples": e.bootstrap, "seed": e.seed}

    def table(keys: list[str], subset: list[dict] | None = None) -> list[dict]:
        return summarise(subset if subset is not None else plain, keys, e.bootstrap, e.seed)

    prompts = {r["prompt"]: r for r in table(["prompt"])}
    head_prompt = headline(prompts)
    jitter_rows = [r for r in rows if r["prompt"] == "text+box"]
    return {
        "split": split_name, "adapter": adapter, "cases": len({r["case"] for r in rows}), "samples": len(plain),
        "classes": len({(r["source"], r["class"]) for r in rows}), "seconds": round(seconds, 1),
        "seconds_per_sample": round(seconds / max(len(rows), 1), 3), "device": str(device),
        "dice_rule": EMPTY_RULE, "nsd_tolerance_mm": e.nsd_tolerance_mm, "bootstrap": boot,
        "headline": prompts[head_prompt],
        "prompt": prompts,
        "modality": {f"{r['modality']}/{r['prompt']}": r for r in table(["modality", "prompt"])},
        "dataset": {f"{r['source']}/{r['prompt']}": r for r in table(["source", "prompt"])},
        "box_jitter": {str(r["jitter"]): r for r in table(["jitter"], jitter_rows)} if jitter_rows else {},
        "per_class": table(["prompt", "modality", "source", "class"]),
    }


def write_outputs(rows: list[dict], summary: dict) -> None:
    from segevo.io import atomic_write_bytes, atomic_write_json

    METRICS.mkdir(exist_ok=True)
    per_class = summary["per_class"]
    class_fields = ["prompt", "modality", "source", "class", "cases", "samples", "dice", "dice_lo", "dice_hi",
                    "nsd", "nsd_lo", "nsd_hi"]
    atomic_write_bytes(METRICS / "eval_per_class.csv", csv_bytes(per_class, class_fields))
    atomic_write_bytes(METRICS / "eval_cases.csv", csv_bytes(rows, list(rows[0])))
    head = summary["headline"]["prompt"]
    bars = [{"structure": f"{r['modality']} {r['class']} ({r['source']})", "dice": r["dice"]}
            for r in per_class if r["prompt"] == head]
    atomic_write_bytes(METRICS / "eval_classes.csv", csv_bytes(bars, ["structure", "dice"]))
    metrics = {k: v for k, v in summary.items() if k != "per_class"}
    atomic_write_json(METRICS / "eval.json", metrics)


def _training_run_id() -> str | None:
    """The MLflow run of the last training (``metrics/train.json``), read before the work so a malformed file
    is a one-line error naming it, not a traceback after the evaluation."""
    from segevo.io import read_json

    train = METRICS / "train.json"
    if not train.exists():
        return None
    run_id = read_json(train, "training summary").get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise UserError(f"{train}: 'run_id' must be a string, got {type(run_id).__name__}")
    return run_id


def _log_to_mlflow(cfg, run_id: str | None, summary: dict, report: Path) -> None:
    from segevo_pipeline.tracking import Tracker, resolve_uri

    if run_id is None:
        print("no training run to log to (no metrics/train.json and no --run-id): MLflow logging skipped")
        return
    tracker = Tracker(resolve_uri(cfg.tracking.tracking_uri, Path.cwd()), cfg.tracking.experiment, run_id)
    values: dict[str, Any] = {}
    for group in ("prompt", "modality", "dataset"):
        for name, entry in summary[group].items():
            values[f"eval/{group}/{name}/dice"] = entry["dice"]
            values[f"eval/{group}/{name}/nsd"] = entry["nsd"]
    for jitter, entry in summary["box_jitter"].items():
        values[f"eval/box_jitter/{jitter}/dice"] = entry["dice"]
    values["eval/dice"] = summary["headline"]["dice"]
    tracker.log_metrics(values, step=0)
    tracker.log_artifacts(report, "eval")
    tracker.log_artifacts(METRICS / "eval.json", "eval")
    tracker.log_artifacts(METRICS / "eval_per_class.csv", "eval")
    tracker.close()
