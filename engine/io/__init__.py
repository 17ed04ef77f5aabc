"""Reading and checking data, gene identifiers and reference tables.

========================  ====================================================================
module                    what it holds
========================  ====================================================================
:mod:`.data`              ``read``, ``validate``, ``expression_matrix``, ``demo_dataset``, gene IDs
:mod:`.orthologs`         mouse -> human genes (Ensembl 105 table shipped in celltypist)
:mod:`.ontology`          Cell Ontology names, synonyms and ancestors (cellxgene-ontology-guide)
:mod:`.genesets`          bundled Enrichr-format gene-set libraries
========================  ====================================================================

May import: :mod:`engine.errors`, :mod:`engine.paths`. Never imports ``models``, ``tools`` or ``training``
at module level.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "read": "data",
    "validate": "data",
    "expression_matrix": "data",
    "demo_dataset": "data",
    "DataReport": "data",
    "DataWarning": "data",
    "check_output_path": "data",
    "to_human": "orthologs",
    "cell_ontology_table": "ontology",
    "find_cell_type": "ontology",
    "list_libraries": "genesets",
    "load_library": "genesets",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
