"""Geneformer-style rank value encoding of transcriptomes.

A cell becomes the list of its expressed genes ordered by expression normalised
by each gene's reference median (Theodoris et al., *Nature* 2023,
doi:10.1038/s41586-023-06139-9), truncated to the model's input size. Only
expressed genes enter the encoding, which is what makes the encoders sparse-aware
(xTrimoGene, Gong et al. 2023). The same encoding serves Lexicell's own tower, the
in-silico perturbation of genes (delete / overexpress edit the token list) and
Geneformer itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import DataError, GeneIdentifierError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["RankEncoding", "RankTokenizer"]


@dataclass
class RankEncoding:
    """Padded token lists of a batch of cells.

    Attributes
    ----------
    input_ids
        ``(n_cells, max_length)`` int64 token ids, highest-ranked gene first, padded with ``pad_token_id``.
    lengths
        ``(n_cells,)`` int64 number of non-padding tokens per cell (special tokens included).
    pad_token_id
        Id used for padding.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    pad_token_id: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, idx) -> "RankEncoding":
        ids = self.input_ids[idx]
        lengths = self.lengths[idx]
        if ids.ndim == 1:
            ids, lengths = ids[None, :], np.atleast_1d(lengths)
        return RankEncoding(ids, lengths, self.pad_token_id)

    @property
    def attention_mask(self) -> np.ndarray:
        """``(n_cells, max_length)`` bool, True on real tokens."""
        return np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]

    def trimmed(self) -> "RankEncoding":
        """Return a copy whose width is the longest cell (saves compute on short cells)."""
        width = max(int(self.lengths.max(initial=0)), 1)
        return RankEncoding(self.input_ids[:, :width].copy(), self.lengths.copy(), self.pad_token_id)

    def tokens(self, i: int) -> np.ndarray:
        """Token ids of cell ``i`` without padding."""
        return self.input_ids[i, : self.lengths[i]]


try:  # numba ships with umap-learn; the numpy fallback is exact but slower
    import numba

    @numba.njit(parallel=True, cache=True)
    def _rank_rows_numba(indptr, indices, data, col_token, col_scale, max_genes, offset, out_ids, out_len):
        # Same result as a stable descending sort of every expressed gene, but only the top ``max_genes``
        # are sorted: a partition finds the threshold value first (O(m) instead of O(m log m) per cell).
        n = indptr.shape[0] - 1
        for i in numba.prange(n):
            start = indptr[i]
            end = indptr[i + 1]
            m = 0
            vals = np.empty(end - start, dtype=np.float64)
            toks = np.empty(end - start, dtype=np.int64)
            for p in range(start, end):
                c = indices[p]
                t = col_token[c]
                v = data[p]
                if t >= 0 and v > 0:
                    vals[m] = -v * col_scale[c]
                    toks[m] = t
                    m += 1
            k = min(m, max_genes)
            if k < m:
                thr = np.partition(vals[:m].copy(), k - 1)[k - 1]
                sel = np.empty(k, dtype=np.int64)
                cnt = 0
                for p in range(m):
                    if vals[p] < thr:
                        sel[cnt] = p
                        cnt += 1
                for p in range(m):
                    if cnt >= k:
                        break
                    if vals[p] == thr:
                        sel[cnt] = p
                        cnt += 1
                sub = np.empty(k, dtype=np.float64)
                for r in range(k):
                    sub[r] = vals[sel[r]]
                order = np.argsort(sub, kind="mergesort")
                for r in range(k):
                    out_ids[i, offset + r] = toks[sel[order[r]]]
            else:
                order = np.argsort(vals[:m], kind="mergesort")
                for r in range(k):
                    out_ids[i, offset + r] = toks[order[r]]
            out_len[i] = k

    _HAVE_NUMBA = True
except Exception:  # pragma: no cover - numba missing or broken
    _HAVE_NUMBA = False


