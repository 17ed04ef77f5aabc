"""Expression for rank encoding, whole (``expression_matrix``) or in row chunks (``iter_expression``); the rows of a
selection (``selection_matrix``) and one gene (``gene_values``), from in-memory or backed data."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, MatrixKindError
from .matrix import _chunk_rows, _get_matrix, _get_var, _is_backed_matrix, _iter_chunks, _materialise, _take_rows
from .report import _KINDS, TARGET_SUM, DataReport
from .validation import _analyse

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

log = logging.getLogger(__name__)


def expression_matrix(
    adata: AnnData,
    *,
    kind: Literal["counts", "normalized", "log"] = "normalized",
    report: DataReport | None = None,
    chunk_size: int | None = None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The expression matrix for rank encoding, from the source chosen by :func:`validate`.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed (rows are read in chunks).
    kind
        ``"counts"``: raw counts as stored (the source must hold counts);
        ``"normalized"``: non-negative values proportional to counts / library
        size x 1e4 (counts and CPM-like sources are scaled to :data:`TARGET_SUM`
        per cell; log sources are ``expm1``-ed, which restores the original
        normalisation); ``"log"``: ``log1p`` of ``"normalized"``.
    report
        A :class:`DataReport` of this ``adata`` from :func:`validate`. ``None``
        runs the same source selection and gene mapping without writing
        anything and without the minimum-mapping check.
    chunk_size
        Rows per chunk (default: adapted to the number of genes).

    Whole-matrix form of :func:`iter_expression`; for a backed dataset of many cells use that (or
    :func:`selection_matrix` for some cells), which never hold more than one chunk.

    Returns
    -------
    X : scipy.sparse.csr_matrix
        ``(n_cells, n_genes_source)`` float32, a new matrix (the source is not
        modified; no dense copy of the full matrix is made).
    var : pandas.DataFrame
        Copy of the source's var table (``adata.raw.var`` when the source is
        ``raw``) with ``ensembl_id`` (unversioned, NaN if unmapped) and
        ``gene_symbol`` columns; all genes are kept, in the source's order.

    Raises
    ------
    MatrixKindError
        ``kind="counts"`` but only log-normalised, normalised or scaled values
        exist; or no usable (unscaled) matrix.
    DataError
        NaN/inf or negative values, an empty dataset, or a ``report`` of another dataset.
    ConfigError
        Unknown ``kind``.
    """
    report, source, skind, mat, src_var = _prepare(adata, kind, report)
    n_rows, n_cols = adata.n_obs, src_var.shape[0]
    data_parts, index_parts, indptr_parts = [], [], [np.zeros(1, dtype=np.int64)]
    offset = 0
    for start, block in _iter_chunks(mat, n_rows, n_cols, chunk_size):
        block = _normalise_block(block, kind, source, skind, start)
        data_parts.append(block.data)
        index_parts.append(block.indices.astype(np.int64 if block.nnz > 2**31 - 1 else np.int32, copy=False))
        indptr_parts.append(block.indptr[1:].astype(np.int64) + offset)
        offset += block.nnz
    indptr = np.concatenate(indptr_parts)
    idx_dtype = np.int64 if offset > 2**31 - 1 else np.int32
    X = sp.csr_matrix(
        (
            np.concatenate(data_parts) if data_parts else np.zeros(0, np.float32),
            np.concatenate(index_parts).astype(idx_dtype, copy=False) if index_parts else np.zeros(0, idx_dtype),
            indptr.astype(idx_dtype, copy=False),
        ),
        shape=(n_rows, n_cols),
    )
    return X, _var_table(src_var, report)


