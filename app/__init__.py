"""Lexicell dashboard (Panel + HoloViews + Datashader) on top of the headless ``engine``.

In Jupyter::

    import engine
    from app import Explorer
    adata = engine.demo_dataset()
    Explorer(adata, engine.load_model())

Served: ``python run_app.py [--data my.h5ad] [--model DIR]``.
"""
from __future__ import annotations

__all__ = ["Explorer", "build_app", "AppState"]


def __getattr__(name: str):
    if name in ("Explorer", "build_app"):
        from . import layout

        return getattr(layout, name)
    if name == "AppState":
        from .state import AppState

        return AppState
    raise AttributeError(f"module 'app' has no attribute {name!r}")
