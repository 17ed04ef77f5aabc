"""The ``data`` section of a training config: one :class:`~engine.training.pairs.PairedData` per source.

A source is ``{"type": "anndata" | "archs4" | "python", ...}``; the ``python`` type names a
``"module:function"`` (e.g. ``engine.training.knowledge:build_pairs``) that returns pairs. Module paths of
configs written before the engine was split into layers are mapped to their new home
(:data:`MOVED_MODULES`), and relative paths are tried against the config file's folder first
(:func:`resolve_path`). :func:`load_data` reads and concatenates all sources of a config.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path

from ..errors import ConfigError
from .anndata_source import from_anndata
from .archs4_source import from_archs4
from .pairs import PairedData

__all__ = ["MOVED_MODULES", "import_callable", "load_source", "load_data", "resolve_path"]

log = logging.getLogger(__name__)


def resolve_path(path: str | os.PathLike | None, base_dir: str | os.PathLike | None) -> str | None:
    """``path`` with ``~`` expanded; a relative path that exists under ``base_dir`` is taken from there.

    Returns
    -------
    str or None
        The path as a string (``None`` for ``None``).
    """
    if path is None:
        return None
    p = Path(str(path)).expanduser()
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return str(Path(base_dir) / p)
    return str(p)


#: Module paths used by configs written before the engine was split into layers (lexicell 0.1.0 up to
#: 2026-12-02): ``"engine.knowledge:build_pairs"`` in an old ``config.json`` still resolves.
MOVED_MODULES = {
    "engine.knowledge": "engine.training.knowledge",
    "engine.corpus": "engine.training.corpus",
    "engine.pairs": "engine.training.pairs",
    "engine.train": "engine.training.train",
}


def import_callable(spec: str):
    """Import ``"package.module:function"`` and return the function.

    Module paths from before the layered engine (:data:`MOVED_MODULES`) are mapped to their new home.

    Raises
    ------
    ConfigError
        If the module or attribute cannot be imported.
    """
    if ":" not in spec:
        raise ConfigError("A callable must be written 'module:function'", found=repr(spec), expected="e.g. 'engine.training.knowledge:build_pairs'")
    mod, attr = spec.split(":", 1)
    mod = MOVED_MODULES.get(mod, mod)
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError("Cannot import the callable", found=f"{spec}: {err}", expected="an importable 'module:function'") from err
    if not callable(obj):
        raise ConfigError("The named object is not callable", found=spec, expected="a function")
    return obj


def load_source(spec: dict, *, base_dir: str | os.PathLike | None = None) -> PairedData:
    """Read one data source of a training config.

    Parameters
    ----------
    spec
        ``{"type": "anndata", "path": ..., <from_anndata kwargs>}``, ``{"type": "archs4", "path": ...,
        <from_archs4 kwargs>}`` or ``{"type": "python", "callable": "module:function", "kwargs": {...}}``
        (the function returns a :class:`PairedData` or a list of them). Optional ``name``.
    base_dir
        Folder against which relative paths are tried first (the config file's folder).

    Raises
    ------
    ConfigError
        Unknown type, missing path or callable, or a callable that returns something else.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError("A data source needs a 'type'", found=repr(spec)[:200], expected="{'type': 'anndata'|'archs4'|'python', ...}")
    spec = dict(spec)
    kind = str(spec.pop("type")).lower()
    if kind in ("anndata", "h5ad"):
        if "path" not in spec:
            raise ConfigError("An anndata source needs a 'path'", found=sorted(spec), expected="'path'")
        return from_anndata(resolve_path(spec.pop("path"), base_dir), **spec)
    if kind == "archs4":
        if "path" not in spec:
            raise ConfigError("An archs4 source needs a 'path'", found=sorted(spec), expected="'path'")
        return from_archs4(resolve_path(spec.pop("path"), base_dir), **spec)
    if kind == "python":
        if "callable" not in spec:
            raise ConfigError("A python source needs a 'callable'", found=sorted(spec), expected="'callable': 'module:function'")
        fn = import_callable(spec["callable"])
        out = fn(**dict(spec.get("kwargs") or {}))
        if isinstance(out, (list, tuple)):
            out = PairedData.concat(list(out))
        if not isinstance(out, PairedData):
            raise ConfigError("A python data source must return PairedData", found=type(out).__name__, expected="engine.training.pairs.PairedData")
        if spec.get("name"):
            out.name = str(spec["name"])
        return out
    raise ConfigError("Unknown data source type", found=repr(kind), expected="'anndata', 'archs4' or 'python'")


def load_data(sources: list[dict], *, base_dir: str | None = None) -> tuple[PairedData, list[dict]]:
    """Read and concatenate all data sources (see :func:`load_source`).

    Returns
    -------
    (PairedData, list of dict)
        The pairs and a JSON summary of each source (type, path/callable, name, n_pairs).
    """
    parts, summary = [], []
    for spec in sources:
        t0 = time.perf_counter()
        pd_ = load_source(spec, base_dir=base_dir)
        parts.append(pd_)
        s = {k: spec[k] for k in ("type", "path", "callable", "kwargs") if k in spec}
        s.update(name=pd_.name, n_pairs=len(pd_), n_texts=len(set(pd_.texts)), seconds=round(time.perf_counter() - t0, 2))
        summary.append(s)
        log.info("data source %s: %d pairs", pd_.name, len(pd_))
    return PairedData.concat(parts), summary
