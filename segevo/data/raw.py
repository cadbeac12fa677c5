"""The download stage's logic: fetch each enabled source, check its cases, and write one case table.

A source that finished writes a marker (``<root>/raw/<source>/.segevo-source.json``) holding its case rows and
the options they depend on; a rerun with the same options skips it without touching the network. The case
table (``<root>/raw/cases.json``) is rebuilt from the markers, atomically, so it never lists a source that did
not finish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from segevo.config import DataConfig
from segevo.data.cases import Case, CaseError, CaseTable, write_case_table
from segevo.data.fetch import cache_dir
from segevo.data.formats import FormatError
from segevo.data.readers import validate
from segevo.data.resources import cores
from segevo.data.sources import get_source
from segevo.data.sources.base import Candidate, SourceContext
from segevo.data.vocabulary import LabelError, canonical
from segevo.io import atomic_write_json

MARKER = ".segevo-source.json"
TABLE = "cases.json"
log = logging.getLogger(__name__)


def _bad_case_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError

    return CaseError, LabelError, FormatError, ImageFileError, OSError, EOFError, zlib.error


@dataclass
class SourceResult:
    name: str
    cases: list[Case]
    skipped: list[dict[str, str]]
    meta: dict[str, Any]
    cached: bool  # True: an earlier run had finished it and nothing was fetched


def raw_dir(cfg: DataConfig) -> Path:
    return Path(cfg.root) / "raw"


def _fingerprint(name: str, cfg: DataConfig) -> dict[str, Any]:
    module = get_source(name)
    return {"source": name, "version": module.VERSION, "options": module.options(cfg),
            "skip_bad_cases": cfg.skip_bad_cases, "merge": cfg.merge.get(name, {})}


def merge_classes(case: Case, merge: dict[str, list[str]]) -> Case:
    """The case with the classes of each ``merge`` entry (target name -> names, in the unified vocabulary)
    renamed to its target: several label values then share one name, and preprocessing makes them one class."""
    rename = {canonical(old): canonical(new) for new, olds in merge.items() for old in olds}
    if not rename:
        return case
    label_map = {value: rename.get(name, name) for value, name in case.label_map.items()}
    return dataclasses.replace(case, label_map=label_map)


def _check_merge(name: str, merge: dict[str, list[str]], classes: set[str]) -> None:
    """A merge naming a class the source does not have is a typo, not a no-op."""
    for target, olds in merge.items():
        unknown = [old for old in olds if canonical(old) not in classes]
        if unknown:
            raise CaseError(f"data.merge.{name}.{target}: {unknown} are not classes of {name} "
                            f"(it has: {', '.join(sorted(classes))})")


def _load_marker(name: str, cfg: DataConfig) -> SourceResult | None:
    """The finished result of an earlier run with the same options."""
    raw = raw_dir(cfg)
    marker = raw / name / MARKER
    try:
        done = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if done.get("fingerprint") != _fingerprint(name, cfg):
        return None
    try:
        cases = [Case.from_row(row, raw) for row in done["cases"]]
        result = SourceResult(name, cases, done["skipped"], done["meta"], cached=True)
    except (KeyError, TypeError, ValueError):  # a marker from an older segevo: redo the source
        return None
    return result


def _files_present(result: SourceResult) -> bool:
    return all(c.image.is_file() and (c.label is None or c.label.is_file()) for c in result.cases)


def prepare_source(name: str, cfg: DataConfig, force: bool = False) -> SourceResult:
    """Fetch, unpack and check one source; ``force`` ignores earlier runs (archives are re-verified, not
    re-downloaded)."""
    module = get_source(name)
    if not force and (done := _load_marker(name, cfg)) is not None:
        if _files_present(done):
            return done
        log.warning("%s: files of the finished source are missing; unpacking it again", name)
        force = True
    raw = raw_dir(cfg)
    ctx = SourceContext(name=name, dest=raw / name, cache=cache_dir() / name, config=cfg, force=force)
    (ctx.dest / MARKER).unlink(missing_ok=True)
    module.fetch(ctx)
    bad = _bad_case_errors()
    cases: list[Case] = []
    skipped: list[dict[str, str]] = []
    found = list(module.candidates(ctx))

    merge = cfg.merge.get(name, {})
    classes: set[str] = set()

    def check(cand: Candidate) -> Case | BaseException:
        try:
            case = cand.build()
            classes.update(case.label_map.values())
            return validate(merge_classes(case, merge))
        except bad as err:
            return err

    # hashing (hashlib) and reading NIfTI (zlib) release the GIL: threads check several cases at once
    with ThreadPoolExecutor(max_workers=min(cores(), 8)) as pool:
        checked = list(tqdm(pool.map(check, found), total=len(found), desc=f"{name}: checking cases",
                            unit="case", disable=None, leave=False))
    for cand, outcome in zip(found, checked, strict=True):
        if isinstance(outcome, Case):
            cases.append(outcome)
        else:
            message = f"{name}/{cand.case_id}: {outcome}"
            if not cfg.skip_bad_cases:
                raise CaseError(f"{message} (set data.skip_bad_cases: true to leave such cases out)") from None
            log.warning("skipped %s", message)
            skipped.append({"source": name, "case_id": cand.case_id, "reason": str(outcome)})
    if not cases:
        raise CaseError(f"{name}: no usable case found under {ctx.dest}")
    _check_merge(name, merge, classes)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise CaseError(f"{name}: case ids are not unique: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    meta = {**module.META, "options": module.options(cfg)}
    atomic_write_json(ctx.dest / MARKER, {"fingerprint": _fingerprint(name, cfg), "meta": meta,
                                          "cases": [c.to_row(raw) for c in cases], "skipped": skipped})
    return SourceResult(name, cases, skipped, meta, cached=False)


def download_sources(cfg: DataConfig, only: list[str] | None = None,
                     force: bool = False) -> tuple[Path, list[SourceResult], list[str]]:
    """Prepare the enabled sources (or the ``only`` subset of them) and rewrite the case table.

    Returns the table's path, the results of the sources in the table, and the enabled sources still missing
    (possible only with ``only``).
    """
    for name in only or ():
        get_source(name)
        if name not in cfg.sources:
            raise CaseError(f"source {name!r} is not enabled: add it to data.sources (enabled: "
                             f"{', '.join(cfg.sources)})")
    wanted = list(dict.fromkeys(only)) if only else list(cfg.sources)
    results = {name: prepare_source(name, cfg, force) for name in wanted}
    missing = []
    for name in cfg.sources:
        if name not in results:
            done = _load_marker(name, cfg)
            if done is None or not _files_present(done):
                missing.append(name)
            else:
                results[name] = done
    ordered = [results[n] for n in cfg.sources if n in results]
    table = CaseTable(cases=[c for r in ordered for c in r.cases], sources={r.name: r.meta for r in ordered},
                      skipped=[s for r in ordered for s in r.skipped])
    path = write_case_table(raw_dir(cfg) / TABLE, table)
    return path, ordered, missing