def _prepare(adata, kind: str, report):
    """Check ``kind`` and ``report``; return ``(report, source, source_kind, matrix, source var)``."""
    if kind not in _KINDS:
        raise ConfigError("Unknown expression kind", found=repr(kind), expected=" or ".join(map(repr, _KINDS)),
                          fix="use kind='counts' (Geneformer), 'normalized' or 'log'.")
    if report is None:
        report = _analyse(adata, species=None, min_frac_mapped=None, full_scan=False)
    elif report.n_cells != adata.n_obs or report.n_genes != _get_var(adata, report.source).shape[0]:
        raise DataError(
            "The validation report belongs to another dataset",
            found=f"report for {report.n_cells} x {report.n_genes}, data {adata.n_obs} x {adata.n_vars}",
            expected="the report returned by engine.validate(adata) for this adata",
            fix="run engine.validate(adata) again after subsetting.",
        )
    source, skind = report.source, report.source_kind
    if kind == "counts" and skind != "counts":
        raise MatrixKindError(
            "Raw counts are required (e.g. for Geneformer, which divides counts by per-gene medians)",
            found=f"the best available matrix, {source}, holds {skind} values (X holds {report.x_kind} values)",
            expected="non-negative integer counts in X, layers['counts'] or adata.raw",
            fix="add the counts: adata.layers['counts'] = <cells x genes count matrix> (or adata.raw = counts "
            "AnnData); or use a model that accepts normalised expression (kind='normalized').",
        )
    return report, source, skind, _get_matrix(adata, source), _get_var(adata, source)


def _normalise_block(block, kind: str, source: str, skind: str, start: int) -> sp.csr_matrix:
    """One row block as a new float32 CSR in ``kind`` (checked: finite, non-negative)."""
    block = sp.csr_matrix(block, dtype=np.float32, copy=True)
    block.sum_duplicates()
    data = block.data
    if data.size and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(
            f"The {source} matrix holds {bad} non-finite values in rows {start}-{start + block.shape[0] - 1}",
            found="NaN or inf",
            expected="finite expression values",
            fix="run engine.validate(adata, scan='full') to locate them.",
        )
    if data.size and data.min() < 0:
        n_neg = int((data < 0).sum())
        raise DataError(
            f"The {source} matrix holds {n_neg} negative value(s) in rows {start}-{start + block.shape[0] - 1}, "
            "so its genes cannot be ranked",
            found=f"{skind} values with negatives (min {float(data.min()):.3g})",
            expected="non-negative counts or log-normalised values",
            fix="run engine.validate(adata, scan='full') to locate them; fix or zero them, or provide the raw counts.",
        )
    if kind != "counts":
        if skind == "log":
            np.expm1(data, out=data)
        else:  # counts or CPM-like: scale each cell to TARGET_SUM
            sums = np.asarray(block.sum(axis=1)).ravel()
            scale = np.divide(TARGET_SUM, sums, out=np.zeros_like(sums), where=sums > 0)
            data *= np.repeat(scale, np.diff(block.indptr)).astype(np.float32)
        if kind == "log":
            np.log1p(data, out=data)
    return block


def _var_table(src_var: pd.DataFrame, report) -> pd.DataFrame:
    """Copy of the source's var table with ``ensembl_id`` and ``gene_symbol`` from the report's mapping."""
    var = src_var.copy()
    mapping = report.mapping.reindex(var.index) if not report.mapping.index.equals(var.index) else report.mapping
    user_sym = var["gene_symbol"] if "gene_symbol" in var.columns else None
    var["ensembl_id"] = mapping["ensembl_id"].to_numpy()
    sym = mapping["gene_symbol"]
    if user_sym is not None:
        sym = sym.where(sym.notna(), user_sym.to_numpy())
    var["gene_symbol"] = sym.to_numpy()
    return var


def expression_var(adata: AnnData, *, report: DataReport | None = None) -> pd.DataFrame:
    """The var table :func:`expression_matrix` returns, without reading any expression.

    Returns
    -------
    pandas.DataFrame
        ``(n_genes_source, ...)``: the source's var table with ``ensembl_id`` and ``gene_symbol``.

    Raises
    ------
    DataError, MatrixKindError
        As :func:`expression_matrix` (no usable matrix, a report of another dataset).
    """
    report, _, _, _, src_var = _prepare(adata, "normalized", report)
    return _var_table(src_var, report)


