"""Expression matrices in memory or on disk: sampling rows, row chunks, the matrix kind and one checking pass."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, MatrixKindError
from .report import SOURCE_COUNTS, SOURCE_RAW, SOURCE_X

log = logging.getLogger(__name__)


_SAMPLE_ROWS = 1000  # rows inspected to decide the matrix kind
_INT_TOL = 1e-3  # |x - round(x)| below this counts as an integer ("near-integer" counts)
_MIN_FRAC_INT = 0.99  # share of (near-)integer non-zeros needed to call a matrix "counts"
_LOG_MAX = 30.0  # non-integer data with max below this is taken as log-normalised
_MAX_CHUNK_ELEMENTS = 10_000_000  # rows per chunk * n_genes for dense chunks
_MIN_FRAC_NEGATIVE = 0.01  # share of negative non-zeros from which a matrix is taken as scaled (z-scores)


# --------------------------------------------------------------------------- matrices
def _get_matrix(adata, source: str):
    if source == SOURCE_X:
        return adata.X
    if source == SOURCE_COUNTS:
        return adata.layers["counts"]
    if source == SOURCE_RAW:
        return adata.raw.X
    raise ConfigError("Unknown expression source", found=repr(source), expected=f"{SOURCE_X}, {SOURCE_COUNTS}, raw")


def _get_var(adata, source: str) -> pd.DataFrame:
    return adata.raw.var if source == SOURCE_RAW else adata.var


def _is_backed_matrix(mat) -> bool:
    return not (isinstance(mat, np.ndarray) or sp.issparse(mat))


def is_backed(adata) -> bool:
    """Whether ``adata``'s expression stays on disk (a backed ``.h5ad``, or a ``.zarr`` read with ``backed=True``).

    Parameters
    ----------
    adata
        Any AnnData.

    Returns
    -------
    bool
        True when ``adata.isbacked`` or ``X`` is an on-disk or lazy matrix (anndata's backed sparse dataset, an
        h5py/zarr array or a dask array); engine functions then read it in row chunks.
    """
    if getattr(adata, "isbacked", False):
        return True
    X = getattr(adata, "X", None)
    return X is not None and _is_backed_matrix(X)


def _materialise(block):
    """A row block as CSR (sparse) or a dense ndarray, whatever the matrix type (dask blocks are computed)."""
    if hasattr(block, "compute") and not sp.issparse(block):
        block = block.compute()
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return np.asarray(block)


def _sample_index(n_rows: int, n: int = _SAMPLE_ROWS) -> np.ndarray:
    if n_rows <= n:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, n).astype(np.int64))


def _take_rows(mat, idx: np.ndarray):
    """Rows ``idx`` (any order, repeats allowed) of an in-memory, backed or lazy matrix, in memory."""
    idx = np.asarray(idx, dtype=np.int64)
    if not _is_backed_matrix(mat):
        return _materialise(mat[idx])
    uniq, inverse = np.unique(idx, return_inverse=True)  # on-disk readers want sorted, unique rows
    block = _materialise(mat[uniq])
    if uniq.size == idx.size and (idx.size < 2 or np.all(np.diff(idx) > 0)):
        return block
    return block[inverse]


def _nonzero_values(block) -> np.ndarray:
    if sp.issparse(block):
        vals = np.asarray(block.data)
    else:
        vals = np.asarray(block).ravel()
    return vals[vals != 0]


def _chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size:
        return max(1, int(chunk_size))
    return max(1, min(10_000, _MAX_CHUNK_ELEMENTS // max(n_cols, 1)))


def _iter_chunks(mat, n_rows: int, n_cols: int, chunk_size: int | None = None, ranges=None):
    """Yield ``(start, block)`` row chunks; block is CSR (sparse input) or a dense array.

    ``ranges`` (``[(start, stop), ...]``) limits the rows read (default: all rows, in order).
    """
    step = _chunk_rows(n_cols, chunk_size)
    for lo, hi in (ranges if ranges is not None else [(0, n_rows)]):
        for start in range(lo, hi, step):
            yield start, _materialise(mat[start : min(start + step, hi)])


def _sample_ranges(n_rows: int, n_sample: int, n_blocks: int = 20) -> list[tuple[int, int]]:
    """``n_blocks`` contiguous row ranges spread evenly over ``n_rows``, ``n_sample`` rows in all (cheap to read)."""
    if n_rows <= n_sample:
        return [(0, n_rows)]
    size = max(1, n_sample // n_blocks)
    starts = np.linspace(0, n_rows - size, n_blocks).astype(np.int64)
    return [(int(s), int(s) + size) for s in starts]


def _matrix_stats(mat, n_rows: int) -> dict:
    """Kind of a matrix from a sample of rows: counts, log, normalized, scaled or empty."""
    idx = _sample_index(n_rows)
    vals = _nonzero_values(_take_rows(mat, idx)) if n_rows else np.zeros(0)
    if vals.size == 0 and n_rows > idx.size:  # very sparse: look at a contiguous block too
        vals = _nonzero_values(_take_rows(mat, np.arange(min(n_rows, 20_000))))
    is_int_dtype = np.issubdtype(vals.dtype, np.integer)
    vals = vals[np.isfinite(vals)].astype(np.float64, copy=False)
    if vals.size == 0:
        return {"kind": "empty", "min": 0.0, "max": 0.0, "frac_integer": 1.0}
    vmin, vmax = float(vals.min()), float(vals.max())
    n_neg = int((vals < 0).sum())
    if n_neg >= _MIN_FRAC_NEGATIVE * vals.size:  # z-scores: about half the non-zeros are negative
        frac_int = 1.0 if is_int_dtype else float(np.mean(np.abs(vals - np.rint(vals)) <= _INT_TOL))
        return {"kind": "scaled", "min": vmin, "max": vmax, "frac_integer": frac_int, "n_negative": n_neg,
                "n_sampled": int(vals.size)}
    pos = vals[vals >= 0] if n_neg else vals  # a few stray negatives do not make a matrix scaled
    if pos.size == 0:
        pos = np.abs(vals)
    frac_int = 1.0 if is_int_dtype else float(np.mean(np.abs(pos - np.rint(pos)) <= _INT_TOL))
    if frac_int >= _MIN_FRAC_INT:
        kind = "counts"
    elif float(pos.max()) < _LOG_MAX:
        kind = "log"
    else:
        kind = "normalized"
    return {"kind": kind, "min": vmin, "max": vmax, "frac_integer": frac_int, "n_negative": n_neg,
            "n_sampled": int(vals.size)}


def _describe_kind(stats: dict) -> str:
    """``'counts'`` or ``'counts with 3 negative values in 41,000 sampled non-zeros (min -1)'``."""
    if stats.get("n_negative") and stats["kind"] != "scaled":
        return (f"{stats['kind']} with {stats['n_negative']} negative value(s) in {stats['n_sampled']:,} sampled "
                f"non-zeros (min {stats['min']:.3g})")
    return stats["kind"]


def _choose_source(adata) -> tuple[str, dict, dict, list[str]]:
    """Pick the matrix to use: (source, source_stats, x_stats, notes)."""
    n = adata.n_obs
    notes: list[str] = []
    cands: dict[str, dict] = {}
    x_stats = {"kind": "empty", "min": 0.0, "max": 0.0, "frac_integer": 1.0}
    if adata.X is not None:
        x_stats = _matrix_stats(adata.X, n)
        cands[SOURCE_X] = x_stats
    if "counts" in adata.layers:
        cands[SOURCE_COUNTS] = _matrix_stats(adata.layers["counts"], n)
        if cands[SOURCE_COUNTS]["kind"] != "counts":
            notes.append(f"layers['counts'] holds {cands[SOURCE_COUNTS]['kind']} values, not integer counts")
    if adata.raw is not None:
        cands[SOURCE_RAW] = _matrix_stats(adata.raw.X, n)
    order = [(s, "counts") for s in (SOURCE_X, SOURCE_COUNTS, SOURCE_RAW)]
    order += [(s, k) for s in (SOURCE_X, SOURCE_COUNTS, SOURCE_RAW) for k in ("log", "normalized")]
    for src, kind in order:
        if src in cands and cands[src]["kind"] == kind and not cands[src].get("n_negative"):
            if src != SOURCE_X:
                notes.append(f"X holds {_describe_kind(x_stats)} values; using {src} ({kind})")
            return src, cands[src], x_stats, notes
    # nothing usable
    parts = [f"X: {_describe_kind(x_stats)} (min {x_stats['min']:.3g}, max {x_stats['max']:.3g})"
             if adata.X is not None else "X: None"]
    parts.append(f"layers['counts']: {_describe_kind(cands[SOURCE_COUNTS])}" if SOURCE_COUNTS in cands
                 else "no layers['counts']")
    parts.append(f"adata.raw: {_describe_kind(cands[SOURCE_RAW])}" if SOURCE_RAW in cands else "no adata.raw")
    if all(c["kind"] == "empty" for c in cands.values()):
        raise DataError(
            "The expression matrix holds no non-zero values",
            found="; ".join(parts),
            expected="counts or log-normalised expression with non-zero entries",
            fix="check that the right file or layer was loaded.",
        )
    if not any(c["kind"] == "scaled" for c in cands.values()):
        raise DataError(
            "The expression matrix holds negative values, so its genes cannot be ranked; it is not scaled "
            "(z-scored): only a few values are negative",
            found="; ".join(parts),
            expected="non-negative counts or log-normalised values (rank encoding orders each cell's genes by "
            "expression; a negative count or log value is a data error)",
            fix="find and fix the negative entries (e.g. adata.X.min(), or (adata.X < 0).nonzero()), or set them to "
            "0 if they are artefacts of a correction step; or provide the raw counts in layers['counts'].",
        )
    raise MatrixKindError(
        "adata.X holds scaled (z-scored) values and there is no unscaled matrix to fall back on",
        found="; ".join(parts),
        expected="raw counts or log-normalised values: rank encoding orders each cell's genes by expression, "
        "which needs counts (or log-normalised values); scaling changes that order",
        fix="keep the counts before normalising and scaling, e.g. adata.layers['counts'] = adata.X.copy() right "
        "after loading (or adata.raw = adata before sc.pp.scale), or load the unscaled file.",
    )


def _scan(mat, n_rows: int, n_cols: int, *, kind: str, where: str, obs_names, var_names,
          want_totals: bool = True, forbid_negative: bool = False, ranges=None) -> np.ndarray | None:
    """One pass over ``mat``: raise on NaN/inf (and negatives if asked), return per-gene totals (linear scale)."""
    totals = np.zeros(n_cols, dtype=np.float64) if want_totals else None
    n_nan = n_inf = 0
    bad_rows: set[int] = set()
    bad_cols: set[int] = set()
    n_neg = 0
    neg_ex: list[tuple[int, int, float]] = []
    for start, block in _iter_chunks(mat, n_rows, n_cols, ranges=ranges):
        if forbid_negative:
            if sp.issparse(block):
                neg = block.data < 0
                if neg.any():
                    n_neg += int(neg.sum())
                    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[neg]
                    neg_ex += list(zip((rows + start).tolist(), block.indices[neg].tolist(), block.data[neg].tolist()))[:3]
            else:
                r, c = np.nonzero(np.asarray(block) < 0)
                if r.size:
                    n_neg += int(r.size)
                    neg_ex += [(int(i) + start, int(j), float(np.asarray(block)[i, j])) for i, j in zip(r[:3], c[:3])]
        if sp.issparse(block):
            data = block.data
            bad = ~np.isfinite(data)
            if bad.any():
                n_nan += int(np.isnan(data[bad]).sum())
                n_inf += int(np.isinf(data[bad]).sum())
                rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[bad] + start
                bad_rows.update(np.unique(rows).tolist())
                bad_cols.update(np.unique(block.indices[bad]).tolist())
            if want_totals:
                vals = np.where(bad, 0.0, data.astype(np.float64))
                if kind == "log":
                    np.expm1(vals, out=vals)
                totals += np.bincount(block.indices, weights=vals, minlength=n_cols)
        else:
            arr = np.asarray(block, dtype=np.float64)
            bad = ~np.isfinite(arr)
            if bad.any():
                n_nan += int(np.isnan(arr).sum())
                n_inf += int(np.isinf(arr).sum())
                r, c = np.nonzero(bad)
                bad_rows.update(np.unique(r + start).tolist())
                bad_cols.update(np.unique(c).tolist())
                arr[bad] = 0.0
            if want_totals:
                if kind == "log":
                    np.expm1(arr, out=arr)
                totals += arr.sum(axis=0)
    if n_neg:
        ex = [f"{obs_names[i]} / {var_names[j]}: {v:.3g}" for i, j, v in neg_ex[:3]]
        raise DataError(
            f"The {where} matrix holds {n_neg} negative value(s) among {kind} values, so its genes cannot be ranked",
            found=f"{kind} with {n_neg} negative value(s), e.g. {ex} (too few for scaled, z-scored data)",
            expected="non-negative counts or log-normalised values",
            fix="fix or zero the negative entries, or provide the raw counts in layers['counts'].",
        )
    if n_nan or n_inf:
        rows = sorted(bad_rows)
        cols = sorted(bad_cols)
        cell_ex = [str(obs_names[i]) for i in rows[:3]]
        gene_ex = [str(var_names[j]) for j in cols[:3]]
        raise DataError(
            f"The {where} matrix holds {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} inf)",
            found=f"non-finite values in {where}, in {len(rows)} cells (e.g. {cell_ex}) and {len(cols)} genes "
            f"(e.g. {gene_ex})",
            expected="finite numbers only (counts or log-normalised expression)",
            fix="drop or fix those cells/genes, or rebuild the matrix from the raw counts "
            "(NaN often comes from dividing by a zero library size).",
        )
    return totals


# --------------------------------------------------------------------------- gene mapping