def _rank_rows_numpy(indptr, indices, data, col_token, col_scale, max_genes, offset, out_ids, out_len):
    for i in range(indptr.shape[0] - 1):
        sl = slice(indptr[i], indptr[i + 1])
        cols = indices[sl]
        vals = data[sl].astype(np.float64)
        toks = col_token[cols]
        keep = (toks >= 0) & (vals > 0)
        vals = -vals[keep] * col_scale[cols[keep]]
        toks = toks[keep]
        order = np.argsort(vals, kind="mergesort")[:max_genes]
        out_ids[i, offset : offset + order.size] = toks[order]
        out_len[i] = order.size


class RankTokenizer:
    """Turn expression into Geneformer-style rank value encodings.

    Parameters
    ----------
    gene_ids
        ``(n_vocab_genes,)`` gene identifiers of the vocabulary (Ensembl gene IDs without version).
    token_ids
        ``(n_vocab_genes,)`` int token id of each gene. Default: ``first_gene_token + arange``.
    gene_medians
        ``(n_vocab_genes,)`` float, each gene's non-zero median of normalised expression in a reference
        corpus; expression is divided by it before ranking. Default: all ones (plain ranking).
    max_length
        Maximum number of tokens per cell, special tokens included (2,048 for Geneformer V1, 4,096 for V2).
    pad_token_id, cls_token_id, eos_token_id
        Special tokens. ``cls``/``eos`` are prepended/appended when given (Geneformer V2).
    symbols
        Optional approved symbols of the vocabulary genes (used to match data that has symbols only).
    first_gene_token
        First token id of genes when ``token_ids`` is not given (0 and 1 are ``<pad>``, ``<mask>``).

    Notes
    -----
    Ranking is invariant to a per-cell scale factor, so counts, counts normalised to 10,000 and ``expm1`` of
    log-normalised values give the same encoding. Ties are broken by the data's gene order.
    """

    def __init__(
        self,
        gene_ids: Sequence[str],
        token_ids: Sequence[int] | None = None,
        gene_medians: Sequence[float] | None = None,
        *,
        max_length: int = 2048,
        pad_token_id: int = 0,
        mask_token_id: int | None = 1,
        cls_token_id: int | None = None,
        eos_token_id: int | None = None,
        symbols: Sequence[str] | None = None,
        first_gene_token: int = 2,
    ) -> None:
        gene_ids = [str(g).split(".")[0] if str(g).startswith("ENS") else str(g) for g in gene_ids]
        n = len(gene_ids)
        if n == 0:
            raise DataError("The tokenizer vocabulary is empty", found="0 genes", expected="at least one gene")
        self.gene_ids = np.asarray(gene_ids, dtype=object)
        self.token_ids = (
            np.arange(first_gene_token, first_gene_token + n, dtype=np.int64)
            if token_ids is None
            else np.asarray(token_ids, dtype=np.int64)
        )
        medians = np.ones(n) if gene_medians is None else np.asarray(gene_medians, dtype=np.float64)
        if medians.shape != (n,) or not np.all(np.isfinite(medians)) or np.any(medians <= 0):
            raise DataError(
                "Gene medians must be positive and finite, one per vocabulary gene",
                found=f"shape {medians.shape}, min {np.nanmin(medians) if medians.size else 'n/a'}",
                expected=f"shape ({n},) with values > 0",
            )
        self.gene_medians = medians
        self.symbols = None if symbols is None else np.asarray([str(s) for s in symbols], dtype=object)
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.mask_token_id = mask_token_id
        self.cls_token_id = cls_token_id
        self.eos_token_id = eos_token_id
        self._id_index = pd.Index(self.gene_ids)
        self._token_to_gene = dict(zip(self.token_ids.tolist(), self.gene_ids.tolist()))
        self._sym_index = None
        if self.symbols is not None:
            self._sym_index = pd.Index(pd.Series(self.symbols).str.upper())

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of embedding rows a tower needs (max token id + 1)."""
        specials = [t for t in (self.pad_token_id, self.mask_token_id, self.cls_token_id, self.eos_token_id) if t is not None]
        return int(max(self.token_ids.max(initial=0), *specials) + 1)

    @property
    def n_special(self) -> int:
        """Number of special tokens added to each cell (``cls`` and ``eos``)."""
        return int(self.cls_token_id is not None) + int(self.eos_token_id is not None)

    def gene_to_token(self, genes: Sequence[str]) -> np.ndarray:
        """Token id of each gene (Ensembl ID or symbol); -1 where unknown."""
        genes = [str(g) for g in genes]
        pos = self._id_index.get_indexer([g.split(".")[0] if g.startswith("ENS") else g for g in genes])
        if self._sym_index is not None:
            miss = pos < 0
            if miss.any():
                spos = self._sym_index.get_indexer([g.upper() for g in np.asarray(genes, dtype=object)[miss]])
                pos[miss] = spos
        out = np.full(len(genes), -1, dtype=np.int64)
        out[pos >= 0] = self.token_ids[pos[pos >= 0]]
        return out

    def token_to_gene(self, tokens: Sequence[int]) -> list[str | None]:
        """Gene id of each token id (``None`` for special tokens)."""
        return [self._token_to_gene.get(int(t)) for t in tokens]

    def to_frame(self) -> pd.DataFrame:
        """Vocabulary as a table (columns ``ensembl_id``, ``symbol``, ``token_id``, ``median``)."""
        return pd.DataFrame(
            {
                "ensembl_id": self.gene_ids,
                "symbol": self.symbols if self.symbols is not None else [""] * len(self.gene_ids),
                "token_id": self.token_ids,
                "median": self.gene_medians,
            }
        )

    # ------------------------------------------------------------------ encoding
    def match_genes(self, var: pd.DataFrame | pd.Index | Sequence[str]) -> np.ndarray:
        """Token id per data gene (-1 where the gene is not in the vocabulary).

        ``var`` may be a var table: its ``ensembl_id`` column is used, then ``gene_symbol``, then the index.
        """
        if isinstance(var, pd.DataFrame):
            tokens = np.full(len(var), -1, dtype=np.int64)
            for col in ("ensembl_id", "gene_ids", "gene_id", "feature_id", "gene_symbol", "gene_name", "feature_name"):
                if col in var.columns:
                    vals = var[col].astype(object).where(var[col].notna(), "").astype(str).to_numpy()
                    miss = tokens < 0
                    tokens[miss] = self.gene_to_token(vals[miss])
            miss = tokens < 0
            tokens[miss] = self.gene_to_token(np.asarray(var.index.astype(str))[miss])
            return tokens
        return self.gene_to_token(list(var))

    def encode_matrix(self, X, var, *, progress: bool = False) -> RankEncoding:
        """Encode a cells x genes matrix.

        Parameters
        ----------
        X
            ``(n_cells, n_genes)`` non-negative expression (counts, normalised counts or ``expm1`` of
            log-normalised values), dense or sparse.
        var
            Gene identifiers of the columns (a var table or a sequence).

        Returns
        -------
        RankEncoding
            ``input_ids`` of width ``max_length`` (trim with :meth:`RankEncoding.trimmed`).

        Raises
        ------
        GeneIdentifierError
            If no column of ``X`` matches the vocabulary.
        DataError
            If ``X`` holds negative or non-finite values.
        """
        X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr()
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        col_token = self.match_genes(var)
        if col_token.shape[0] != X.shape[1]:
            raise DataError(
                "The gene list does not match the matrix",
                found=f"{col_token.shape[0]} genes for a matrix with {X.shape[1]} columns",
                expected="one identifier per column",
            )
        n_matched = int((col_token >= 0).sum())
        if n_matched == 0:
            ex = list(var.index[:5]) if isinstance(var, pd.DataFrame) else list(var)[:5]
            raise GeneIdentifierError(
                "None of the dataset's genes is in the model's vocabulary",
                found=f"genes such as {ex}",
                expected=f"Ensembl IDs or symbols such as {list(self.gene_ids[:3])}",
                fix="run engine.validate(adata) to map symbols to Ensembl IDs, or check the species",
            )
        if X.nnz and (X.data.min() < 0 or not np.isfinite(X.data).all()):
            raise DataError(
                "Rank encoding needs non-negative, finite expression",
                found=f"min {float(np.nanmin(X.data)):.3g}, {int((~np.isfinite(X.data)).sum())} non-finite values",
                expected="raw counts or log-normalised values",
                fix="pass raw counts (layers['counts']) or adata.raw; scaled data cannot be ranked",
            )
        col_token, X = self._collapse_duplicates(X, col_token)
        med_lookup = np.ones(self.vocab_size)
        med_lookup[self.token_ids] = self.gene_medians
        col_scale = np.ones(col_token.shape[0])
        ok = col_token >= 0
        col_scale[ok] = 1.0 / med_lookup[col_token[ok]]
        max_genes = self.max_length - self.n_special
        n = X.shape[0]
        ids = np.full((n, self.max_length), self.pad_token_id, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        offset = int(self.cls_token_id is not None)
        fn = _rank_rows_numba if _HAVE_NUMBA else _rank_rows_numpy
        fn(
            X.indptr.astype(np.int64),
            X.indices.astype(np.int64),
            X.data,
            col_token,
            col_scale,
            max_genes,
            offset,
            ids,
            lengths,
        )
        if self.cls_token_id is not None:
            ids[:, 0] = self.cls_token_id
            lengths += 1
        if self.eos_token_id is not None:
            ids[np.arange(n), lengths] = self.eos_token_id
            lengths += 1
        return RankEncoding(ids, lengths, self.pad_token_id)

    def encode(self, adata: "AnnData", *, kind: str = "normalized", progress: bool = False) -> RankEncoding:
        """Encode an AnnData (see :meth:`encode_matrix`); expression comes from :func:`engine.io.data.expression_matrix`."""
        from ..io.data import expression_matrix

        X, var = expression_matrix(adata, kind=kind)
        return self.encode_matrix(X, var, progress=progress)

    @staticmethod
    def _collapse_duplicates(X: sp.csr_matrix, col_token: np.ndarray):
        """Sum columns that map to the same token (Geneformer sums duplicate Ensembl IDs)."""
        ok = col_token >= 0
        tok = col_token[ok]
        if np.unique(tok).size == tok.size:
            return col_token, X
        uniq, inv = np.unique(tok, return_inverse=True)
        cols = np.flatnonzero(ok)
        M = sp.csr_matrix((np.ones(cols.size, dtype=np.float32), (cols, inv)), shape=(X.shape[1], uniq.size))
        return uniq.astype(np.int64), (X @ M).tocsr()

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the vocabulary to a TSV (``genes.tsv`` of the native checkpoint format)."""
        self.to_frame().to_csv(path, sep="\t", index=False)

    @classmethod
    def load(cls, path, **kwargs) -> "RankTokenizer":
        """Read a vocabulary TSV written by :meth:`save`; ``kwargs`` give the special tokens and length."""
        try:
            # round_trip: pandas' default float parser can miss the last digit, and load -> save would then
            # rewrite every median in the 16th digit
            df = pd.read_csv(path, sep="\t", dtype={"ensembl_id": str, "symbol": str}, float_precision="round_trip")
        except Exception as err:  # noqa: BLE001
            raise DataError("Cannot read the gene vocabulary", found=f"{path}: {err}", expected="a TSV written by RankTokenizer.save") from err
        missing = {"ensembl_id", "token_id", "median"} - set(df.columns)
        if missing:
            raise DataError("The gene vocabulary lacks columns", found=sorted(df.columns), expected=f"also {sorted(missing)}")
        sym = df["symbol"].fillna("").tolist() if "symbol" in df.columns else None
        return cls(df["ensembl_id"].tolist(), df["token_id"].to_numpy(), df["median"].to_numpy(), symbols=sym, **kwargs)

    def special_config(self) -> dict:
        """Special-token settings, for ``config.json``."""
        return {
            "max_length": self.max_length,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
            "cls_token_id": self.cls_token_id,
            "eos_token_id": self.eos_token_id,
        }
