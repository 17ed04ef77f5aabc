"""Gene-set enrichment of a gene list: offline (shipped GMT libraries) and online (Enrichr).

CellWhisperer sends the top up-regulated genes of a top-vs-bottom comparison to
Enrichr (Chen et al., 2013; ``gseapy.enrichr`` with KEGG 2021 and GO 2023 libraries
in the paper's notebooks). Lexicell runs the same over-representation analysis
offline with :func:`gseapy.enrich` (one-sided hypergeometric test) on the libraries
shipped in ``assets/genesets`` (see :mod:`engine.io.genesets`), and can add the online
Enrichr result when the service answers in time. It never hangs: the online call
runs in a daemon thread with a deadline and falls back to the offline result with a
message.

Gene symbols are matched case-insensitively by upper-casing the query, the
background and the libraries (HGNC symbols are upper case; mouse symbols such as
``Cd79a`` then match the human ``CD79A``, which holds for most one-to-one
orthologues but is not an orthology mapping).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError, EmptySelectionError
from ..io.genesets import DEFAULT_LIBRARIES, load_library

__all__ = ["enrich", "ENRICHR_HOST", "DEFAULT_BACKGROUND_SIZE", "COLUMNS"]

log = logging.getLogger(__name__)

ENRICHR_HOST = ("maayanlab.cloud", 443)
#: Background size used when none is given: about the number of human protein-coding genes.
DEFAULT_BACKGROUND_SIZE = 20000
COLUMNS = ["term", "library", "overlap", "n_overlap", "set_size", "pval", "pval_adj", "odds_ratio",
           "combined_score", "genes", "source"]


# --------------------------------------------------------------------------- inputs
def _clean_genes(genes) -> tuple[list[str], dict[str, str]]:
    """Upper-cased unique symbols (input order) and a map back to the user's spelling."""
    if isinstance(genes, str):
        genes = [genes]
    if isinstance(genes, pd.DataFrame):
        if "gene" not in genes.columns:
            raise DataError("A DataFrame of genes needs a 'gene' column", found=list(genes.columns)[:10],
                            expected="a 'gene' column (as returned by engine.tools.de)",
                            fix="pass a list of gene symbols, e.g. df['gene'].head(50).")
        genes = genes["gene"]
    out: dict[str, str] = {}
    for g in genes:
        if g is None or (isinstance(g, float) and np.isnan(g)):
            continue
        s = str(g).strip()
        if s:
            out.setdefault(s.upper(), s)
    return list(out), out


def _background(background) -> tuple[int | set[str], str]:
    """Background for the hypergeometric test and a description of it."""
    if background is None:
        return DEFAULT_BACKGROUND_SIZE, f"{DEFAULT_BACKGROUND_SIZE} genes (default)"
    if isinstance(background, (int, np.integer)) and not isinstance(background, bool):
        if background < 1:
            raise DataError("The background size must be positive", found=background,
                            expected="the number of measured genes, e.g. adata.n_vars",
                            fix="pass the number or the list of measured genes.")
        return int(background), f"{int(background)} genes (given as a number)"
    if hasattr(background, "var_names") and hasattr(background, "n_obs"):  # AnnData
        names = background.raw.var_names if getattr(background, "raw", None) is not None else background.var_names
        bg = {str(g).strip().upper() for g in names}
        return bg, f"{len(bg)} measured genes (from the AnnData)"
    bg = {str(g).strip().upper() for g in background if g is not None and str(g).strip()}
    if not bg:
        raise EmptySelectionError("The background gene list is empty", found=0,
                                  expected="the measured genes (e.g. adata.var_names)",
                                  fix="pass background=None for the default of 20,000 genes.")
    return bg, f"{len(bg)} genes (given as a list)"


def _libraries(libraries) -> list[tuple[str, dict[str, list[str]]]]:
    if libraries is None:
        libraries = DEFAULT_LIBRARIES
    if isinstance(libraries, (str, os.PathLike)) or (isinstance(libraries, Mapping) and _is_gene_sets(libraries)):
        libraries = [libraries]
    out = []
    for i, lib in enumerate(libraries):
        if isinstance(lib, Mapping):
            if not _is_gene_sets(lib):
                raise DataError("A gene-set dict must map term names to lists of genes",
                                found=type(next(iter(lib.values()), None)).__name__,
                                expected="{'TERM': ['GENE1', 'GENE2', ...]}", fix="pass a dict of lists.")
            sets = {str(k): [str(g).strip().upper() for g in v if str(g).strip()] for k, v in lib.items()}
            out.append((f"custom_{i}" if len(libraries) > 1 else "custom", sets))
        else:
            from pathlib import Path

            name = str(lib)
            label = Path(name).stem if name.lower().endswith(".gmt") or os.sep in name else name
            out.append((label, load_library(lib)))
    return out


