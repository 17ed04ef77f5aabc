"""Lexicell engine: the headless core of a CellWhisperer-style transcriptome-text explorer.

Everything the dashboard does is available here for notebooks::

    import engine
    adata = engine.read("my.h5ad")
    engine.validate(adata)
    model = engine.load_model()            # bundled default model
    engine.embed_cells(adata, model)       # obsm["transcriptome_embeds"]
    engine.score_text(adata, model, "B cells MINUS T cells")
    engine.zero_shot(adata, model, ["B cell", "T cell", "monocyte"])

The engine never imports panel, holoviews, bokeh or datashader. Public names are
imported lazily, so ``import engine`` is cheap.
"""
from __future__ import annotations

import importlib

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "read": "data",
    "validate": "data",
    "expression_matrix": "data",
    "demo_dataset": "data",
    "DataReport": "data",
    "to_human": "orthologs",
    # model
    "TranscriptomeTextModel": "model",
    "RankTokenizer": "tokenizer",
    "RankEncoding": "tokenizer",
    "SparseRankTower": "towers",
    "TextTower": "towers",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    # embeddings and scoring
    "embed_cells": "embed",
    "umap": "embed",
    "smooth_embeds": "embed",
    "get_embeds": "embed",
    "score_text": "score",
    "zero_shot": "score",
    "describe": "score",
    "label_texts": "score",
    "TEMPLATES": "score",
    # analysis
    "de_top_vs_bottom": "de",
    "de_groups": "de",
    "enrich": "enrichment",
    "list_libraries": "genesets",
    "load_library": "genesets",
    "perturb": "perturbation",
    "perturb_scan": "perturbation",
    # evaluation
    "evaluate": "evaluate",
    "load_cellwhisperer": "cellwhisperer",
    "load_geneformer": "geneformer",
}

__all__ = sorted([*_EXPORTS, *_error_names])


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
