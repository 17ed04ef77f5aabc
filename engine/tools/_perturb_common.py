"""Shared pieces of in-silico perturbation: edits of rank encodings and the setup of a perturbation call.

Token edits follow Geneformer's ``InSilicoPerturber`` (Theodoris et al., *Nature* 2023): deletion removes a
gene's token; overexpression moves it to the front (after ``<cls>``), inserting it when absent and cutting
back to ``max_length``. They are pure functions of token arrays, so they work for any rank-encoding tower.
:func:`prepare` resolves the genes, selects the cells, reads their expression once and builds the query and
goal directions used by :func:`engine.tools.perturbation.perturb` and
:func:`engine.tools.perturbation_scan.perturb_scan`.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..errors import (
    AnalysisError,
    EmptySelectionError,
    GeneIdentifierError,
    MissingEmbeddingError,
    ModelMismatchError,
    QueryError,
)
from ..models.tokenizer import RankEncoding

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel
    from ..models.tokenizer import RankTokenizer

__all__ = ["delete_tokens", "overexpress_tokens", "prepare", "Prepared", "MODES"]

log = logging.getLogger(__name__)

MODES = ("delete", "overexpress")
#: At most this many goal cells are embedded when ``obsm['transcriptome_embeds']`` cannot be used.
MAX_GOAL_CELLS = 2000


# =========================================================================== token edits (pure)
def _attention(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.arange(ids.shape[1])[None, :] < lengths[:, None]


def _compact(ids: np.ndarray, lengths: np.ndarray, remove: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the positions flagged in ``remove`` (within each length), shifting later tokens left."""
    keep = _attention(ids, lengths) & ~remove
    new_len = keep.sum(axis=1).astype(np.int64)
    if not remove.any():
        return ids.copy(), new_len
    order = np.argsort(~keep, axis=1, kind="stable")  # kept tokens first, in their order
    out = np.take_along_axis(ids, order, axis=1)
    out[np.arange(ids.shape[1])[None, :] >= new_len[:, None]] = pad
    return out, new_len


def _unique_tokens(token_ids) -> np.ndarray:
    toks = np.atleast_1d(np.asarray(token_ids, dtype=np.int64))
    if toks.ndim != 1:
        raise AnalysisError("Token ids must be a flat list", found=f"shape {toks.shape}", expected="(n_tokens,)")
    _, first = np.unique(toks, return_index=True)
    return toks[np.sort(first)]


def delete_tokens(encoding: RankEncoding, token_ids: Iterable[int]) -> RankEncoding:
    """Remove gene tokens from every cell of a rank encoding (Geneformer's ``delete``).

    Parameters
    ----------
    encoding
        ``(n_cells, width)`` padded rank encoding.
    token_ids
        Token ids to remove (all together). Tokens a cell does not hold leave it unchanged.

    Returns
    -------
    RankEncoding
        New encoding of the same width and ``pad_token_id``: each cell keeps its other tokens in order (so
        ``<cls>``/``<eos>`` stay in place) and is shorter by the number of removed tokens. The input is not
        modified.
    """
    toks = _unique_tokens(list(token_ids))
    ids, lengths = encoding.input_ids, np.asarray(encoding.lengths, dtype=np.int64)
    remove = np.isin(ids, toks) & _attention(ids, lengths)
    out, new_len = _compact(ids, lengths, remove, encoding.pad_token_id)
    return RankEncoding(out, new_len, encoding.pad_token_id)


