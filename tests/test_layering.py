"""The import layering of ``segevo/`` (DESIGN.md section 2), read from the import statements of every module.

From the bottom: ``errors`` (a leaf), then config and I/O, then the data side, then the model, then losses and
the other training parts, then training / inference / evaluation. A module imports only from its own part or
from a part below it -- function-level imports included, since they run too. ``segevo/`` never imports ray,
mlflow, optuna, dvc or ``pipeline``. And what a DataLoader worker imports (the data side) loads neither peft
nor the model, checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "segevo"

# part -> layer; a part is a top-level module or subpackage of segevo. A module may import its own part and
# any part of a lower layer.
LAYERS = {
    "segevo.errors": 0, "segevo.combinations": 0,
    "segevo.config": 1, "segevo.io": 1, "segevo.net": 1, "segevo.guard": 1,
    "segevo.data": 2, "segevo.hub": 2,
    "segevo.model": 3,
    "segevo.losses": 4, "segevo.metrics": 4, "segevo.optim": 4, "segevo": 4,
    "segevo.training": 5, "segevo.inference": 5,
    "segevo.evaluation": 6, "segevo.recipe": 6, "segevo.comparison": 6,
}
FORBIDDEN = ("ray", "mlflow", "optuna", "dvc", "pipeline", "segevo_pipeline")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    return parse_imports(path.read_text(), module_name(path), path.name == "__init__.py")


def parse_imports(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement, nested ones included; relative imports resolved
    against the module's package; ``from x import y`` also yields ``x.y`` (y may be a module)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def part(module: str) -> str | None:
    """The layered part of a segevo module or name (``segevo.data.preprocess.case`` -> ``segevo.data``,
    ``segevo.load_model`` -> ``segevo``); None outside segevo."""
    parts = module.split(".")
    if parts[0] != "segevo":
        return None
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return f"segevo.{parts[1]}"
    return "segevo"


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {part(module_name(p)) for p in MODULES}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS with the layer they belong to"


def test_imports_point_down():
    wrong = []
    for path in MODULES:
        own = part(module_name(path))
        for line, target in imports(path):
            other = part(target)
            if other is not None and other != own and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {own} (layer {LAYERS[own]}) imports {target} "
                             f"(layer {LAYERS[other]})")
    assert not wrong, "\n".join(wrong)


def test_segevo_never_imports_the_orchestration_stack():
    wrong = [f"{path.relative_to(REPO)}:{line}: imports {target}" for path in MODULES
             for line, target in imports(path) if target.split(".")[0] in FORBIDDEN]
    assert not wrong, "\n".join(wrong)


def test_errors_is_a_leaf():
    path = PACKAGE / "errors.py"
    found = [target for _, target in imports(path) if target != "__future__" and not target.startswith("__future__.")]
    assert all(t.split(".")[0] in sys.stdlib_module_names for t in found), found
    assert not [t for t in found if t.startswith("segevo")], found


def test_data_side_imports_no_model_or_loss():
    wrong = [f"{path.relative_to(REPO)}:{line}: imports {target}"
             for path in sorted((PACKAGE / "data").rglob("*.py")) for line, target in imports(path)
             if target.startswith(("segevo.model", "segevo.losses", "peft", "deepspeed"))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("bad, expected", [
    ("from segevo.losses import dice_bce\n", "segevo.losses"),
    ("def f():\n    from ...model.priors import ContextPriors\n", "segevo.model.priors"),
    ("import segevo.model.adapted as adapted\n", "segevo.model.adapted"),
    ("from segevo import load_model\n", "segevo"),
])
def test_the_checker_sees_every_spelling_of_an_upward_import(bad, expected):
    """A checker blind to one form of import would pass anything: each form is found and ranked above data."""
    found = [target for _, target in parse_imports(bad, "segevo.data.preprocess.case")]
    assert expected in found
    assert LAYERS[part(expected)] > LAYERS["segevo.data"]


def test_a_loader_worker_loads_no_model():
    """What a DataLoader worker unpickles (the dataset, the batch type, the task vocabulary) and the data stages
    import every module of the data side; none of it may pull in peft, the model or the loss. (Third-party
    imports are not policed here: MONAI's transforms import all of MONAI, which imports mlflow and optuna.)"""
    data_modules = [module_name(p) for p in sorted((PACKAGE / "data").rglob("*.py"))]
    code = ("import importlib, json, sys\n"
            f"for name in {data_modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "segevo.data.dataset" in loaded
    bad = [m for m in loaded if m.split(".")[0] in ("peft", "deepspeed", "pipeline", "segevo_pipeline")
           or m.startswith(("segevo.model", "segevo.losses", "segevo.training", "segevo.inference"))]
    assert not bad, bad
