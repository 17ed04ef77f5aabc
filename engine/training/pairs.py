"""Paired transcriptome-text data: the :class:`PairedData` container every training source becomes.

Every source (an AnnData with a text column or templated metadata, an ARCHS4 HDF5
file, knowledge-derived pseudo-cells from :mod:`engine.training.knowledge`) becomes one
:class:`PairedData`: a sparse expression matrix, its genes, one text per row and
optional group ids. CellWhisperer pairs each GEO sample's counts (ARCHS4, Lachmann
et al. 2018) with a natural-language description of its metadata (seed 000 §3.1,
appendix A); LangCell templates cell metadata with Cell Ontology definitions
(seed 001). The readers live beside this module (:mod:`.anndata_source`,
:mod:`.archs4_source`, the config dispatcher :mod:`.sources`); their public names are
re-exported here, so ``from engine.training.pairs import from_anndata`` keeps working.
"""
from __future__ import annotations

import importlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError

#: Public names of the reader and config-source modules, re-exported here (see ``__getattr__`` at the end).
_READERS = ("from_anndata", "from_archs4", "write_tiny_archs4", "load_source")
__all__ = ["PairedData", "clean_text", *_READERS]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- container
@dataclass
class PairedData:
    """Transcriptome-text pairs.

    Attributes
    ----------
    X
        ``(n_pairs, n_genes)`` :class:`scipy.sparse.csr_matrix`, non-negative expression (counts or
        normalised; the rank encoding is invariant to a per-row scale).
    var
        ``(n_genes, ...)`` gene table; index = gene identifiers (Ensembl IDs or symbols); optional columns
        ``ensembl_id`` and ``gene_symbol`` help :meth:`engine.models.tokenizer.RankTokenizer.match_genes`.
    texts
        ``n_pairs`` descriptions, one per row.
    groups
        Optional ``(n_pairs,)`` int64 group ids: pairs of one group share a meaning (one cell type, one gene
        set). Used for soft targets in the loss and for the grouped train/validation split.
    name
        Name of the source (logged in the training metadata).
    meta
        Optional ``(n_pairs, ...)`` per-pair metadata (e.g. ``geo_accession``, ``series_id``).
    """

    X: sp.csr_matrix
    var: pd.DataFrame
    texts: list
    groups: np.ndarray | None = None
    name: str = "paired"
    meta: pd.DataFrame | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        X = self.X
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        self.X = X
        if not isinstance(self.var, pd.DataFrame):
            self.var = pd.DataFrame(index=pd.Index([str(g) for g in self.var]))
        self.texts = [str(t) for t in self.texts]
        n = X.shape[0]
        if len(self.texts) != n:
            raise DataError("Paired data needs one text per row", found=f"{len(self.texts)} texts for {n} rows", expected=f"{n} texts")
        if self.var.shape[0] != X.shape[1]:
            raise DataError("Paired data needs one gene per column", found=f"{self.var.shape[0]} genes for {X.shape[1]} columns", expected=f"{X.shape[1]} genes")
        if X.nnz and (X.data.min() < 0 or not np.isfinite(X.data).all()):
            raise DataError("Paired expression must be non-negative and finite", found=f"min {float(np.nanmin(X.data)):.3g}", expected="counts or normalised expression")
        if self.groups is not None:
            g = np.asarray(self.groups).reshape(-1)
            if g.shape[0] != n:
                raise DataError("Paired data needs one group id per row", found=f"{g.shape[0]} ids for {n} rows", expected=f"{n} ids")
            self.groups = g.astype(np.int64)
        if self.meta is not None and len(self.meta) != n:
            raise DataError("Per-pair metadata has the wrong length", found=len(self.meta), expected=n)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __repr__(self) -> str:
        return (
            f"PairedData(name={self.name!r}, n_pairs={len(self)}, n_genes={self.X.shape[1]}, "
            f"n_texts={len(set(self.texts))}, groups={'none' if self.groups is None else len(np.unique(self.groups))})"
        )

    @property
    def n_genes(self) -> int:
        """Number of gene columns."""
        return int(self.X.shape[1])

    def unique_texts(self) -> tuple[list[str], np.ndarray]:
        """Unique texts (first-seen order) and the ``(n_pairs,)`` int64 index of each pair's text."""
        from .metrics import unique_index

        return unique_index(self.texts)

    def split_keys(self) -> np.ndarray:
        """``(n_pairs,)`` ids that define "the same meaning": ``groups`` if set, else the unique-text index."""
        return self.groups if self.groups is not None else self.unique_texts()[1]

    def subset(self, idx) -> "PairedData":
        """Rows ``idx`` (int positions, bool mask or slice) as a new :class:`PairedData`."""
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        return PairedData(
            X=self.X[idx],
            var=self.var.copy(),
            texts=[self.texts[i] for i in idx],
            groups=None if self.groups is None else self.groups[idx],
            name=self.name,
            meta=None if self.meta is None else self.meta.iloc[idx].reset_index(drop=True),
        )

    @staticmethod
    def concat(parts: Sequence["PairedData"], *, name: str | None = None) -> "PairedData":
        """Stack paired data sets over the union of their genes.

        Genes are matched by the ``var`` index (duplicate identifiers within one part are summed); missing
        genes are zero. Group ids are offset per part so groups of different parts never merge; parts
        without groups get one group per unique text when another part has groups.

        Raises
        ------
        DataError
            If ``parts`` is empty.
        """
        parts = [p for p in parts if p is not None]
        if not parts:
            raise DataError("Nothing to concatenate", found="no paired data", expected="at least one PairedData")
        if len(parts) == 1:
            return parts[0] if name is None else PairedData(parts[0].X, parts[0].var, parts[0].texts, parts[0].groups, name, parts[0].meta)
        deduped = [_collapse_duplicate_genes(p.X, p.var) for p in parts]
        genes = pd.Index([])
        for _, var in deduped:
            genes = genes.append(var.index[~var.index.isin(genes)])
        union = pd.DataFrame(index=genes.astype(str))
        for col in ("ensembl_id", "gene_symbol"):
            vals = pd.Series(np.nan, index=union.index, dtype=object)
            for _, var in deduped:
                if col in var.columns:
                    vals = vals.combine_first(var[col].astype(object))
            if vals.notna().any():
                union[col] = vals.reindex(union.index)
        blocks = []
        for X, var in deduped:
            coo = X.tocoo()
            cols = union.index.get_indexer(var.index)[coo.col]
            blocks.append(sp.csr_matrix((coo.data, (coo.row, cols)), shape=(X.shape[0], len(union))))
        any_groups = any(p.groups is not None for p in parts)
        groups = None
        if any_groups:
            gl, offset = [], 0
            for p in parts:
                g = p.groups if p.groups is not None else p.unique_texts()[1]
                _, g = np.unique(g, return_inverse=True)
                gl.append(g + offset)
                offset += int(g.max(initial=-1)) + 1
            groups = np.concatenate(gl)
        meta = None
        if any(p.meta is not None for p in parts):
            meta = pd.concat(
                [(p.meta if p.meta is not None else pd.DataFrame(index=range(len(p)))).assign(source=p.name) for p in parts],
                ignore_index=True,
            )
        return PairedData(
            X=sp.vstack(blocks).tocsr(),
            var=union,
            texts=[t for p in parts for t in p.texts],
            groups=groups,
            name=name or "+".join(p.name for p in parts),
            meta=meta,
        )

    def split(self, val_fraction: float = 0.05, seed: int = 0, by_group: bool = True) -> tuple["PairedData", "PairedData"]:
        """Split into training and validation pairs.

        Parameters
        ----------
        val_fraction
            Target fraction of pairs in validation (0 gives an empty validation set).
        seed
            Seed of the shuffle.
        by_group
            Keep every group (``groups``, or identical texts when ``groups`` is None) on one side, so
            validation measures generalisation to unseen meanings. With a single group the split falls back
            to single pairs.

        Returns
        -------
        (PairedData, PairedData)
            ``(train, validation)``.
        """
        n = len(self)
        if not 0 <= val_fraction < 1:
            raise ConfigError("val_fraction must lie in [0, 1)", found=val_fraction, expected="e.g. 0.05")
        rng = np.random.default_rng(seed)
        n_val = int(round(val_fraction * n))
        if n_val == 0:
            return self, self.subset(np.array([], dtype=np.int64))
        keys = self.split_keys() if by_group else np.arange(n)
        uniq, inv = np.unique(keys, return_inverse=True)
        if len(uniq) < 2:
            log.warning("only one group in %s: splitting single pairs instead", self.name)
            uniq, inv = np.arange(n), np.arange(n)
        order = rng.permutation(len(uniq))
        sizes = np.bincount(inv, minlength=len(uniq))
        chosen, total = [], 0
        for g in order:
            if total >= n_val:
                break
            if len(chosen) == len(uniq) - 1:
                break  # always leave one group for training
            chosen.append(g)
            total += sizes[g]
        is_val = np.isin(inv, np.asarray(chosen, dtype=np.int64))
        return self.subset(~is_val), self.subset(is_val)


