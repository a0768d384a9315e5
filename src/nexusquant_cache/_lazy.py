"""Import machinery that keeps ``import nexusquant_cache`` (and the command line) fast: package
attributes imported on first use (PEP 562), and an action run once a module is imported."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Callable

__all__ = ["after_import", "lazy_attributes"]


def lazy_attributes(package: str, homes: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` lives in its submodule
    ``homes[name]``: the submodule is imported when the name is first used."""
    namespace = sys.modules[package].__dict__

    def getattr_(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{homes[name]}", package), name)
        namespace[name] = value  # later uses skip this function
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return getattr_, dir_


def after_import(name: str, action: Callable[[], None]) -> None:
    """Run ``action`` now if module ``name`` is imported, else right after it first is."""
    if name in sys.modules:
        action()
    else:
        sys.meta_path.insert(0, _AfterImport(name, action))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Leaves ``sys.meta_path`` when asked for its module, and hands back the real finders'
    spec with ``action`` run after the module's code."""

    def __init__(self, name: str, action: Callable[[], None]):
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
                self.action()

            spec.loader.exec_module = exec_module
        return spec
