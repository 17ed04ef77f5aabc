"""Registry of transcriptome tower types: the ``transcriptome_tower.type`` of a ``config.json`` -> class.

Towers register themselves with :func:`register_transcriptome_tower` when their module is imported. Optional
towers are listed by module name in :data:`LAZY_TOWERS` and imported on first use (the ``AutoModel`` pattern
of transformers), so that reading a config never needs to import every tower, and no module imports the
checkpoint code back.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .towers import TranscriptomeTower

__all__ = ["TRANSCRIPTOME_TOWERS", "LAZY_TOWERS", "register_transcriptome_tower", "get_transcriptome_tower", "tower_names"]

#: Registered tower classes by type name.
TRANSCRIPTOME_TOWERS: dict[str, type["TranscriptomeTower"]] = {}
#: Tower types whose module registers them when imported.
LAZY_TOWERS = {"sparse_rank": "engine.models.towers", "geneformer": "engine.models.geneformer"}


def register_transcriptome_tower(name: str) -> Callable:
    """Class decorator registering a transcriptome tower under ``name`` (the ``type`` in ``config.json``)."""

    def deco(cls):
        cls.tower_type = name
        TRANSCRIPTOME_TOWERS[name] = cls
        return cls

    return deco


def tower_names() -> list[str]:
    """All known tower type names, registered or importable."""
    return sorted({*TRANSCRIPTOME_TOWERS, *LAZY_TOWERS})


def get_transcriptome_tower(name: str) -> type["TranscriptomeTower"] | None:
    """The class registered as ``name``, importing its module first when it is a lazy tower; None if unknown."""
    if name not in TRANSCRIPTOME_TOWERS and name in LAZY_TOWERS:
        try:
            importlib.import_module(LAZY_TOWERS[name])
        except ImportError:  # pragma: no cover - an optional dependency is missing
            return None
    return TRANSCRIPTOME_TOWERS.get(name)