def _collapse_duplicate_genes(X: sp.csr_matrix, var: pd.DataFrame) -> tuple[sp.csr_matrix, pd.DataFrame]:
    idx = var.index.astype(str)
    if idx.is_unique:
        return X, var.set_axis(idx)
    codes, uniq = pd.factorize(idx)
    M = sp.csr_matrix((np.ones(len(codes), dtype=np.float32), (np.arange(len(codes)), codes)), shape=(len(codes), len(uniq)))
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    new_var = var.iloc[first].set_axis(pd.Index(uniq, dtype=str))
    return (X @ M).tocsr(), new_var


# --------------------------------------------------------------------------- text helpers
def clean_text(text: object) -> str:
    """ASCII, single-spaced text without control characters (``''`` for missing values)."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = re.sub(r",(?=\S)", ", ", text)  # ARCHS4 joins characteristics with bare commas
    return " ".join(text.split()).strip(" ;,")


#: Names re-exported from the reader and config-source modules (imported on first use: those modules import
#: :class:`PairedData` from here).
_MOVED = {
    "from_anndata": "anndata_source",
    "from_archs4": "archs4_source",
    "write_tiny_archs4": "archs4_source",
    "load_source": "sources",
    "import_callable": "sources",
    "MOVED_MODULES": "sources",
}


def __getattr__(name: str):
    mod = _MOVED.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__package__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_MOVED})
