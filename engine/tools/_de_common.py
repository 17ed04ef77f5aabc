"""The pieces behind :mod:`engine.tools.de`: reading and log-normalising the selected rows, turning selections
and scores into masks, running scanpy's test on a small copy, and storing the result.
"""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import AnalysisError, DataError, MatrixKindError, MissingKeyError
from ..io.matrix import _is_backed_matrix, _iter_chunks, _take_rows

log = logging.getLogger(__name__)

Method = Literal["wilcoxon", "t-test"]
_METHODS = ("wilcoxon", "t-test")
_MIN_CELLS = 6  # below this, top-vs-bottom (3 vs 3) is impossible
_MIN_N = 3
_TARGET_SUM = 1e4
_N_TOP_GENES_UNS = 100


# --------------------------------------------------------------------------- matrices
def _matrix_kind(X, max_values: int = 200_000) -> str:
    """Classify a matrix as ``"counts"``, ``"log"`` or ``"scaled"`` from a sample of values.

    Negative values mean scaled (z-scored) data; all-integer non-negative values mean
    raw counts; anything else is taken as log-normalised. Looks at the stored values
    of the first rows only (at most ``max_values`` of them), so it is cheap.
    """
    block = _take_rows(X, np.arange(min(X.shape[0], 500)))  # in memory, backed (on disk) or dask alike
    vals = block.data[:max_values] if sp.issparse(block) else np.asarray(block).ravel()[:max_values]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return "log"
    if vals.min() < 0:
        return "scaled"
    if np.all(np.equal(np.mod(vals, 1), 0)):
        return "counts"
    return "log"


def _source_matrix(adata, layer: str | None):
    """Pick the matrix to test and say what it is.

    Returns
    -------
    (matrix, var_names, kind, source) with kind ``"counts"`` or ``"log"``.
    """
    if layer is not None:
        if layer not in adata.layers:
            raise MissingKeyError(
                f"Layer {layer!r} is not in adata.layers",
                found=sorted(adata.layers.keys()) or "no layers",
                expected="a layer holding counts or log-normalised expression",
                fix="pass layer=None to use X (or adata.raw when X is scaled), or one of the listed layers.",
            )
        M = adata.layers[layer]
        kind = _matrix_kind(M)
        if kind == "scaled":
            raise MatrixKindError(
                f"Layer {layer!r} holds scaled values (negative numbers), which DE cannot use",
                found="negative values",
                expected="raw counts or log1p-normalised expression",
                fix="pass a counts or log-normalised layer, or layer=None.",
            )
        return M, adata.var_names, kind, f"layers[{layer!r}] ({kind})"
    kind = _matrix_kind(adata.X)
    if kind != "scaled":
        return adata.X, adata.var_names, kind, f"X ({kind})"
    if adata.raw is not None:
        rkind = _matrix_kind(adata.raw.X)
        if rkind != "scaled":
            return adata.raw.X, adata.raw.var_names, rkind, f"raw.X ({rkind}; X is scaled)"
    raise MatrixKindError(
        "X holds scaled values and there is no usable adata.raw, so DE has no log-normalised expression to test",
        found="negative values in X, adata.raw absent or scaled",
        expected="counts or log1p-normalised values in X, a layer, or adata.raw",
        fix="keep the log-normalised matrix in adata.raw (adata.raw = adata before sc.pp.scale) or in a layer "
        "and pass layer=...",
    )


