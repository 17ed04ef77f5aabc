"""Lazy re-exports for the ``engine`` package and its layers, so that ``import engine`` stays cheap.

Each package lists ``name -> submodule``; the submodule is imported on first attribute access.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str], extra: list[str] | tuple = ()) -> tuple[Callable, Callable, list[str]]:
    """Build ``__getattr__``, ``__dir__`` and ``__all__`` for ``package``.

    Parameters
    ----------
    package
        The package's ``__name__``.
    exports
        Public name -> module path relative to the package (``"data"``, ``"io.data"``).
    extra
        Names the package defines itself, added to ``__all__``.

    Returns
    -------
    (__getattr__, __dir__, __all__)
    """
    names = sorted({*exports, *extra})

    def __getattr__(name: str):
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{mod}", package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return names

    return __getattr__, __dir__, names
