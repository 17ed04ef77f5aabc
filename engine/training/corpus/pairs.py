"""Training pairs and held-out evaluation cells from the real-data corpus.

Each corpus profile is a bulk or pseudo-bulk expression vector (or a single cell). The default model embeds
single cells, so a pair's transcriptome is either the profile itself (bulk input, as CellWhisperer's GEO
samples) or a **simulated cell** drawn from it: counts ~ Poisson(D x profile / sum), with a depth D
log-uniform in ``depth_range`` UMIs (10x cells have ~1,000–20,000), zeros dropped. Texts come from
:func:`engine.training.corpus.texts.profile_texts`; the group of a pair is its Cell Ontology term, so pairs of one
cell type from different data sets are soft positives of each other in the loss.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...paths import ASSETS_DIR
from ...errors import ConfigError, DataError

__all__ = ["CORPUS_PATH", "load_corpus", "build_pairs", "simulate_cells", "heldout_cells"]

log = logging.getLogger(__name__)

#: The built corpus shipped with Lexicell (rebuild: ``python -m engine.corpus fetch`` then ``build``).
CORPUS_PATH = ASSETS_DIR / "corpus" / "corpus.h5ad"


def load_corpus(path: str | os.PathLike | None = None):
    """Read a built corpus (default: the bundled ``assets/corpus/corpus.h5ad``).

    Raises
    ------
    DataError
        No such file (the message gives the two commands that build it).
    """
    import anndata as ad

    p = Path(path) if path is not None else CORPUS_PATH
    if not p.exists():
        raise DataError("Corpus file not found", found=str(p), expected="a corpus built by `python -m engine.corpus build`",
                        fix="run `python -m engine.corpus fetch --to corpus_raw` and "
                            f"`python -m engine.corpus build --from corpus_raw --out {p}`.")
    a = ad.read_h5ad(p)
    missing = [c for c in ("cell_type_ontology_term_id", "dataset", "species", "tissue") if c not in a.obs.columns]
    if missing:
        raise DataError("Not a Lexicell corpus", found=f"{p}: obs lacks {missing}", expected="obs columns of engine.training.corpus.build")
    return a


def _on_vocabulary(adata, vocab: pd.DataFrame) -> sp.csr_matrix:
    """Corpus X re-indexed onto the vocabulary's genes (``(n_profiles, n_vocab)`` CSR)."""
    pos = pd.Series(np.arange(len(vocab)), index=vocab.index)
    cols = pos.reindex(adata.var_names).to_numpy()
    ok = ~np.isnan(cols)
    src = np.flatnonzero(ok)
    M = sp.csr_matrix((np.ones(src.size, dtype=np.float32), (src, cols[ok].astype(int))), shape=(adata.n_vars, len(vocab)))
    X = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    return (X.tocsr() @ M).tocsr()


