"""Import machinery that keeps ``import nexusquant_cache`` (and the command line) fast: package
attributes imported on first use (PEP 562), and an action run once a module is imported."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Callable

__all__ = ["after_import", "lazy_attributes"]


def lazy_attributes(package: str, homes: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` lives in its submodule
    ``homes[name]``: the submodule is imported when the name is first used. Submodules are
    attributes too (``nexusquant_cache.io``), imported on first use."""
    namespace = sys.modules[package].__dict__

    def getattr_(name: str):
        if name not in homes:
            if importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f".{name}", package)  # a submodule, as after an eager import
        value = getattr(importlib.import_module(f".{homes[name]}", package), name)
        namespace[name] = value  # later uses skip this function
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return getattr_, dir_


def after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """Run ``action(module)`` now if module ``name`` is imported, else right after its code first
    runs, inside that import: ``action`` must import nothing (other threads may hold import locks)."""
    if name in sys.modules:
        action(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and (f.name, f.action) == (name, action) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Leaves ``sys.meta_path`` when asked for its module, and hands back the real finders'
    spec with ``action`` run after the module's code."""

    def __init__(self, name: str, action: Callable[[ModuleType], None]):
        self.name, self.action = name, action

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_code = spec.loader.exec_module

            def exec_module(module):
                run_code(module)
                self.action(module)

            spec.loader.exec_module = exec_module
        return spec