def _log_rows(M, rows: np.ndarray, kind: str):
    """Log-normalised float32 copy of the given rows (CSR when sparse); never a view of ``M``.

    Only these rows are read, also from a backed (on-disk) matrix.
    """
    sub = _take_rows(M, np.asarray(rows))
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub, dtype=np.float32, copy=True)
        sub.eliminate_zeros()
    else:
        sub = np.array(sub, dtype=np.float32, copy=True)
    if kind == "counts":
        totals = np.asarray(sub.sum(axis=1)).ravel()
        scale = np.divide(_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
        if sp.issparse(sub):
            sub = sp.diags(scale) @ sub
            sub = sp.csr_matrix(sub)
            np.log1p(sub.data, out=sub.data)
        else:
            sub *= scale[:, None]
            np.log1p(sub, out=sub)
    return sub


def _gene_vector(adata, gene: str, layer: str | None) -> np.ndarray | None:
    """Log-normalised expression of one gene in every cell, shape (n_obs,); None if the gene is absent.

    Looks in the matrix DE would use and, when the gene is not there (e.g. X holds
    highly variable genes only), in a usable ``adata.raw``.
    """
    M, names, kind, _ = _source_matrix(adata, layer)
    hits = np.flatnonzero(np.asarray(names).astype(str) == gene)
    if hits.size == 0 and layer is None and adata.raw is not None and M is not adata.raw.X:
        rkind = _matrix_kind(adata.raw.X)
        if rkind != "scaled":
            M, names, kind = adata.raw.X, adata.raw.var_names, rkind
            hits = np.flatnonzero(np.asarray(names).astype(str) == gene)
    if hits.size == 0:
        return None
    j = int(hits[0])
    if _is_backed_matrix(M):  # on disk: one pass over row chunks for the column and the totals together
        col = np.zeros(M.shape[0], dtype=np.float64)
        totals = np.zeros(M.shape[0], dtype=np.float64)
        for start, block in _iter_chunks(M, M.shape[0], M.shape[1]):
            stop = start + block.shape[0]
            c = block[:, j]
            col[start:stop] = np.asarray(c.toarray() if sp.issparse(c) else c, dtype=np.float64).ravel()
            totals[start:stop] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    else:
        col = M[:, j]
        col = np.asarray(col.toarray() if sp.issparse(col) else col, dtype=np.float64).ravel()
        totals = np.asarray(M.sum(axis=1), dtype=np.float64).ravel() if kind == "counts" else None
    if kind == "counts":
        col = np.log1p(np.divide(col * _TARGET_SUM, totals, out=np.zeros_like(col), where=totals > 0))
    return col


# --------------------------------------------------------------------------- selections
def _to_mask(adata, sel, what: str) -> np.ndarray:
    """Turn a selection into a boolean mask of length ``n_obs``.

    Accepts a boolean array-like (length ``n_obs``), a boolean ``pd.Series`` indexed by
    ``obs_names``, a list of ``obs_names``, an integer index array, or the name of a boolean
    ``obs`` column.
    """
    n = adata.n_obs
    if isinstance(sel, str):
        if sel not in adata.obs.columns:
            raise MissingKeyError(
                f"{what}: {sel!r} is not an obs column",
                found=f"{adata.obs.shape[1]} obs columns",
                expected="a boolean obs column, a boolean mask or a list of obs names",
                fix="pass a boolean array of length n_obs, or the name of a boolean column in adata.obs.",
            )
        col = adata.obs[sel]
        if col.dtype != bool:
            raise DataError(
                f"{what}: obs column {sel!r} is not boolean",
                found=str(col.dtype),
                expected="a boolean column (True for the selected cells)",
                fix=f"pass a comparison instead, e.g. adata.obs[{sel!r}] == 'some value'.",
            )
        sel = col
    if isinstance(sel, pd.Series) and sel.dtype == bool and not sel.index.equals(adata.obs_names):
        sel = sel.reindex(adata.obs_names, fill_value=False)
    arr = np.asarray(sel)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise DataError(
                f"{what}: the boolean mask has the wrong length",
                found=arr.shape,
                expected=f"({n},), one entry per cell",
                fix="build the mask over all cells of adata, e.g. adata.obs['x'] == 'y'.",
            )
        return arr.copy()
    if arr.dtype.kind in "iu":
        mask = np.zeros(n, dtype=bool)
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise DataError(f"{what}: integer cell indices out of range", found=(arr.min(), arr.max()),
                            expected=f"indices in [0, {n})", fix="pass positions of cells in adata.")
        mask[arr] = True
        return mask
    if arr.dtype.kind in "OUS":
        idx = adata.obs_names.get_indexer(pd.Index(arr.astype(str)))
        missing = int((idx < 0).sum())
        if missing:
            raise MissingKeyError(
                f"{what}: {missing} of {arr.size} cell names are not in adata.obs_names",
                found=list(arr[idx < 0][:5]),
                expected="names from adata.obs_names",
                fix="select cells from this AnnData, or pass a boolean mask.",
            )
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        return mask
    raise DataError(f"{what}: cannot interpret the selection", found=type(sel).__name__,
                    expected="boolean mask, obs names, integer positions or a boolean obs column",
                    fix="pass e.g. adata.obs['cell_type'] == 'B cell'.")


def _resolve_scores(adata, scores, layer) -> tuple[np.ndarray, str]:
    if isinstance(scores, str):
        if scores in adata.obs.columns:
            vals = pd.to_numeric(adata.obs[scores], errors="coerce").to_numpy(dtype=np.float64)
            return vals, f"obs[{scores!r}]"
        vec = _gene_vector(adata, scores, layer)
        if vec is not None:
            return vec, f"expression of {scores}"
        raise MissingKeyError(
            f"Score {scores!r} is neither an obs column nor a gene",
            found=f"{adata.obs.shape[1]} obs columns, {adata.n_vars} genes",
            expected="an obs column with numbers (e.g. a query score), a gene in var_names, or an array",
            fix="score the cells first (engine.tools.score.score_text) or check the spelling; "
            "pass an array of length n_obs to use any other score.",
        )
    vals = np.asarray(scores, dtype=np.float64).ravel()
    if vals.shape != (adata.n_obs,):
        raise DataError("The score array has the wrong length", found=vals.shape,
                        expected=f"({adata.n_obs},), one score per cell",
                        fix="pass one score per cell of adata, in obs order.")
    return vals, "array"


# --------------------------------------------------------------------------- core test
def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise AnalysisError(f"Unknown DE method {method!r}", found=method, expected=" or ".join(_METHODS),
                            fix='use method="wilcoxon" (rank-sum) or method="t-test" (Welch).')


def _run_test(adata, rows_a: np.ndarray, rows_b: np.ndarray, labels: tuple[str, str], *, method: str,
              layer: str | None, gene_symbols: str | None) -> tuple[pd.DataFrame, dict]:
    """Test rows_a vs rows_b on a fresh log-normalised copy; return the tidy table and info."""
    import anndata as ad
    import scanpy as sc

    M, var_names, kind, source = _source_matrix(adata, layer)
    names = pd.Index(var_names).astype(str)
    if gene_symbols is not None:
        var = adata.raw.var if source.startswith("raw") else adata.var
        if gene_symbols not in var.columns:
            raise MissingKeyError(f"gene_symbols={gene_symbols!r} is not a var column",
                                  found=list(var.columns)[:10], expected="a var column with gene symbols",
                                  fix="pass gene_symbols=None to report var_names.")
        symbols = var[gene_symbols].astype(str).to_numpy()
    rows = np.concatenate([rows_a, rows_b])
    X = _log_rows(M, rows, kind)
    la, lb = labels
    n_a, n_b = len(rows_a), len(rows_b)
    # Group sums and detection counts per gene, in one pass over the stored values.
    if sp.issparse(X):
        split = X.indptr[n_a]
        ia, ib = X.indices[:split], X.indices[split:]
        nnz_a = np.bincount(ia, minlength=X.shape[1])
        nnz_b = np.bincount(ib, minlength=X.shape[1])
        sum_a = np.bincount(ia, weights=X.data[:split], minlength=X.shape[1])
        sum_b = np.bincount(ib, weights=X.data[split:], minlength=X.shape[1])
    else:
        nnz_a, nnz_b = (X[:n_a] != 0).sum(axis=0), (X[n_a:] != 0).sum(axis=0)
        sum_a, sum_b = X[:n_a].sum(axis=0, dtype=np.float64), X[n_a:].sum(axis=0, dtype=np.float64)
    # Genes with no expression in either group carry no information; they are left out
    # (they only slow the test and give NaN statistics for the t-test).
    keep = np.flatnonzero((nnz_a + nnz_b) > 0)
    if keep.size == 0:
        raise AnalysisError("None of the genes is expressed in the selected cells",
                            found=f"{len(rows)} cells, 0 expressed genes", expected="some non-zero expression",
                            fix="check that the selection and the matrix are the intended ones.")
    if keep.size < X.shape[1]:
        X = X[:, keep]
    grp = pd.Categorical([la] * n_a + [lb] * n_b, categories=[la, lb])
    sub = ad.AnnData(X=X, obs=pd.DataFrame({"_lexicell_group": grp}, index=np.arange(len(rows)).astype(str)),
                     var=pd.DataFrame(index=np.arange(keep.size).astype(str)))  # positional names: safe with duplicates
    sub.uns["log1p"] = {"base": None}
    sc.tl.rank_genes_groups(sub, "_lexicell_group", groups=[la], reference=lb, method=method, use_raw=False,
                            n_genes=keep.size, corr_method="benjamini-hochberg",
                            tie_correct=(method == "wilcoxon"), key_added="_de")
    r = sub.uns["_de"]
    g = keep[np.asarray(r["names"][la]).astype(np.int64)]  # positions in var_names
    score = np.nan_to_num(np.asarray(r["scores"][la], dtype=np.float64), nan=0.0)
    res = result_frame(
        labels, names[g] if gene_symbols is None else symbols[g],
        logfoldchange=r["logfoldchanges"][la], score=score,
        pval=np.nan_to_num(np.asarray(r["pvals"][la], dtype=np.float64), nan=1.0),
        pval_adj=np.nan_to_num(np.asarray(r["pvals_adj"][la], dtype=np.float64), nan=1.0),
        mean=(sum_a[g] / n_a, sum_b[g] / n_b), pct=(nnz_a[g] / n_a, nnz_b[g] / n_b),
        gene_id=names[g] if gene_symbols is not None else None)
    res = res.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    info = {"matrix": source, "n_genes_tested": int(keep.size), "n_genes_total": int(len(names))}
    return res, info


def result_frame(labels: tuple[str, str], gene, *, logfoldchange, score, pval, pval_adj, mean: tuple, pct: tuple,
                 gene_id=None) -> pd.DataFrame:
    """The DE result table of two groups ``labels = (a, b)``, one row per gene (the order given): ``gene``
    (object), [``gene_id``,] ``logfoldchange``, ``score``, ``pval``, ``pval_adj``, ``mean_<a>``, ``mean_<b>``,
    ``pct_<a>``, ``pct_<b>`` (float64) and ``direction`` (categorical ``up``/``down``, the sign of ``score``).
    Empty arrays give the empty table of the same columns and dtypes."""
    la, lb = labels
    score = np.asarray(score, dtype=np.float64)
    res = pd.DataFrame({
        "gene": np.asarray(gene, dtype=object),
        "logfoldchange": np.asarray(logfoldchange, dtype=np.float64),
        "score": score,
        "pval": np.asarray(pval, dtype=np.float64),
        "pval_adj": np.asarray(pval_adj, dtype=np.float64),
        "mean_" + la: np.asarray(mean[0], dtype=np.float64),
        "mean_" + lb: np.asarray(mean[1], dtype=np.float64),
        "pct_" + la: np.asarray(pct[0], dtype=np.float64),
        "pct_" + lb: np.asarray(pct[1], dtype=np.float64),
        "direction": pd.Categorical(np.where(score > 0, "up", "down"), categories=["up", "down"]),
    })
    if gene_id is not None:
        res.insert(1, "gene_id", np.asarray(gene_id, dtype=object))
    return res


def empty_result(labels: tuple[str, str], *, gene_ids: bool = False) -> pd.DataFrame:
    """The columns and dtypes of a DE result of groups ``labels`` (:func:`result_frame`), with no rows."""
    none = np.zeros(0)
    return result_frame(labels, np.zeros(0, dtype=object), logfoldchange=none, score=none, pval=none,
                        pval_adj=none, mean=(none, none), pct=(none, none),
                        gene_id=np.zeros(0, dtype=object) if gene_ids else None)


def _store(adata, key_added: str, labels: tuple[str, str], rows_a, rows_b, res: pd.DataFrame, params: dict) -> None:
    la, lb = labels
    member = np.full(adata.n_obs, "other", dtype=object)
    member[rows_a] = la
    member[rows_b] = lb
    adata.obs[key_added] = pd.Categorical(member, categories=[la, lb, "other"])
    up = res.loc[res["direction"] == "up", "gene"].head(_N_TOP_GENES_UNS).tolist()
    down = res.loc[res["direction"] == "down", "gene"].iloc[::-1].head(_N_TOP_GENES_UNS).tolist()
    table = res.copy()
    table["direction"] = table["direction"].astype(str)
    adata.uns[key_added] = {
        "params": {k: v for k, v in params.items() if v is not None},
        "up_genes": np.asarray(up, dtype=object),
        "down_genes": np.asarray(down, dtype=object),
        "table": table,
    }


def _finish(res: pd.DataFrame, attrs: dict) -> pd.DataFrame:
    res.attrs.update(attrs)
    return res
