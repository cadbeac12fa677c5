"""Verbs never import other verbs: what two verbs share lives in a non-verb ``pipeline`` module or in the library.

Checked statically over every import statement of each verb module (function-level imports included), so a
lazy import inside a function cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

from segevo_pipeline.cli import VERBS

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_verb_imports_another_verb():
    verbs = {module for module, _ in VERBS.values()}
    offences = {module: sorted(_imports(PIPELINE / f"{module.split('.')[-1]}.py") & (verbs - {module}))
                for module in verbs}
    assert {m: v for m, v in offences.items() if v} == {}


def test_the_shared_modules_import_no_verb_either():
    verbs = {module for module, _ in VERBS.values()}
    shared = [p for p in PIPELINE.glob("*.py") if f"segevo_pipeline.{p.stem}" not in verbs and p.stem != "cli"]
    offences = {p.name: sorted(_imports(p) & verbs) for p in shared}
    assert {m: v for m, v in offences.items() if v} == {}
