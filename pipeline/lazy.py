"""Lazy re-exports for packages whose submodules must stay importable without torch.

Importing ``pipeline.objectives.gan.config`` (which ``pipeline.config`` does for every
command, ``pipeline shards`` included) runs ``pipeline/objectives/gan/__init__.py`` first. An
ordinary ``from .phases import GStep`` there would pull in torch; with :func:`lazy_exports`
the package names its public objects and imports each on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, where ``exports`` maps a public name to the
    submodule (relative to ``package``) that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        value = getattr(module, name)
        vars(importlib.import_module(package))[name] = value  # later accesses skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
