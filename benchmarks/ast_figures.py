"""Code-shape figures of `src/qrunlearn` at git revisions, side by side: lines, the longest functions, imports made
inside functions, call sites that parse a quantization spec or a strategy from text, and imports that run back up
the stage order (tests/test_layers.py's check).

    .venv/bin/python benchmarks/ast_figures.py 7007516 HEAD
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_layers import layer_of, stage_of  # noqa: E402  (the one written-down stage order)

PARSERS = {"parse_spec", "parse_strategy", "trainable_spec"}  # text -> QuantSpec / Strategy
PARSE_METHODS = {("Strategy", "parse")}


def sources(revision: str) -> dict[str, str]:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "src/qrunlearn"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return {name: subprocess.run(["git", "show", f"{revision}:{name}"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout for name in names if name.endswith(".py")}


def figures(files: dict[str, str]) -> dict[str, object]:
    lines = functions = inner_imports = parse_sites = upward = 0
    longest: list[tuple[int, str]] = []
    for name, text in files.items():
        tree = ast.parse(text)
        lines += len(text.splitlines())
        stage = Path(name).relative_to("src/qrunlearn").parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions += 1
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                longest.append((length, f"{name.removeprefix('src/qrunlearn/')}:{node.name}"))
                inner_imports += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node))
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in PARSERS:
                    parse_sites += 1
                elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                      and (func.value.id, func.attr) in PARSE_METHODS):
                    parse_sites += 1
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("qrunlearn") and stage in {s for layer in _layers() for s in layer}:
                try:
                    upward += layer_of(stage_of(module)) > layer_of(stage)
                except StopIteration:  # a stage the order does not know (older layouts)
                    upward += 1
    longest.sort(reverse=True)
    return {"files": len(files), "lines": lines, "functions": functions, "longest": longest[:3],
            "imports inside functions": inner_imports, "spec / strategy parse call sites": parse_sites,
            "imports running back up": upward}


def _layers():
    from test_layers import LAYERS

    return LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="+")
    options = parser.parse_args()
    for revision in options.revisions:
        found = figures(sources(revision))
        print(f"{revision}:")
        for key, value in found.items():
            if key == "longest" and isinstance(value, list):
                value = "; ".join(f"{name} {count} lines" for count, name in value)
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
