"""Analysis on a loaded ``AnnData`` and model, as in ``scanpy.tl``: embed, score, DE, enrichment, perturbation.

=========================  ===================================================================
module                     what it holds
=========================  ===================================================================
:mod:`.embed`              ``embed_cells`` (``obsm["transcriptome_embeds"]``), ``umap``, smoothing
:mod:`.score`              ``score_text``, ``zero_shot``, ``describe``, label texts and templates
:mod:`.de`                 ``de_top_vs_bottom``, ``de_groups`` (scanpy ``rank_genes_groups``)
:mod:`.enrichment`         ``enrich`` (gseapy's Enrichr test on bundled libraries)
:mod:`.perturbation`       ``perturb``, ``perturb_scan`` (in-silico deletion / over-expression)
=========================  ===================================================================

May import: :mod:`engine.errors`, :mod:`engine.io`, :mod:`engine.models`.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "embed_cells": "embed",
    "umap": "embed",
    "smooth_embeds": "embed",
    "get_embeds": "embed",
    "score_text": "score",
    "zero_shot": "score",
    "describe": "score",
    "label_texts": "score",
    "TEMPLATES": "score",
    "de_top_vs_bottom": "de",
    "de_groups": "de",
    "enrich": "enrichment",
    "perturb": "perturbation",
    "perturb_scan": "perturbation",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