def _is_gene_sets(m: Mapping) -> bool:
    return all(isinstance(v, (list, tuple, set, frozenset, np.ndarray, pd.Index)) for v in m.values())


def _bh(p: np.ndarray) -> np.ndarray:
    from scipy.stats import false_discovery_control

    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return false_discovery_control(p, method="bh") if p.size else p


def _empty() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(COLUMNS, [
        object, object, object, np.int64, np.int64, float, float, float, float, object, object])})
    return df


def _tidy(r: pd.DataFrame, *, library, back: dict[str, str], source: str, upper: bool = False) -> pd.DataFrame:
    """gseapy's result table (``Term``, ``Overlap``, ``P-value``, ...) in :data:`COLUMNS` (``pval_adj`` unset).

    Gene names in ``Genes`` map back to the user's spelling through ``back`` (upper-cased first if ``upper``).
    """
    ov = r["Overlap"].astype(str).str.split("/", expand=True).astype(np.int64)
    genes = r["Genes"].astype(str).map(
        lambda s: ";".join(back.get(g.upper() if upper else g, g) for g in s.split(";") if g))
    return pd.DataFrame({
        "term": r["Term"].astype(str).to_numpy(),
        "library": library,
        "overlap": r["Overlap"].astype(str).to_numpy(),
        "n_overlap": ov[0].to_numpy(),
        "set_size": ov[1].to_numpy(),
        "pval": r["P-value"].astype(float).to_numpy(),
        "pval_adj": 1.0,
        "odds_ratio": r["Odds Ratio"].astype(float).to_numpy(),
        "combined_score": r["Combined Score"].astype(float).to_numpy(),
        "genes": genes.to_numpy(),
        "source": source,
    })


# --------------------------------------------------------------------------- offline
def _offline_one(name: str, sets: dict[str, list[str]], universe: set[str], query: list[str], bg,
                 back: dict[str, str]) -> pd.DataFrame:
    import gseapy

    q = set(query) if isinstance(bg, int) else set(query) & bg
    if not (q & universe):
        return _empty()
    enr = gseapy.enrich(gene_list=sorted(q), gene_sets=sets, background=bg if isinstance(bg, int) else sorted(bg),
                        outdir=None, no_plot=True, cutoff=1.0, verbose=False)
    try:
        r = getattr(enr, "res2d", None)
    finally:
        if hasattr(enr, "close"):
            enr.close()
    if r is None or len(r) == 0:
        return _empty()
    df = _tidy(r, library=name, back=back, source="offline")
    df["pval_adj"] = _bh(df["pval"].to_numpy())
    return df


# --------------------------------------------------------------------------- online
def _probe(host: tuple[str, int], timeout: float) -> None:
    """Open and close a TCP connection to the Enrichr host (raises OSError when unreachable)."""
    with socket.create_connection(host, timeout=timeout):
        pass


def _call_enrichr(genes: list[str], libraries: Sequence[str]) -> pd.DataFrame | None:
    """The online call (separate so that tests can replace it)."""
    import gseapy

    enr = gseapy.enrichr(gene_list=list(genes), gene_sets=list(libraries), organism="human", outdir=None,
                         no_plot=True, cutoff=1.0)
    return getattr(enr, "res2d", None)