def simulate_cells(profile: np.ndarray, n: int, rng: np.random.Generator, depth_range=(1000.0, 20000.0)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Draw ``n`` single-cell-like count vectors from one profile.

    Parameters
    ----------
    profile
        ``(n_genes,)`` non-negative expression (linear scale).
    depth_range
        Depth D is log-uniform in this range (UMIs per simulated cell).

    Returns
    -------
    list of (numpy.ndarray, numpy.ndarray)
        Per cell, the column indices and counts of its non-zero genes.
    """
    nz = np.flatnonzero(profile > 0)
    p = profile[nz] / profile[nz].sum()
    out = []
    lo, hi = np.log(depth_range[0]), np.log(depth_range[1])
    for _ in range(n):
        d = float(np.exp(rng.uniform(lo, hi)))
        c = rng.poisson(p * d)
        keep = c > 0
        out.append((nz[keep], c[keep].astype(np.float32)))
    return out


def build_pairs(
    *,
    path: str | os.PathLike | None = None,
    vocabulary: str | os.PathLike | None = None,
    n_per_label: int = 40,
    profile_fraction: float = 0.2,
    depth_range: tuple[float, float] = (1000.0, 20000.0),
    panel_fraction: float = 0.3,
    panel_sizes: tuple[int, int] = (500, 3000),
    top_genes: int = 600,
    holdout_datasets: Sequence[str] = (),
    datasets: Sequence[str] | None = None,
    species: Sequence[str] | None = None,
    seed: int = 0,
):
    """Corpus profile / text pairs for :mod:`engine.training.train` (a ``"python"`` data source).

    Parameters
    ----------
    path
        A built corpus (default :data:`CORPUS_PATH`).
    vocabulary
        A ``genes.tsv`` (default: :func:`engine.training.knowledge.build_vocabulary`, the default model's genes).
    n_per_label
        Pairs per (data set, source label); spread over that label's profiles.
    profile_fraction
        Share of pairs that carry the profile itself (bulk input) instead of a simulated cell.
    depth_range
        UMIs per simulated cell (log-uniform).
    panel_fraction, panel_sizes
        Share of pairs restricted to a highly-variable-gene panel of the reference (as data subset to HVGs).
    top_genes
        Each pair keeps its ``top_genes`` highest genes by expression / reference median (the rank encoder
        reads at most 256), which bounds memory.
    holdout_datasets
        Data set ids left out (leave-one-data-set-out evaluation).
    datasets, species
        Only these data sets / species.

    Returns
    -------
    engine.training.pairs.PairedData
        ``X`` ``(n_pairs, n_vocab)`` float32 CSR, texts, groups (one per Cell Ontology term, ids offset so
        they never collide with other sources' groups after :meth:`PairedData.concat`), ``meta`` with
        ``dataset``, ``cell_type_ontology_term_id``, ``kind`` ("profile" or "simulated").

    Raises
    ------
    DataError
        No corpus, or no profile left after the filters.
    ConfigError
        An unknown data set id in ``holdout_datasets``/``datasets``.
    """
    from ..knowledge import build_vocabulary, variable_gene_ranking
    from ..pairs import PairedData
    from ...models.tokenizer import RankTokenizer
    from .texts import profile_texts

    rng = np.random.default_rng(seed)
    adata = load_corpus(path)
    known = set(adata.obs["dataset"].astype(str))
    unknown = (set(holdout_datasets) | set(datasets or ())) - known
    if unknown:
        raise ConfigError("Unknown corpus data set ids", found=", ".join(sorted(unknown)), expected=", ".join(sorted(known)))
    obs = adata.obs.astype({"dataset": str, "species": str, "source_label": str, "cell_type_ontology_term_id": str})
    keep = ~obs["dataset"].isin(list(holdout_datasets))
    if datasets:
        keep &= obs["dataset"].isin(list(datasets))
    if species:
        keep &= obs["species"].isin(list(species))
    if not keep.any():
        raise DataError("No corpus profile left for training", found=f"{len(obs)} profiles, all filtered out",
                        expected="at least one data set not held out")
    adata = adata[keep.to_numpy()]
    obs = obs[keep]
    tok = RankTokenizer.load(vocabulary) if vocabulary else build_vocabulary()
    vocab = tok.to_frame().set_index("ensembl_id")
    medians = vocab["median"].to_numpy()
    X = _on_vocabulary(adata, vocab)
    hv = (pd.Series(np.arange(len(vocab)), index=vocab.index).reindex(variable_gene_ranking().index).dropna().astype(int).to_numpy()
          if panel_fraction > 0 else np.zeros(0, dtype=int))

    rows_i, rows_j, rows_v, texts, groups, meta = [], [], [], [], [], []
    terms = sorted(obs["cell_type_ontology_term_id"].unique())
    gid = {t: i for i, t in enumerate(terms)}
    offset = 1_000_000  # corpus groups never collide with knowledge groups

    def add(c: np.ndarray, v: np.ndarray, text: str, term: str, ds: str, kind: str) -> None:
        if rng.random() < panel_fraction:
            m = np.zeros(len(vocab), dtype=bool)
            m[hv[: int(rng.integers(panel_sizes[0], panel_sizes[1] + 1))]] = True
            k = m[c]
            if k.sum() >= 10:
                c, v = c[k], v[k]
        if c.size > top_genes:
            top = np.argpartition(-(v / medians[c]), top_genes)[:top_genes]
            c, v = c[top], v[top]
        if c.size < 2:
            return
        rows_i.append(np.full(c.size, len(texts)))
        rows_j.append(c)
        rows_v.append(v)
        texts.append(text)
        groups.append(offset + gid[term])
        meta.append((ds, term, kind))

    texts_of: dict[int, list[str]] = {}  # the phrasings of each profile, built once
    for (ds, lab), idx in obs.groupby(["dataset", "source_label"], observed=True).indices.items():
        for k in range(n_per_label):
            i = int(idx[k % len(idx)]) if k < len(idx) else int(idx[rng.integers(len(idx))])
            row = obs.iloc[i]
            if i not in texts_of:
                texts_of[i] = profile_texts(row)
            choices = texts_of[i]
            text = choices[rng.integers(len(choices))]
            start, end = X.indptr[i], X.indptr[i + 1]
            cols, vals = X.indices[start:end], X.data[start:end].astype(np.float64)
            if vals.size == 0:
                continue
            term = row["cell_type_ontology_term_id"]
            if rng.random() < profile_fraction:
                add(cols, vals.astype(np.float32), text, term, ds, "profile")
            else:
                prof = np.zeros(len(vocab))
                prof[cols] = vals
                (c, v), = simulate_cells(prof, 1, rng, depth_range)
                add(c, v, text, term, ds, "simulated")
    if not texts:
        raise DataError("No corpus pairs were built", found="0 pairs", expected="profiles with expression on the vocabulary's genes")
    M = sp.csr_matrix((np.concatenate(rows_v).astype(np.float32), (np.concatenate(rows_i), np.concatenate(rows_j))),
                      shape=(len(texts), len(vocab)))
    var = pd.DataFrame({"ensembl_id": vocab.index.to_numpy(), "gene_symbol": vocab["symbol"].to_numpy()}, index=vocab.index.copy())
    meta_df = pd.DataFrame(meta, columns=["dataset", "cell_type_ontology_term_id", "kind"])
    log.info("built %d corpus pairs (%d cell types, %d data sets, %d distinct texts)", len(texts), len(terms),
             obs["dataset"].nunique(), len(set(texts)))
    return PairedData(X=M, var=var, texts=texts, groups=np.asarray(groups), name="corpus", meta=meta_df)


def heldout_cells(dataset: str, *, path: str | os.PathLike | None = None, corpus=None, n_per_profile: int = 20,
                  depth_range: tuple[float, float] = (1000.0, 10000.0), seed: int = 0):
    """Simulated single cells of one corpus data set, for zero-shot evaluation of a model that never saw it.

    Parameters
    ----------
    dataset
        Corpus data set id.
    corpus
        An already loaded corpus (else read from ``path``).
    n_per_profile
        Cells drawn per profile (counts ~ Poisson, depth log-uniform in ``depth_range``).

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)`` counts (float32 CSR) on the corpus genes (``var_names`` Ensembl IDs,
        ``var["gene_symbol"]``); ``obs["cell_type"]`` the Cell Ontology name (the label a biologist would
        type), ``obs["cell_type_ontology_term_id"]``, ``obs["source_label"]``, ``obs["profile"]``.

    Raises
    ------
    ConfigError
        Unknown data set id.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    adata = corpus if corpus is not None else load_corpus(path)
    ds_col = adata.obs["dataset"].astype(str)
    if dataset not in set(ds_col):
        raise ConfigError("Unknown corpus data set id", found=dataset, expected=", ".join(sorted(set(ds_col))))
    sub = adata[(ds_col == dataset).to_numpy()]
    X = sub.X.tocsr() if sp.issparse(sub.X) else sp.csr_matrix(sub.X)
    rows_i, rows_j, rows_v, obs_rows = [], [], [], []
    n = 0
    for i in range(sub.n_obs):
        prof = X[i].toarray().ravel()
        for c, v in simulate_cells(prof, n_per_profile, rng, depth_range):
            rows_i.append(np.full(c.size, n))
            rows_j.append(c)
            rows_v.append(v)
            o = sub.obs.iloc[i]
            obs_rows.append({"cell_type": str(o["cell_type"]), "cell_type_ontology_term_id": str(o["cell_type_ontology_term_id"]),
                             "source_label": str(o["source_label"]), "profile": str(sub.obs_names[i])})
            n += 1
    M = sp.csr_matrix((np.concatenate(rows_v), (np.concatenate(rows_i), np.concatenate(rows_j))), shape=(n, sub.n_vars), dtype=np.float32)
    obs = pd.DataFrame(obs_rows, index=[f"{dataset}:cell{k}" for k in range(n)])
    obs["cell_type"] = obs["cell_type"].astype("category")
    var = pd.DataFrame({"gene_symbol": sub.var["gene_symbol"].to_numpy(), "ensembl_id": sub.var_names.to_numpy()},
                       index=pd.Index(sub.var_names.to_numpy(), dtype=str))
    return ad.AnnData(X=M, obs=obs, var=var)
