"""The two stage runners, ``segevo pseudomask`` and ``segevo preprocess``: which cases need work (fingerprints),
the jobs in the pool, and the index / manifest that describes the outputs. Every path handed to the workers is
absolute: they need not share this process's working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segevo.config import SegevoConfig
from segevo.data.cases import CaseError, read_case_table
from segevo.data.manifest import AXIS_ORDER, PrepCase, write_manifest
from segevo.data.preprocess.fingerprint import case_identity, code_fingerprint, digest
from segevo.data.preprocess.jobs import prep_job, pseudo_job, reuse_prep, reuse_pseudo
from segevo.data.preprocess.pool import StageReport, labelled, largest_first, prune, run_jobs
from segevo.data.resources import memory_bound_workers
from segevo.io import atomic_write_json

PSEUDO_INDEX = "index.json"
MANIFEST = "manifest.json"


def pseudo_dir(cfg: SegevoConfig) -> Path:
    """Absolute, like every path handed to the workers: they need not share this process's working directory."""
    return Path(cfg.data.root).resolve() / "pseudo"


def prep_dir(cfg: SegevoConfig) -> Path:
    return Path(cfg.data.root).resolve() / "prep"


def table_path(cfg: SegevoConfig) -> Path:
    return Path(cfg.data.root).resolve() / "raw" / "cases.json"


def pseudo_params(cfg: SegevoConfig) -> dict[str, Any]:
    return {"pseudomask": cfg.pseudomask.model_dump(mode="json"), "channel": cfg.preprocess.channel,
            "channels": cfg.preprocess.channels}


def run_pseudomask(cfg: SegevoConfig, workers: int | None = None, force: bool = False) -> StageReport:
    """Pseudo-masks for every labelled case of the case table -> ``<root>/pseudo/<source>/<case_id>.npy`` (int16
    on ``pseudomask.grid``) with a JSON sidecar each, and ``<root>/pseudo/index.json`` listing them."""
    base = table_path(cfg).parent
    table = read_case_table(table_path(cfg))
    cases, unlabelled = labelled(table.cases)
    root = pseudo_dir(cfg)
    params = pseudo_params(cfg)
    code = code_fingerprint("segevo.data.pseudomask", "segevo.data.preprocess", "segevo.data.readers",
                            "segevo.data.volumes")
    outputs: dict[str, Any] = {}
    jobs = []
    for case in largest_first(cases):
        out = root / case.source / f"{case.case_id}.npy"
        fp = digest({"code": code, "params": params, "case": case_identity(case, base)})
        done = None if force else reuse_pseudo(out, fp)
        if done is not None:
            outputs[case.key] = done
        else:
            meta = {"source": case.source, "case_id": case.case_id, "raw_sha256": case.image_sha256, **params}
            jobs.append((case.key, pseudo_job, (case, cfg.pseudomask, cfg.preprocess.channel_for(case.key), out,
                                                fp, meta)))
    index = root / PSEUDO_INDEX
    if jobs:
        index.unlink(missing_ok=True)  # never an index naming masks of two different runs
    n = workers or cfg.preprocess.workers or memory_bound_workers(job[2][0] for job in jobs)
    skipped = run_jobs(jobs, n, "pseudomask", cfg.data.skip_bad_cases, outputs.__setitem__)
    keep = {root / k.split("/", 1)[0] / f"{k.split('/', 1)[1]}{ext}" for k in outputs for ext in (".npy", ".json")}
    prune(root, keep | {index}, "*/*.*")
    entries = {k: {"path": f"{k}.npy", "fingerprint": v["fingerprint"], "grid": v["grid"], "ids": v.get("ids")}
               for k, v in sorted(outputs.items())}
    atomic_write_json(index, {"version": 1, "code": code, **params, "cases": entries, "skipped": skipped,
                        "unlabelled": unlabelled})
    return StageReport(outputs, len(jobs) - len(skipped), len(outputs) - (len(jobs) - len(skipped)), skipped,
                       unlabelled, index)


def read_pseudo_index(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: no pseudo-mask index; run 'segevo pseudomask' first") from None
    except json.JSONDecodeError as err:
        raise CaseError(f"{path}: not valid JSON ({err})") from None


def prep_params(cfg: SegevoConfig) -> dict[str, Any]:
    return {"roi_size": list(cfg.model.roi_size), "channel": cfg.preprocess.channel,
            "channels": cfg.preprocess.channels}


def run_preprocess(cfg: SegevoConfig, workers: int | None = None, force: bool = False) -> StageReport:
    """Model-ready arrays for every labelled case -> ``<root>/prep/<source>/<case_id>/*.npy`` and
    ``<root>/prep/manifest.json`` (rows: :class:`~segevo.data.manifest.PrepCase`)."""
    base = table_path(cfg).parent
    table = read_case_table(table_path(cfg))
    cases, unlabelled = labelled(table.cases)
    index = read_pseudo_index(pseudo_dir(cfg) / PSEUDO_INDEX)
    pseudo_skipped = {f"{s['source']}/{s['case_id']}" for s in index.get("skipped", [])}
    root = prep_dir(cfg)
    params = prep_params(cfg)
    code = code_fingerprint("segevo.data.preprocess", "segevo.data.readers", "segevo.data.manifest",
                            "segevo.data.summary", "segevo.data.volumes")
    outputs: dict[str, PrepCase] = {}
    jobs = []
    for case in largest_first(cases):
        entry = index["cases"].get(case.key)
        if entry is None and case.key not in pseudo_skipped:
            raise CaseError(f"{case.key}: no pseudo-mask in {pseudo_dir(cfg) / PSEUDO_INDEX}; "
                            f"run 'segevo pseudomask' again (the case table changed since)")
        folder = root / case.source / case.case_id
        fp = digest({"code": code, "params": params, "case": case_identity(case, base),
                      "pseudo": entry and entry["fingerprint"]})
        done = None if force else reuse_prep(folder, fp)
        if done is not None:
            outputs[case.key] = done
        else:
            pseudo_path = pseudo_dir(cfg) / entry["path"] if entry else None
            jobs.append((case.key, prep_job, (case, tuple(cfg.model.roi_size),
                                              cfg.preprocess.channel_for(case.key), pseudo_path, folder, fp)))
    manifest = root / MANIFEST
    if jobs:
        manifest.unlink(missing_ok=True)  # a manifest never describes arrays of two different runs
    n = workers or cfg.preprocess.workers or memory_bound_workers(job[2][0] for job in jobs)
    skipped = run_jobs(jobs, n, "preprocess", cfg.data.skip_bad_cases, outputs.__setitem__)
    prune(root, {root / k for k in outputs} | {manifest}, "*/*")
    meta = {"code": code, **params, "pseudomask": index.get("pseudomask"), "axis_order": list(AXIS_ORDER),
            "normalisation": "SegVol ForegroundNormalization + DimTranspose + MinMax + CropForeground(>0)",
            "skipped": skipped, "pseudo_skipped": index.get("skipped", []), "unlabelled": unlabelled}
    write_manifest(manifest, list(outputs.values()), meta)
    computed = len(jobs) - len(skipped)
    return StageReport(outputs, computed, len(outputs) - computed, skipped, unlabelled, manifest,
                       {k: list(v.notes) for k, v in outputs.items() if v.notes})