def iter_expression(
    adata: AnnData,
    *,
    kind: Literal["counts", "normalized", "log"] = "normalized",
    report: DataReport | None = None,
    chunk_size: int | None = None,
    start: int = 0,
    stop: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Stream the matrix of :func:`expression_matrix` in row chunks (memory bounded by one chunk).

    Works on in-memory and backed AnnData (``engine.read(path, backed=True)``: ``.h5ad`` and ``.zarr``); only
    the rows of one chunk are read from disk at a time. Chunk ``k`` is identical to rows ``start + k *
    chunk_size ...`` of :func:`expression_matrix` (normalisation is per cell).

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData.
    kind, report
        As :func:`expression_matrix`.
    chunk_size
        Rows per chunk (default: about 10 million matrix elements, at most 10,000 rows).
    start, stop
        Row range to stream (default: all rows).
    progress
        tqdm progress bar over chunks.

    Yields
    ------
    (int, scipy.sparse.csr_matrix)
        First row of the chunk and the ``(rows, n_genes_source)`` float32 block.

    Raises
    ------
    DataError, MatrixKindError, ConfigError
        As :func:`expression_matrix`; NaN/inf or negative values raise when their chunk is read.
    """
    from tqdm.auto import tqdm

    report, source, skind, mat, src_var = _prepare(adata, kind, report)
    stop = adata.n_obs if stop is None else min(int(stop), adata.n_obs)
    step = _chunk_rows(src_var.shape[0], chunk_size)
    chunks = _iter_chunks(mat, adata.n_obs, src_var.shape[0], step, ranges=[(int(start), stop)])
    total = -(-max(stop - int(start), 0) // step)
    for first, block in tqdm(chunks, total=total, desc="Reading expression", unit="chunk", disable=not progress):
        yield first, _normalise_block(block, kind, source, skind, first)


def selection_matrix(
    adata: AnnData,
    cells,
    *,
    kind: Literal["counts", "normalized", "log"] | None = "normalized",
    report: DataReport | None = None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The expression of some cells, in memory, from an in-memory or backed AnnData.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed.
    cells
        Integer positions (any order; the result follows it), a boolean mask ``(n_cells,)`` or obs names.
    kind
        As :func:`expression_matrix`; ``None`` returns ``X`` as stored (float32 CSR; for DE or colouring).
    report
        As :func:`expression_matrix` (ignored when ``kind`` is None).

    Returns
    -------
    X : scipy.sparse.csr_matrix
        ``(n_selected, n_genes)`` float32; only the selected rows are read (memory bounded by the selection).
    var : pandas.DataFrame
        As :func:`expression_matrix` (``adata.var`` copy when ``kind`` is None).

    Raises
    ------
    DataError
        Positions out of range or unknown obs names; and as :func:`expression_matrix`.
    """
    rows = _positions(adata, cells)
    if kind is None:
        block = _take_rows(adata.X, rows)
        return sp.csr_matrix(block, dtype=np.float32), adata.var.copy()
    report, source, skind, mat, src_var = _prepare(adata, kind, report)
    block = _normalise_block(_take_rows(mat, rows), kind, source, skind, 0)
    return block, _var_table(src_var, report)


def selection_adata(adata: AnnData, cells) -> AnnData:
    """The selected cells as an in-memory AnnData (only their rows are read from a backed file).

    For analyses that need an in-memory matrix of a selection, e.g. DE on selected cells of a backed atlas:
    ``engine.de_top_vs_bottom(engine.selection_adata(adata, sel), "score_b_cells")`` equals
    ``engine.de_top_vs_bottom(adata_in_memory, "score_b_cells", within=sel)``. Uses anndata's
    ``adata[rows].to_memory()``.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed.
    cells
        Integer positions, a boolean mask ``(n_cells,)`` or obs names; taken in dataset order, each cell once.

    Returns
    -------
    anndata.AnnData
        ``(n_selected, n_genes)``, not backed: ``X``, ``layers`` and ``raw.X`` as scipy CSR (sparse) or ndarrays,
        ``obs``/``obsm`` rows of the selection, ``var`` and ``uns`` copied.

    Raises
    ------
    DataError
        Positions out of range or unknown obs names.
    """
    rows = np.unique(_positions(adata, cells))
    view = adata[rows]
    sub = view.to_memory() if getattr(adata, "isbacked", False) or _is_backed_matrix(adata.X) else view.copy()

    def plain(m):
        if m is None or isinstance(m, np.ndarray):
            return m
        if sp.issparse(m):
            return sp.csr_matrix(m) if m.format == "csr" else sp.csc_matrix(m)
        return _materialise(m)

    sub.X = plain(sub.X)
    for k in list(sub.layers.keys()):
        sub.layers[k] = plain(sub.layers[k])
    if sub.raw is not None and not isinstance(sub.raw.X, (np.ndarray, sp.csr_matrix, sp.csc_matrix)):
        import anndata as ad

        sub.raw = ad.AnnData(X=plain(sub.raw.X), var=sub.raw.var.copy(), obs=sub.obs[[]])
    return sub


def gene_values(
    adata: AnnData,
    gene: str,
    *,
    use_raw: bool | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Expression of one gene in every cell, read in row chunks (backed data never loads whole).

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed.
    gene
        A name in ``raw.var_names`` or ``var_names`` (exact).
    use_raw
        ``None`` (default): ``raw`` when present and it holds the gene, else ``X``; True/False force it.
    chunk_size
        Rows per chunk (default: 20,000 for backed data; in-memory data is read in one piece).
    progress
        tqdm progress bar over chunks.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` float32, the values as stored (no normalisation), the same as ``adata[:, gene].X``.

    Raises
    ------
    engine.errors.MissingKeyError
        The gene is in neither matrix.
    """
    from tqdm.auto import tqdm

    from ..errors import MissingKeyError

    sources = []
    if adata.raw is not None and use_raw is not False:
        sources.append((adata.raw.X, adata.raw.var_names))
    if not use_raw:
        sources.append((adata.X, adata.var_names))
    for mat, names in sources:
        if mat is None or gene not in names:
            continue
        j = names.get_loc(gene)
        j = int(np.flatnonzero(j)[0]) if isinstance(j, np.ndarray) else int(j.start if isinstance(j, slice) else j)
        if not _is_backed_matrix(mat):
            col = mat[:, j]
            col = col.toarray() if sp.issparse(col) else np.asarray(col)
            return np.asarray(col, dtype=np.float32).ravel()
        n = adata.n_obs
        out = np.empty(n, dtype=np.float32)
        step = int(chunk_size or 20_000)
        for first, block in tqdm(_iter_chunks(mat, n, len(names), step), total=-(-n // step), desc=f"Reading {gene}",
                                 unit="chunk", disable=not progress):
            col = block[:, j]
            out[first : first + block.shape[0]] = (col.toarray() if sp.issparse(col) else np.asarray(col)).ravel()
        return out
    raise MissingKeyError(f"Gene {gene!r} is not in this dataset", found=f"{adata.n_vars} genes in var_names"
                          + (f", {adata.raw.n_vars} in raw" if adata.raw is not None else ""),
                          expected="a measured gene name (exact)", fix="check the spelling and case")


def _positions(adata, cells) -> np.ndarray:
    """Integer positions of a selection: mask, positions or obs names."""
    arr = np.asarray(cells)
    n = adata.n_obs
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise DataError("The selection mask has the wrong length", found=arr.shape, expected=f"({n},)")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() >= n:
            raise DataError("Cell positions are out of range", found=f"{arr.min()}..{arr.max()}", expected=f"0..{n - 1}")
        return arr.astype(np.int64)
    pos = adata.obs_names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        raise DataError("Some selected cells are not in the dataset", found=list(arr[pos < 0][:5]),
                        expected="obs names of this dataset")
    return pos.astype(np.int64)
