"""When a case's outputs are up to date: a fingerprint of what they depend on -- the raw files (checksum and
stats), the parameters, and the code that makes them -- stored with the outputs and compared on the next run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from segevo.data.cases import Case

VERSION = 1  # bump when the outputs change for a reason the code fingerprint cannot see (a library upgrade)


def strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(*modules: str) -> str:
    """SHA256 of the modules' code (every module of a package), blind to comments, docstrings and formatting:
    edits that cannot change an output do not force a rerun of every case."""
    h = hashlib.sha256(f"segevo-preprocess-{VERSION}".encode())
    for name, path in (item for module in modules for item in _sources(module)):
        tree = strip_docstrings(ast.parse(path.read_text()))
        h.update(name.encode() + ast.dump(tree).encode())
    return h.hexdigest()


def _sources(name: str) -> list[tuple[str, Path]]:
    """(module name, file) of a module, or of every module of a package in name order."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"module {name} not found")
    origin = Path(spec.origin)
    if not spec.submodule_search_locations:
        return [(name, origin)]
    files = sorted(origin.parent.rglob("*.py"))
    return [(".".join([name, *f.relative_to(origin.parent).with_suffix("").parts]), f) for f in files]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_stats(*paths: Path | None) -> list[Any]:
    out = []
    for p in paths:
        if p is None:
            out.append(None)
            continue
        try:
            st = p.stat()
            out.append([st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            out.append("missing")
    return out


def case_identity(case: Case, base: Path) -> dict[str, Any]:
    """What a case's outputs depend on; paths relative to the case table, so the data root can move."""
    files = [None if p is None else os.path.relpath(p, base) for p in (case.image, case.label)]
    return {"key": case.key, "format": case.format, "image_sha256": case.image_sha256,
            "label_map": {str(k): v for k, v in sorted(case.label_map.items())}, "channels": list(case.channels),
            "files": files, "stats": file_stats(case.image, case.label)}