def _overexpress_rows(
    ids: np.ndarray,
    lengths: np.ndarray,
    tokens: np.ndarray,
    *,
    pad: int,
    cls_token_id: int | None,
    eos_token_id: int | None,
    max_length: int,
    min_width: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Move/insert ``tokens[i]`` (``(n, k)``) to the front of row ``i``; see :func:`overexpress_tokens`."""
    n, w = ids.shape
    k = tokens.shape[1]
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.arange(n)
    if w == 0:
        ids = np.full((n, 1), pad, dtype=ids.dtype)
        w = 1
    nonempty = lengths > 0
    has_cls = (cls_token_id is not None) & nonempty & (ids[:, 0] == (cls_token_id if cls_token_id is not None else -1))
    last = ids[rows, np.maximum(lengths - 1, 0)]
    has_eos = (eos_token_id is not None) & (lengths > has_cls) & (last == (eos_token_id if eos_token_id is not None else -1))
    prefix = has_cls.astype(np.int64)
    suffix = has_eos.astype(np.int64)
    if int((prefix + suffix).max(initial=0)) + k > max_length:
        raise AnalysisError(
            "max_length is too small to hold the overexpressed genes",
            found=f"max_length {max_length}, {k} genes plus special tokens",
            expected=f"max_length >= {k + int((prefix + suffix).max(initial=0))}",
        )
    pos = np.arange(w)[None, :]
    inside = (pos >= prefix[:, None]) & (pos < (lengths - suffix)[:, None])  # gene part of the cell
    remove = (ids[:, :, None] == tokens[:, None, :]).any(axis=2) & inside
    ids1, len1 = _compact(ids, lengths, remove, pad)
    body_keep = np.minimum(len1 - prefix - suffix, max_length - prefix - k - suffix)
    new_len = prefix + k + body_keep + suffix
    width = max(int(new_len.max(initial=1)), min(int(min_width), int(max_length)), 1)
    out = np.full((n, width), pad, dtype=ids.dtype)
    src = min(width - k, ids1.shape[1])
    if src > 0:
        out[:, k : k + src] = ids1[:, :src]  # body shifted right by k (old position p -> p + k)
    if has_cls.any():
        out[has_cls, 0] = cls_token_id
    out[rows[:, None], prefix[:, None] + np.arange(k)[None, :]] = tokens
    out[np.arange(width)[None, :] >= (prefix + k + body_keep)[:, None]] = pad
    if has_eos.any():
        er = np.flatnonzero(has_eos)
        out[er, new_len[er] - 1] = eos_token_id
    return out, new_len


def overexpress_tokens(
    encoding: RankEncoding,
    token_ids: Iterable[int],
    *,
    cls_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_length: int,
) -> RankEncoding:
    """Move gene tokens to the front of every cell (Geneformer's ``overexpress``).

    Parameters
    ----------
    encoding
        ``(n_cells, width)`` padded rank encoding.
    token_ids
        Token ids to put first, in the order given (duplicates dropped). A token the cell already holds
        moves; one it lacks is inserted.
    cls_token_id
        When given and a cell starts with it, the genes go right after ``<cls>``.
    eos_token_id
        When given and a cell ends with it, ``<eos>`` stays last after truncation.
    max_length
        Longest allowed cell (special tokens included); the lowest-ranked genes are cut to fit.

    Returns
    -------
    RankEncoding
        New encoding; its width is the input width (capped at ``max_length``) or the longest new cell,
        whichever is larger. The input is not modified.

    Raises
    ------
    AnalysisError
        If ``max_length`` cannot hold the genes plus the special tokens.
    """
    toks = _unique_tokens(list(token_ids))
    n = len(encoding)
    tok = np.broadcast_to(toks[None, :], (n, toks.size))
    out, new_len = _overexpress_rows(
        encoding.input_ids,
        encoding.lengths,
        tok,
        pad=encoding.pad_token_id,
        cls_token_id=cls_token_id,
        eos_token_id=eos_token_id,
        max_length=int(max_length),
        min_width=encoding.input_ids.shape[1],
    )
    return RankEncoding(out, new_len, encoding.pad_token_id)


def _stack(encodings: Sequence[RankEncoding]) -> RankEncoding:
    """Concatenate encodings of possibly different widths (padding to the widest)."""
    pad = encodings[0].pad_token_id
    width = max(max(e.input_ids.shape[1] for e in encodings), 1)
    n = sum(len(e) for e in encodings)
    ids = np.full((n, width), pad, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    r = 0
    for e in encodings:
        m = len(e)
        ids[r : r + m, : e.input_ids.shape[1]] = e.input_ids
        lengths[r : r + m] = e.lengths
        r += m
    return RankEncoding(ids, lengths, pad)


# =========================================================================== helpers
def _symbols(tok: "RankTokenizer", positions: np.ndarray) -> list[str]:
    if tok.symbols is None:
        return [""] * len(positions)
    return [str(s) for s in tok.symbols[positions]]


def _token_positions(tok: "RankTokenizer") -> np.ndarray:
    """Lookup array token id -> vocabulary row (-1 for special / unused ids)."""
    lut = np.full(int(tok.token_ids.max(initial=0)) + 1, -1, dtype=np.int64)
    lut[tok.token_ids] = np.arange(tok.token_ids.size)
    return lut


def _resolve_genes(tok: "RankTokenizer", genes) -> tuple[np.ndarray, list[str], list[str]]:
    """Token ids, Ensembl ids and symbols of ``genes`` (symbols or Ensembl IDs), duplicates dropped."""
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g).strip() for g in (genes if genes is not None else [])]
    if not genes or any(not g for g in genes):
        raise AnalysisError(
            "No gene to perturb",
            found=repr(genes),
            expected="one or more gene symbols or Ensembl IDs, e.g. ['CD19']",
        )
    tokens = tok.gene_to_token(genes)
    bad = [g for g, t in zip(genes, tokens) if t < 0]
    if bad:
        cands = [str(g) for g in tok.gene_ids]
        if tok.symbols is not None:
            cands += [str(s) for s in tok.symbols if str(s)]
        upper = {}
        for c in cands:
            upper.setdefault(c.upper(), c)
        hints = []
        for g in bad[:5]:
            close = difflib.get_close_matches(g.upper(), list(upper), n=5, cutoff=0.6)
            hints.append(f"{g}: {', '.join(upper[c] for c in close) if close else 'no close match'}")
        raise GeneIdentifierError(
            "Some genes are not in the model's vocabulary",
            found=f"{len(bad)} unknown gene(s): {bad[:10]}",
            expected="approved symbols or Ensembl IDs the model knows",
            fix="close matches: " + "; ".join(hints),
        )
    _, first = np.unique(tokens, return_index=True)
    tokens = tokens[np.sort(first)]
    pos = _token_positions(tok)[tokens]
    return tokens, [str(g) for g in tok.gene_ids[pos]], _symbols(tok, pos)


def _select_cells(adata: "AnnData", cells, max_cells: int, random_state: int) -> tuple[np.ndarray, int | None]:
    """Sorted positions of the selected cells, subsampled (seeded) to ``max_cells``; and the pre-sample count."""
    from .selection import _cell_positions

    if int(max_cells) < 1:
        raise AnalysisError("max_cells must be at least 1", found=max_cells, expected="a positive integer")
    idx = np.unique(_cell_positions(adata, cells))
    if idx.size == 0:
        raise EmptySelectionError(
            "No cells are selected for the perturbation",
            found="an empty selection",
            expected="at least one cell",
            fix="select cells on the map or pass cells=None for all cells",
        )
    if idx.size > max_cells:
        rng = np.random.default_rng(random_state)
        return np.sort(rng.choice(idx, size=int(max_cells), replace=False)), int(idx.size)
    return idx, None


class _Expression:
    """Expression of the cells a call needs, read once (:func:`engine.io.data.expression_matrix`), rank-encoded on demand.

    Only the rows in ``rows`` are read (a view of ``adata`` when that is not all cells); normalisation is per
    cell, so each cell's encoding is the one :func:`engine.embed_cells` makes.
    """

    def __init__(self, adata: "AnnData", model: "TranscriptomeTextModel", rows: np.ndarray) -> None:
        from ..io.data import expression_matrix

        self.rows = np.unique(rows)
        kind = "counts" if getattr(model.transcriptome_tower, "requires_counts", False) else "normalized"
        sub = adata if self.rows.size == adata.n_obs else adata[self.rows]
        self.X, self.var = expression_matrix(sub, kind=kind)
        self.tokenizer = model.tokenizer

    def encode(self, idx: np.ndarray) -> RankEncoding:
        """Rank encoding (trimmed to the longest cell) of the cells at dataset positions ``idx``."""
        return self.tokenizer.encode_matrix(self.X[np.searchsorted(self.rows, idx)], self.var).trimmed()


def _query_vector(model: "TranscriptomeTextModel", query: str | None) -> tuple[np.ndarray | None, float]:
    """``(embed_dim,)`` text direction whose dot product x scale is the query's logit (A - B for contrasts)."""
    from .score import split_contrast

    scale = float(model.logit_scale.detach().exp().cpu())
    if query is None:
        return None, scale
    pos, neg = split_contrast(query)
    t = model.embed_texts([pos] if neg is None else [pos, neg])
    q = t[0] if neg is None else t[0] - t[1]
    return q.astype(np.float32), scale


def _goal_spec(adata: "AnnData", model: "TranscriptomeTextModel", goal, *, random_state: int):
    """Resolve ``goal`` into ``(vector or None, goal cells to embed or None, description)``.

    A text gives its ``text_embeds``; goal cells give the mean of their ``obsm['transcriptome_embeds']`` when
    that key exists and belongs to ``model``, else the positions of (at most :data:`MAX_GOAL_CELLS`,
    seeded-sampled) cells to embed; :func:`_goal_from_embeds` finishes the job.
    """
    if goal is None:
        return None, None, ""
    if isinstance(goal, str):
        from .score import split_contrast

        pos, neg = split_contrast(goal)
        if neg is not None:
            raise QueryError(
                "A goal text cannot be a contrast",
                found=repr(goal),
                expected="one label text, e.g. 'A sample of B cells from a healthy individual'",
                fix="pass the contrast as query=..., or the goal state's text alone as goal=...",
            )
        return model.embed_texts([pos])[0].astype(np.float32), None, f"text: {pos}"
    from .embed import get_embeds
    from .selection import _cell_positions

    gidx = np.unique(_cell_positions(adata, goal))
    if gidx.size == 0:
        raise EmptySelectionError(
            "The goal state has no cells",
            found="an empty goal selection",
            expected="a boolean mask, positions or obs names of at least one cell",
        )
    try:
        emb = get_embeds(adata, model)[gidx]
    except (MissingEmbeddingError, ModelMismatchError):
        sub = gidx
        if sub.size > MAX_GOAL_CELLS:
            sub = np.sort(np.random.default_rng(random_state).choice(gidx, MAX_GOAL_CELLS, replace=False))
        return None, sub, f"mean embedding of {sub.size} of {gidx.size} goal cells (re-embedded)"
    return _goal_from_embeds(emb), None, f"mean of obsm['transcriptome_embeds'] of {gidx.size} goal cells"


def _goal_from_embeds(emb: np.ndarray) -> np.ndarray:
    g = emb.astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(g)
    if not np.isfinite(norm) or norm == 0:
        raise AnalysisError("The goal cells' mean embedding is zero", found=f"{emb.shape[0]} cells",
                            expected="cells of a coherent state")
    return (g / norm).astype(np.float32)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise AnalysisError("Unknown perturbation mode", found=repr(mode), expected=" or ".join(map(repr, MODES)))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Prepared:
    """What both perturbation functions start from (see :func:`prepare`)."""

    tokenizer: "RankTokenizer"
    idx: np.ndarray  # dataset positions of the perturbed cells, sorted
    n_from: int | None  # selection size when it was subsampled, else None
    qvec: np.ndarray | None  # (embed_dim,) query direction
    scale: float  # exp(logit_scale)
    gvec: np.ndarray | None  # (embed_dim,) goal direction from a text
    gcells: np.ndarray | None  # goal cells to embed in the same run
    goal_desc: str
    expr: "_Expression"
    enc: RankEncoding  # rank encoding of the cells at ``idx``

    def goal_encoding(self) -> RankEncoding | None:
        """Rank encoding of the goal cells, or None when the goal is a text."""
        return None if self.gcells is None else self.expr.encode(self.gcells)

    def attrs(self, mode: str, query: str | None, n_cells: int) -> dict:
        """The ``df.attrs`` both functions return."""
        return {
            "mode": mode,
            "query": query,
            "goal": self.goal_desc or None,
            "n_cells": int(n_cells),
            "n_subsampled_from": self.n_from,
        }


def prepare(adata: "AnnData", model: "TranscriptomeTextModel", *, mode: str, cells, max_cells: int, query: str | None,
            goal, random_state: int) -> Prepared:
    """Check the mode, select the cells, read their expression once and build the query and goal directions.

    Raises
    ------
    AnalysisError, EmptySelectionError, QueryError
        As :func:`engine.tools.perturbation.perturb` documents.
    """
    _check_mode(mode)
    idx, n_from = _select_cells(adata, cells, max_cells, random_state)
    qvec, scale = _query_vector(model, query)
    gvec, gcells, goal_desc = _goal_spec(adata, model, goal, random_state=random_state)
    expr = _Expression(adata, model, idx if gcells is None else np.concatenate([idx, gcells]))
    return Prepared(model.tokenizer, idx, n_from, qvec, scale, gvec, gcells, goal_desc, expr, expr.encode(idx))
