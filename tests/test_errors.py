"""The error hierarchy: every exception class segevo and pipeline define is a :class:`SegevoError` (shown as one
line by the front door), and the front door's test lets programming bugs -- bare ``ValueError``, ``KeyError``,
``RuntimeError`` -- keep their traceback."""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

from segevo.errors import DownloadError, MissingResource, OutputError, SegevoError, UserError, user_errors
from segevo_pipeline.cli import _is_user_error

REPO = Path(__file__).resolve().parents[1]
NOT_USER_ERRORS = {"segevo_pipeline.cli.UsageError"}  # argparse's usage errors: exit status 2, printed by the parser


def defined_exceptions() -> dict[str, str]:
    """``module.Class`` -> module of every class in segevo/ and pipeline/ deriving, by name, from an exception
    (builtin ones, segevo.errors' and, to a fixpoint, each other)."""
    known = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
             and issubclass(getattr(builtins, n), BaseException)}
    known |= {"SegevoError", "UserError", "OutputError", "DownloadError", "MissingResource"}
    classes = []
    for path in sorted([*(REPO / "segevo").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        module = module.replace("pipeline", "segevo_pipeline", 1) if module.startswith("pipeline") else module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                classes.append((module, node.name, bases))
    found: dict[str, str] = {}
    while True:
        new = {f"{m}.{name}": m for m, name, bases in classes if bases & known and f"{m}.{name}" not in found}
        if not new:
            return found
        found.update(new)
        known |= {key.rpartition(".")[2] for key in new}


EXCEPTIONS = defined_exceptions()


def test_the_scan_finds_the_known_kinds():
    """A scan that finds nothing would pass the next test vacuously."""
    for name in ("segevo.config.base.ConfigError", "segevo.data.cases.CaseError", "segevo.model.checkpoint.KeyMismatch",
                 "segevo.model.tokenizer.TokenizerUnavailable", "segevo.model.adapters.UnknownModality",
                 "segevo.data.fetch.ArchiveError", "segevo_pipeline.cluster.ClusterError",
                 "segevo_pipeline.cli.UsageError"):
        assert name in EXCEPTIONS


@pytest.mark.parametrize("name", sorted(set(EXCEPTIONS) - NOT_USER_ERRORS))
def test_every_defined_error_is_a_segevo_error(name):
    cls = getattr(importlib.import_module(EXCEPTIONS[name]), name.rpartition(".")[2])
    assert issubclass(cls, SegevoError), f"{name} derives from {[b.__name__ for b in cls.__mro__[1:]]}"
    assert _is_user_error(cls.__new__(cls))  # what the front door sees


def test_user_errors_is_the_hierarchy_root_only():
    assert user_errors() == (SegevoError,)
    for kind in (UserError, OutputError, DownloadError, MissingResource):
        assert _is_user_error(kind("x"))


@pytest.mark.parametrize("bug", [ValueError, KeyError, RuntimeError, TypeError, IndexError, AssertionError])
def test_programming_bugs_keep_their_traceback(bug):
    assert not _is_user_error(bug("x"))


def test_user_error_is_still_a_value_error():
    """Library callers that catch ``ValueError`` around config or case parsing keep working."""
    assert issubclass(UserError, ValueError) and issubclass(DownloadError, RuntimeError)
    assert issubclass(MissingResource, RuntimeError)
