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

Layers (each a subpackage): :mod:`engine.io` (read, validate, gene IDs, orthologs, ontology, gene sets),
:mod:`engine.models` (towers, heads, tokenizers, checkpoints, CellWhisperer and Geneformer loaders),
:mod:`engine.tools` (embed, score, DE, enrichment, perturbation) and :mod:`engine.training` (pairs,
knowledge, corpus, losses, train, evaluate, metrics, distill). Command-line entry points: ``python -m
engine.train | evaluate | convert | distill | corpus | embed``.
"""
from __future__ import annotations

from ._lazy import lazy_exports
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "read": "io.readers",
    "validate": "io.validation",
    "expression_matrix": "io.expression",
    "iter_expression": "io.expression",
    "selection_matrix": "io.expression",
    "selection_adata": "io.expression",
    "gene_values": "io.expression",
    "is_backed": "io.matrix",
    "demo_dataset": "io.readers",
    "DataReport": "io.report",
    "to_human": "io.orthologs",
    # model
    "TranscriptomeTextModel": "models.model",
    "RankTokenizer": "models.tokenizer",
    "RankEncoding": "models.tokenizer",
    "SparseRankTower": "models.towers",
    "TextTower": "models.towers",
    "load_model": "models.checkpoint",
    "save_model": "models.checkpoint",
    # embeddings and scoring
    "embed_cells": "tools.embed",
    "read_embeddings": "tools.chunked",
    "umap": "tools.layout",
    "smooth_embeds": "tools.layout",
    "get_embeds": "tools.embed",
    "score_text": "tools.score",
    "zero_shot": "tools.score",
    "describe": "tools.describe",
    "label_texts": "tools.queries",
    "TEMPLATES": "tools.queries",
    # analysis
    "de_top_vs_bottom": "tools.de",
    "de_groups": "tools.de",
    "empty_de_table": "tools.de",
    "enrich": "tools.enrichment",
    "list_libraries": "io.genesets",
    "load_library": "io.genesets",
    "perturb": "tools.perturbation",
    "perturb_scan": "tools.perturbation",
    # evaluation
    "evaluate": "training.evaluate",
    "load_cellwhisperer": "models.cellwhisperer",
    "load_geneformer": "models.geneformer",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, _error_names)
