"""Dependencies point one way: each stage imports only from the stages below it. The order is written down once,
here (and quoted in the README): a module may import its own stage and any stage to its left.

    foundation (errors, io, lazy, typing, plotting) < data < models < quant < unlearn < eval < targets
        < config < results < report < audit, experiment < cli (__main__)

Every import counts: module level, inside functions, and the module paths handed to `lazy_module` /
`lazy_exports` as strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qrunlearn"
LAYERS: list[set[str]] = [
    {"errors", "io", "lazy", "typing", "plotting", "__init__"},
    {"data"}, {"models"}, {"quant"}, {"unlearn"}, {"eval"}, {"targets"},
    {"config"}, {"results"}, {"report"}, {"audit", "experiment"}, {"cli", "__main__"},
]
MODULE_PATH = re.compile(r"qrunlearn(\.\w+)+")


def layer_of(stage: str) -> int:
    return next(index for index, stages in enumerate(LAYERS) if stage in stages)


def stage_of(module: str) -> str:
    """'qrunlearn.quant.rtn' -> 'quant'; 'qrunlearn' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every qrunlearn module the file imports or names as a lazy import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qrunlearn"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("qrunlearn")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.fullmatch(node.value):
            found.append((node.lineno, node.value))
    return found


def upward_imports(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        stage = relative.parts[0].removesuffix(".py")
        for line, module in imported_modules(path):
            if layer_of(stage_of(module)) > layer_of(stage):
                problems.append(f"{relative}:{line} ({stage}) imports {module} ({stage_of(module)})")
    return problems


def test_every_stage_is_placed():
    stages = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
              if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert stages <= set().union(*LAYERS), stages - set().union(*LAYERS)


def test_no_import_runs_back_up():
    assert upward_imports(PACKAGE) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The check can fail: a models module importing eval, inside a function, is reported."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from qrunlearn.eval.config import EvalConfig\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "lazy.py").write_text("X = 'qrunlearn.report'\n")
    assert upward_imports(tmp_path) == ["eval/lazy.py:1 (eval) imports qrunlearn.report (report)",
                                        "models/bad.py:2 (models) imports qrunlearn.eval.config (eval)"]


@pytest.mark.parametrize("module,stage", [("qrunlearn", "__init__"), ("qrunlearn.quant.rtn", "quant"),
                                          ("qrunlearn.cli", "cli")])
def test_stage_of(module, stage):
    assert stage_of(module) == stage
