"""Deferred imports, for one reason: the command line answers `--help` and usage errors in a fraction of a second
instead of paying ~5 s for torch, transformers and peft first.

- `lazy_module(name)`: a stand-in that imports the module on first attribute access; the CLI names every module
  it uses at its top this way.
- `lazy_exports(package, {name: module})`: a package `__init__` that re-exports names from its submodules
  without importing them until one is used (PEP 562 module `__getattr__`), so importing a light submodule such
  as `qrunlearn.eval.config` does not pull in the evaluator.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class LazyModule:
    """Stands for a module and imports it (the normal way, through `importlib.import_module`) on first attribute
    access. Unlike `importlib.util.LazyLoader` it puts nothing half-loaded into `sys.modules`, so tools that scan
    `sys.modules` (inspect, warnings) cannot trigger an import in the middle of another one."""

    def __init__(self, name: str, before: Callable[[], None] | None = None):
        self._name, self._before = name, before

    def __getattr__(self, attribute: str) -> Any:
        if self._before is not None:
            self._before()
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str, before: Callable[[], None] | None = None) -> Any:
    """`before` runs ahead of the import (every access; it must be cheap once done)."""
    return LazyModule(name, before)


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, resolving each exported name from its submodule on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
