"""Training and evaluation: paired data, the knowledge and corpus sources, losses, the trainer, metrics.

=========================  ===================================================================
module                     what it holds
=========================  ===================================================================
:mod:`.pairs`              ``PairedData`` and the config's data sources
:mod:`.knowledge`          pseudo-cells from marker gene sets and the Cell Ontology
:mod:`.corpus`             the public labelled corpus (manifest, fetch, build, pairs)
:mod:`.losses`             CLIP and CLIP-Lite (JSD) losses
:mod:`.train`              ``python -m engine.train``: the training loop, LiT locking, model soups
:mod:`.evaluate`           ``evaluate`` and ``python -m engine.evaluate``
:mod:`.metrics`            retrieval and classification metrics
:mod:`.distill`            ``python -m engine.distill``: teacher -> sparse rank tower
=========================  ===================================================================

May import every other layer.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "PairedData": "pairs",
    "evaluate": "evaluate",
    "retrieval_metrics": "metrics",
    "classification_metrics": "metrics",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