def _online(genes: list[str], libraries: Sequence[str], timeout: float,
            back: dict[str, str]) -> tuple[pd.DataFrame | None, str | None]:
    """Run probe + Enrichr in a daemon thread; give up after ``timeout`` seconds."""
    box: dict = {}

    def work():
        try:
            _probe(ENRICHR_HOST, timeout)
            box["res"] = _call_enrichr(genes, libraries)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller as a message
            box["err"] = exc

    th = threading.Thread(target=work, name="lexicell-enrichr", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        return None, f"Enrichr did not answer within {timeout:g} s; showing the offline result only."
    if "err" in box:
        e = box["err"]
        return None, (f"Enrichr is unreachable ({type(e).__name__}: {e}); showing the offline result only.")
    r = box.get("res")
    if r is None or len(r) == 0:
        return _empty(), "Enrichr answered but returned no term for these genes."
    library = r["Gene_set"].astype(str).to_numpy() if "Gene_set" in r else "enrichr"
    df = _tidy(r, library=library, back=back, source="enrichr", upper=True)
    for lib, idx in df.groupby("library").groups.items():
        df.loc[idx, "pval_adj"] = _bh(df.loc[idx, "pval"].to_numpy())
    return df, None


# --------------------------------------------------------------------------- public API
def enrich(
    genes: Iterable[str] | pd.Series | pd.DataFrame,
    *,
    libraries=None,
    background=None,
    online: bool = False,
    enrichr_libraries: Sequence[str] = ("KEGG_2021_Human", "GO_Biological_Process_2023"),
    timeout: float = 10.0,
    cutoff: float = 1.0,
) -> pd.DataFrame:
    """Over-representation analysis of a gene list (hypergeometric test), offline and optionally online.

    Offline, each library is tested with :func:`gseapy.enrich`: for a term with ``K``
    genes (within the background), ``k`` of which are among the ``n`` query genes,
    ``pval = P(X >= k)`` for ``X ~ Hypergeom(N, K, n)`` with ``N`` the background
    size. This is Enrichr's test (Chen et al., 2013), used by CellWhisperer on the top
    50 up-regulated genes of a top-vs-bottom comparison.

    Parameters
    ----------
    genes
        Gene symbols (list, Series, or a DE table with a ``gene`` column; take e.g.
        ``de[de.direction == "up"].gene.head(50)``). Matched upper-cased.
    libraries
        Offline libraries: names from :func:`engine.io.genesets.list_libraries`, paths of
        GMT files, or dicts ``{term: [genes]}``; a single item is accepted. Default
        :data:`engine.io.genesets.DEFAULT_LIBRARIES`.
    background
        The gene universe. A list of symbols (recommended: the genes *measured*,
        e.g. ``adata.var_names``) restricts query and terms to it; an AnnData uses
        its ``raw.var_names`` (or ``var_names``); an int gives only the size. Default
        ``None``: 20,000 genes (about the human protein-coding genes, as Enrichr).
    online
        Also query Enrichr (``gseapy.enrichr``) with ``enrichr_libraries``. On any
        failure or after ``timeout`` seconds the offline result is returned alone,
        with a message in ``attrs["messages"]`` and a logged warning.
    enrichr_libraries
        Enrichr library names for the online query.
    timeout
        Seconds allowed for the whole online request (reachability probe included).
    cutoff
        Keep terms with ``pval_adj <= cutoff`` (1.0 keeps every term with an overlap).

    Returns
    -------
    pandas.DataFrame
        One row per (library, term) with at least one query gene, sorted by ``pval``:
        ``term``, ``library``, ``overlap`` (``"k/K"``), ``n_overlap`` (k), ``set_size``
        (K, within the background when a list is given), ``pval``, ``pval_adj``
        (Benjamini-Hochberg within each library over the terms tested, i.e. with an
        overlap, as Enrichr), ``odds_ratio`` (gseapy's, Haldane-Anscombe corrected),
        ``combined_score`` (``-ln(pval) * odds_ratio``), ``genes`` (overlapping genes,
        ``;``-joined, in the user's spelling), ``source`` (``"offline"`` or
        ``"enrichr"``). ``attrs``: ``messages`` (list of str), ``n_genes`` (query
        size), ``n_genes_in_libraries``, ``background``, ``libraries``.

    Raises
    ------
    EmptySelectionError
        The gene list (or a background list) is empty.
    MissingKeyError
        An unknown library name.
    DataError
        An unreadable GMT file or a malformed argument.
    """
    query, back = _clean_genes(genes)
    if not query:
        raise EmptySelectionError("The gene list is empty", found="0 genes", expected="at least one gene symbol",
                                  fix="pass e.g. the top 50 up-regulated genes of engine.tools.de.de_top_vs_bottom.")
    bg, bg_desc = _background(background)
    libs = _libraries(libraries)
    messages: list[str] = []
    if isinstance(bg, set):
        dropped = [g for g in query if g not in bg]
        if dropped:
            messages.append(f"{len(dropped)} of {len(query)} genes are not in the background and were left out: "
                            + ", ".join(back[g] for g in dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
    frames = []
    in_libs: set[str] = set()
    for name, sets in libs:
        universe = set().union(*sets.values()) if sets else set()
        in_libs |= set(query) & universe
        frames.append(_offline_one(name, sets, universe, query, bg, back))
    if not in_libs:
        messages.append("None of the genes is in the offline libraries "
                        f"({', '.join(n for n, _ in libs)}); check that they are gene symbols (not Ensembl IDs).")
    if online:
        df_on, msg = _online(query, list(enrichr_libraries), float(timeout), back)
        if msg:
            messages.append(msg)
            if df_on is None:
                log.warning(msg)
        if df_on is not None:
            frames.append(df_on)
    frames = [f for f in frames if len(f)]
    res = pd.concat(frames, ignore_index=True) if frames else _empty()
    if len(res):
        res = res[res["pval_adj"] <= cutoff]
        res = res.sort_values(["pval", "combined_score"], ascending=[True, False], kind="stable")
        res = res.reset_index(drop=True)[COLUMNS]
    for m in messages:
        log.info(m)
    res.attrs.update({
        "messages": messages,
        "n_genes": len(query),
        "n_genes_in_libraries": len(in_libs),
        "background": bg_desc,
        "libraries": [n for n, _ in libs] + ([f"enrichr:{x}" for x in enrichr_libraries] if online else []),
    })
    return res
