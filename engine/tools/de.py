"""Differential expression: top-vs-bottom cells by a score, and two selections.

CellWhisperer (Schaefer et al., 2024, Fig. 3e) ranks cells by their similarity to
a free-text query, takes the top 1,000 and bottom 1,000 cells and runs a
differential-expression test between them; the up-regulated genes then go to
Enrichr. :func:`de_top_vs_bottom` implements that step for any per-cell score
(a query score in ``obs``, an array, or one gene's expression), and
:func:`de_groups` is the general two-selection form (A vs B, or A vs rest).

Both run :func:`scanpy.tl.rank_genes_groups` (Wilcoxon rank-sum or Welch's
t-test, Benjamini-Hochberg FDR) on a small *copy* of the selected cells'
log-normalised expression; the user's matrices are never modified. Results go
to ``adata.obs[key_added]`` (group membership) and ``adata.uns[key_added]``
(parameters, top genes, full table), and come back as a tidy DataFrame.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import AnalysisError, DataError, EmptySelectionError
from ._de_common import (_MIN_CELLS, _MIN_N, Method, _check_method, _finish, _resolve_scores, _run_test, _store,
                         _to_mask, empty_result)

__all__ = ["de_top_vs_bottom", "de_groups", "empty_de_table"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- public API
def de_top_vs_bottom(
    adata,
    scores,
    *,
    n: int = 1000,
    fraction: float | None = None,
    within=None,
    method: Method = "wilcoxon",
    layer: str | None = None,
    gene_symbols: str | None = None,
    key_added: str = "de_top_vs_bottom",
) -> pd.DataFrame:
    """Differential expression between the top-n and bottom-n cells by a score.

    Implements the step of CellWhisperer (Schaefer et al., 2024, Fig. 3e) that
    compares the 1,000 cells best matching a free-text query with the 1,000 worst
    matching ones. Cells are ranked inside ``within`` (all cells by default); cells
    with a NaN score are left out (reported in ``attrs["n_nan"]``). The test runs on
    a copy of the ``2 n`` selected cells' log-normalised expression:

    * ``X`` when it holds log-normalised values, or counts, which are normalised to
      10,000 per cell and log1p-transformed on the copy;
    * ``adata.raw`` when ``X`` is scaled (has negative values);
    * ``adata.layers[layer]`` when ``layer`` is given.

    Parameters
    ----------
    adata
        AnnData, ``n_obs`` cells x ``n_vars`` genes. Not modified except for the
        two keys below.
    scores
        Per-cell score: a float array of shape ``(n_obs,)``, the name of a numeric
        ``obs`` column (e.g. a query score), or a gene name (its log-normalised
        expression). Higher = more "top".
    n
        Number of top and of bottom cells (each). Ignored when ``fraction`` is set.
        Must be >= 3. When the ranked subset has fewer than ``2 n`` cells, ``n`` is
        reduced to ``floor(len / 2)`` with a logged warning, reported in
        ``attrs["n_used"]`` and ``attrs["reduced_from"]``.
    fraction
        Alternative to ``n``: take this fraction (0 < fraction <= 0.5) of the ranked
        subset at each end, e.g. 0.03 for the top 3 % vs the bottom 3 %.
    within
        Optional selection to rank inside: boolean mask of length ``n_obs``, list of
        obs names, integer positions, or the name of a boolean ``obs`` column.
    method
        ``"wilcoxon"`` (rank-sum with tie correction) or ``"t-test"`` (Welch).
    layer
        Take expression from ``adata.layers[layer]`` (counts or log-normalised).
    gene_symbols
        Optional ``var`` column with symbols to report in ``gene`` (var_names then go
        to a ``gene_id`` column); useful when var_names are Ensembl IDs.
    key_added
        Key for ``adata.obs`` and ``adata.uns``.

    Returns
    -------
    pandas.DataFrame
        One row per gene expressed in at least one selected cell, sorted by
        ``score`` descending (most up in top first): ``gene``, ``logfoldchange``
        (scanpy's: ``log2((expm1(mean_top) + 1e-9) / (expm1(mean_bottom) + 1e-9))``,
        so a gene absent from one group gets a large value, e.g. 30), ``score`` (z-score of the rank-sum or Welch t statistic), ``pval``,
        ``pval_adj`` (Benjamini-Hochberg over the tested genes), ``mean_top``,
        ``mean_bottom`` (mean log1p expression), ``pct_top``, ``pct_bottom``
        (fraction of cells with expression > 0), ``direction`` (``"up"`` when the
        statistic is positive, i.e. higher in the top cells, else ``"down"``).
        ``attrs``: ``n_used``, ``reduced_from`` (None unless n was reduced),
        ``n_ranked``, ``n_nan``, ``method``, ``matrix``, ``key_added``,
        ``n_genes_tested``, ``messages``.

    Sets
    ----
    ``adata.obs[key_added]``: categorical ``"top"``/``"bottom"``/``"other"``.
    ``adata.uns[key_added]``: ``params`` (dict), ``up_genes``/``down_genes``
    (first 100 each), ``table`` (the returned DataFrame).

    Raises
    ------
    MissingKeyError
        ``scores`` names neither an obs column nor a gene; bad ``within`` name.
    DataError
        Score array of the wrong length, or every score in the subset is NaN.
    AnalysisError
        ``n < 3``, ``fraction`` outside (0, 0.5] or giving fewer than 3 cells, or an
        unknown ``method``.
    EmptySelectionError
        Fewer than 6 cells with a score in the subset.
    MatrixKindError
        Only scaled expression is available.
    """
    _check_method(method)
    if fraction is None and (not isinstance(n, (int, np.integer)) or n < _MIN_N):
        raise AnalysisError(f"n must be an integer >= {_MIN_N} cells per group", found=n,
                            expected=f">= {_MIN_N}", fix="use n=1000 (as CellWhisperer) or at least n=3.")
    if fraction is not None and not (0 < fraction <= 0.5):
        raise AnalysisError("fraction must lie in (0, 0.5]", found=fraction, expected="e.g. 0.03 (top 3 %)",
                            fix="pass a fraction up to 0.5, or use n=.")
    vals, score_source = _resolve_scores(adata, scores, layer)
    mask = np.ones(adata.n_obs, dtype=bool) if within is None else _to_mask(adata, within, "within")
    n_subset = int(mask.sum())
    nan_in = mask & ~np.isfinite(vals)
    n_nan = int(nan_in.sum())
    messages: list[str] = []
    if n_subset and n_nan == n_subset:
        raise DataError("Every score in the selected cells is NaN", found=f"{n_nan} NaN scores",
                        expected="finite scores", fix="compute the score first, or choose other cells.")
    if n_nan:
        msg = f"{n_nan} cells with a NaN score were left out of the ranking."
        messages.append(msg)
        log.info(msg)
    valid = np.flatnonzero(mask & np.isfinite(vals))
    n_ranked = len(valid)
    if n_ranked < _MIN_CELLS:
        raise EmptySelectionError("Too few cells to compare top and bottom", found=f"{n_ranked} cells with a score",
                                  expected=f"at least {_MIN_CELLS} (3 top + 3 bottom)",
                                  fix="widen the selection (within=) or score more cells.")
    if fraction is not None:
        n_req = int(np.floor(fraction * n_ranked))
        if n_req < _MIN_N:
            raise AnalysisError(f"fraction={fraction} of {n_ranked} cells gives only {n_req} cells per group",
                                found=n_req, expected=f">= {_MIN_N}", fix="increase fraction or use n=.")
    else:
        n_req = int(n)
    n_used, reduced_from = n_req, None
    if 2 * n_req > n_ranked:
        n_used, reduced_from = n_ranked // 2, n_req
        msg = (f"Only {n_ranked} ranked cells, fewer than 2 x {n_req}; "
               f"comparing top {n_used} vs bottom {n_used} instead.")
        messages.append(msg)
        log.warning(msg)
    order = valid[np.argsort(-vals[valid], kind="stable")]
    rows_top = np.sort(order[:n_used])
    rows_bottom = np.sort(order[-n_used:])
    labels = ("top", "bottom")
    res, info = _run_test(adata, rows_top, rows_bottom, labels, method=method, layer=layer,
                          gene_symbols=gene_symbols)
    params = {
        "scores": score_source, "n": int(n) if fraction is None else None, "fraction": fraction,
        "n_used": int(n_used), "reduced_from": reduced_from, "n_ranked": n_ranked, "n_nan": n_nan,
        "n_within": n_subset if within is not None else None, "method": method, "layer": layer,
        "score_top_min": float(vals[rows_top].min()), "score_bottom_max": float(vals[rows_bottom].max()),
        **info,
    }
    _store(adata, key_added, labels, rows_top, rows_bottom, res, params)
    return _finish(res, {
        "n_used": int(n_used), "reduced_from": reduced_from, "n_ranked": n_ranked, "n_nan": n_nan,
        "method": method, "key_added": key_added, "scores": score_source, "messages": messages, **info,
    })


def empty_de_table(*, gene_symbols: bool = False) -> pd.DataFrame:
    """The table :func:`de_top_vs_bottom` returns, with its columns and dtypes but no rows: for a view that shows
    the result's columns before the first run (and then only replaces the rows).

    Parameters
    ----------
    gene_symbols
        Whether the run passes ``gene_symbols`` (the table then has a ``gene_id`` column after ``gene``).

    Returns
    -------
    pandas.DataFrame
        0 rows; ``gene`` (object), [``gene_id`` (object),] ``logfoldchange``, ``score``, ``pval``, ``pval_adj``,
        ``mean_top``, ``mean_bottom``, ``pct_top``, ``pct_bottom`` (float64), ``direction`` (categorical
        ``up``/``down``).
    """
    return empty_result(("top", "bottom"), gene_ids=gene_symbols)


def de_groups(
    adata,
    group_a,
    group_b=None,
    *,
    method: Method = "wilcoxon",
    layer: str | None = None,
    gene_symbols: str | None = None,
    max_cells: int | None = None,
    random_state: int = 0,
    key_added: str = "de_groups",
) -> pd.DataFrame:
    """Differential expression between two selections of cells (A vs B, or A vs rest).

    The two-selection comparison of CellWhisperer's CELLxGENE interface (there a
    Welch t-test with Bonferroni correction; here Wilcoxon or Welch with
    Benjamini-Hochberg FDR, through :func:`scanpy.tl.rank_genes_groups`). The
    expression matrix is chosen as in :func:`de_top_vs_bottom`.

    Parameters
    ----------
    adata
        AnnData, ``n_obs`` x ``n_vars``.
    group_a, group_b
        Selections: boolean masks of length ``n_obs``, lists of obs names, integer
        positions or names of boolean ``obs`` columns. ``group_b=None`` compares A
        with all other cells ("rest").
    method
        ``"wilcoxon"`` or ``"t-test"`` (Welch).
    layer, gene_symbols
        As in :func:`de_top_vs_bottom`.
    max_cells
        Optional cap on cells per group; larger groups are randomly subsampled
        (seeded by ``random_state``) and the sizes are reported in ``attrs``.
    random_state
        Seed of the subsampling.
    key_added
        Key for ``adata.obs`` (categorical ``"A"``/``"B"`` or ``"rest"``/``"other"``)
        and ``adata.uns`` (as in :func:`de_top_vs_bottom`).

    Returns
    -------
    pandas.DataFrame
        Same columns as :func:`de_top_vs_bottom` with ``mean_A``/``mean_B``
        (``mean_rest``) and ``pct_A``/``pct_B`` (``pct_rest``); ``direction`` is
        ``"up"`` when higher in A. ``attrs``: ``n_a``, ``n_b``, ``subsampled``,
        ``method``, ``matrix``, ``key_added``, ``messages``.

    Raises
    ------
    AnalysisError
        The groups overlap (the message gives the number of shared cells), or the
        method is unknown.
    EmptySelectionError
        A group has fewer than 3 cells.
    MissingKeyError, DataError
        A selection cannot be interpreted.
    """
    _check_method(method)
    mask_a = _to_mask(adata, group_a, "group_a")
    if group_b is None:
        mask_b = ~mask_a
        labels = ("A", "rest")
    else:
        mask_b = _to_mask(adata, group_b, "group_b")
        labels = ("A", "B")
        overlap = int((mask_a & mask_b).sum())
        if overlap:
            raise AnalysisError(f"The two groups share {overlap} cells", found=f"{overlap} overlapping cells "
                                f"(A: {int(mask_a.sum())}, B: {int(mask_b.sum())})",
                                expected="disjoint selections",
                                fix="remove the shared cells from one group, or pass group_b=None for A vs rest.")
    for lab, m in zip(labels, (mask_a, mask_b)):
        if m.sum() < _MIN_N:
            raise EmptySelectionError(f"Group {lab} has too few cells", found=int(m.sum()),
                                      expected=f"at least {_MIN_N} cells", fix="select more cells.")
    rows_a, rows_b = np.flatnonzero(mask_a), np.flatnonzero(mask_b)
    messages: list[str] = []
    subsampled = False
    if max_cells is not None:
        rng = np.random.default_rng(random_state)
        new = []
        for lab, rows in zip(labels, (rows_a, rows_b)):
            if len(rows) > max_cells:
                msg = f"Group {lab}: {len(rows)} cells randomly subsampled to {max_cells} (random_state={random_state})."
                messages.append(msg)
                log.info(msg)
                rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
                subsampled = True
            new.append(rows)
        rows_a, rows_b = new
    res, info = _run_test(adata, rows_a, rows_b, labels, method=method, layer=layer, gene_symbols=gene_symbols)
    params = {"n_a": len(rows_a), "n_b": len(rows_b), "reference": labels[1], "method": method, "layer": layer,
              "max_cells": max_cells, "subsampled": subsampled, **info}
    _store(adata, key_added, labels, rows_a, rows_b, res, params)
    return _finish(res, {"n_a": len(rows_a), "n_b": len(rows_b), "subsampled": subsampled, "method": method,
                         "key_added": key_added, "messages": messages, **info})
