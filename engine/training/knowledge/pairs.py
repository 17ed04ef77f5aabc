"""Knowledge-derived pseudo-cell / text pairs: the default model's training data (:func:`build_pairs`).

Each pair's profile is a *pseudo-cell*: a reference cell's transcriptome (the background) whose top ranks
are taken over by a gene set's genes, so that the rank encoding (Geneformer-style, normalised by reference
gene medians) puts the set first, as a real cell of that kind would. Its text names the set: a cell type
(marker sets, with Cell Ontology names and definitions, LangCell-style, seed 001), a pathway or GO process,
or a single marker gene. Weakly labelled reference cells add thinned copies of themselves. Optional
augmentations mimic data subset to highly variable genes and shallow sequencing.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import DataError
from .genes import (
    CELLTYPE_GMT,
    GENESET_DIR,
    _pretty,
    _read_gmt,
    build_vocabulary,
    first_positions,
    geneset_files,
    holdout_cells,
    reference_expression,
    symbol_positions,
    variable_gene_ranking,
)
from .labels import _cd_aliases, _celltype_hierarchy, _celltype_texts, weak_labels

__all__ = ["PROLIFERATION_TEXTS", "PROLIFERATION_SETS", "build_pairs"]

log = logging.getLogger(__name__)

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
    from ..pairs import PairedData
    from ...models.tokenizer import RankTokenizer

    rng = np.random.default_rng(seed)
    tok = RankTokenizer.load(vocabulary) if vocabulary else build_vocabulary()
    vocab = tok.to_frame().set_index("ensembl_id")
    n_genes = len(vocab)
    gene_pos = pd.Series(np.arange(n_genes), index=vocab.index)
    sym_pos = first_positions(vocab["symbol"].str.upper())
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
        return np.unique(symbol_positions(sym_pos, symbols))

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
    for f in geneset_files(celltypes=False, include_go=include_go):
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
