"""Training and evaluation: paired data, the knowledge and corpus sources, losses, the trainer, metrics.

=========================  ===================================================================
module                     what it holds
=========================  ===================================================================
:mod:`.pairs`              ``PairedData`` (the container every source becomes), ``clean_text``
:mod:`.anndata_source`     ``from_anndata``: cells with a text column, template or metadata fields
:mod:`.archs4_source`      ``from_archs4`` and ``write_tiny_archs4`` (ARCHS4 HDF5 layout)
:mod:`.sources`            a config's data sources: ``load_source``, ``load_data``, ``import_callable``
:mod:`.knowledge`          pseudo-cells from marker gene sets and the Cell Ontology (a package:
                           genes, labels, pairs, gene_vectors, proxy)
:mod:`.corpus`             the public labelled corpus (manifest, fetch, build, pairs)
:mod:`.losses`             CLIP and CLIP-Lite (JSD) losses
:mod:`.config`             training-config defaults, reading and validation (``load_config``)
:mod:`.model_builder`      the model of a config (``build_model_from_config``)
:mod:`.schedule`           seeding, learning-rate schedule, epoch and token batches
:mod:`.trainer`            the training loop (``_Trainer``), LiT locking, the text fine-tuning phase
:mod:`.text_cache`         locked-tower features, in memory and on disk
:mod:`.state`              best model, ``train_log.json`` and the resumable ``last/`` state
:mod:`.soup`               model soups (uniform weight averages)
:mod:`.train`              ``train`` and ``python -m engine.train``
:mod:`.evaluate`           ``evaluate`` and ``python -m engine.evaluate``
:mod:`.metrics`            retrieval and classification metrics
:mod:`.distill`            ``distill`` and ``python -m engine.distill``: teacher -> sparse rank tower
:mod:`.distill_teacher`    distillation inputs and the chunked teacher-embedding cache
:mod:`.distill_student`    the student tower: vocabulary, model, training
:mod:`.distill_report`     student vs teacher agreement, speed, model card
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
