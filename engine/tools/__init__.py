"""Analysis on a loaded ``AnnData`` and model, as in ``scanpy.tl``: embed, score, DE, enrichment, perturbation.

=========================  ===================================================================
module                     what it holds
=========================  ===================================================================
:mod:`.embed`              ``embed_cells`` (``obsm["transcriptome_embeds"]``), ``get_embeds``, the embedding cache
:mod:`.chunked`            row-chunked / Dask embedding into a resumable zarr store, ``read_embeddings``
:mod:`.embed_cli`          ``python -m engine.embed`` (``engine/embed.py`` is its entry point)
:mod:`.layout`             ``umap`` (sampled fit + transform above 200,000 cells), kNN graph, ``smooth_embeds``
:mod:`.score`              ``score_text``, ``zero_shot`` (in row blocks: memory-mapped embeddings work too)
:mod:`.queries`            query, label and template checks; ``label_texts``, ``TEMPLATES``
:mod:`.describe`           ``describe`` (keywords for a selection), term libraries
:mod:`.selection`          cell selections (mask, positions, obs names) as positions
:mod:`.de`                 ``de_top_vs_bottom``, ``de_groups`` (scanpy ``rank_genes_groups``)
:mod:`.enrichment`         ``enrich`` (gseapy's Enrichr test on bundled libraries)
:mod:`.perturbation`       ``perturb``, ``perturb_scan`` (in-silico deletion / over-expression)
=========================  ===================================================================

May import: :mod:`engine.errors`, :mod:`engine.io`, :mod:`engine.models`.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "embed_cells": "embed",
    "read_embeddings": "chunked",
    "umap": "layout",
    "smooth_embeds": "layout",
    "get_embeds": "embed",
    "score_text": "score",
    "zero_shot": "score",
    "describe": "describe",
    "label_texts": "queries",
    "TEMPLATES": "queries",
    "de_top_vs_bottom": "de",
    "de_groups": "de",
    "empty_de_table": "de",
    "enrich": "enrichment",
    "perturb": "perturbation",
    "perturb_scan": "perturbation",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
