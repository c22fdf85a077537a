"""Lazy re-exports for package roots: a name is imported from its module on first use, so importing a package
never pulls in its siblings' dependencies (torch for ``vitviz --version``) and no package root can close a cycle."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, serving each name of ``table`` from ``.module``."""
    def getattr_(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{table[name]}", package), name)
        vars(importlib.import_module(package))[name] = value  # once imported, a plain attribute
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(table))

    return getattr_, dir_
