"""In-silico perturbation of genes on the rank encoding, and gene scans.

Implements Geneformer's ``InSilicoPerturber`` mechanics (Theodoris et al., *Nature* 2023,
doi:10.1038/s41586-023-06139-9; peers.md §2.4) for any transcriptome tower that reads a
rank encoding, and reads the effect out in the joint text space of CellWhisperer
(seed 000):

* **delete**: the gene's token is removed from the cell's rank list; the cell gets one
  token shorter (all listed genes are removed together).
* **overexpress**: the gene's token moves to the front (after ``<cls>`` when the tokenizer
  has one); a gene the cell does not express is inserted there, and the list is cut back
  to ``max_length`` keeping ``<eos>``.

The perturbed cells are re-embedded through the model and compared with the embeddings of
the unperturbed encoding: the embedding shift ``cos(original, perturbed)`` (Geneformer,
scEMB seed 002), the change in a text query's logit (CellWhisperer's score), and the
goal-state shift ``cos(perturbed, goal) - cos(original, goal)`` (Geneformer's
``cell_states_to_model``). Only token lists are edited, so the code is tower-agnostic.
"""
from __future__ import annotations

import difflib
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import (
    AnalysisError,
    CancelledError,
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

__all__ = ["perturb", "perturb_scan", "delete_tokens", "overexpress_tokens", "MODES"]

log = logging.getLogger(__name__)

MODES = ("delete", "overexpress")
#: Columns written to ``obs`` by :func:`perturb` (prefixed with ``f"{key_added}_"``).
OBS_COLUMNS = ("cos_original_perturbed", "delta_logit", "goal_shift", "gene_present")
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
    from .score import _cell_positions

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
    from .score import _cell_positions

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


# =========================================================================== perturb
def perturb(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    genes: str | Sequence[str],
    *,
    mode: str = "delete",
    cells=None,
    query: str | None = None,
    goal=None,
    max_cells: int = 2000,
    batch_size: int = 512,
    key_added: str = "perturb",
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    random_state: int = 0,
) -> pd.DataFrame:
    """Delete or overexpress genes in silico in selected cells and measure the shift of their embeddings.

    The cells are rank-encoded as in :func:`engine.embed_cells`; every listed gene is edited in each cell
    at once (Geneformer's group perturbation): ``"delete"`` removes the genes' tokens (the cell gets
    shorter); ``"overexpress"`` moves them to the front, after ``<cls>`` when the tokenizer has one, in the
    order given, inserting genes the cell lacks and cutting the list back to ``max_length`` (keeping
    ``<eos>``). Original and perturbed encodings are embedded by the same model in the same run, so the
    readouts are exact differences. Cells the edit leaves unchanged (``"delete"`` of a gene the cell does not
    hold) are not re-embedded: their shift is exactly 0.

    Parameters
    ----------
    adata
        Cells x genes; expression as :func:`engine.embed_cells` reads it. ``X`` is never modified.
    model
        A :class:`~engine.models.model.TranscriptomeTextModel` with any rank-encoding transcriptome tower.
    genes
        One gene or a list, as approved symbols or Ensembl IDs of the model's vocabulary.
    mode
        ``"delete"`` or ``"overexpress"``.
    cells
        Cells to perturb: boolean mask ``(n_cells,)``, integer positions or obs names; None means all.
    query
        Text whose score change to report; ``"A MINUS B"`` scores A minus B (as :func:`engine.score_text`).
    goal
        Goal state: a text (e.g. a label text ``"A sample of B cells from a healthy individual"``), or the goal
        cells (mask, positions or obs names): the mean of their ``obsm['transcriptome_embeds']`` (re-embedded,
        at most 2,000 seeded-sampled cells, when that key is absent or from another model), L2-normalised.
    max_cells
        At most this many cells are perturbed; larger selections are subsampled with ``random_state``.
    batch_size
        Cells per forward pass.
    key_added
        Prefix of the ``obs`` columns and the ``uns`` key written.
    progress
        Show a tqdm progress bar.
    cancel
        Callable polled between batches; returning True raises :class:`~engine.errors.CancelledError`.
    random_state
        Seed of the subsampling.

    Returns
    -------
    pandas.DataFrame
        One row per perturbed cell, index ``obs_names``, in dataset order, columns:

        - ``gene_present`` (bool): the cell held at least one of the genes in its (truncated) rank encoding;
        - ``n_genes_present`` (int): how many of the genes it held;
        - ``cos_original_perturbed`` (float32): cosine of original and perturbed ``transcriptome_embeds``
          (1 = no effect; lower = larger shift);
        - with ``query``: ``logit_original``, ``logit_perturbed`` and ``delta_logit`` (float32) = perturbed minus
          original logit, logit = cosine x ``exp(logit_scale)``; positive means the perturbation raises the
          query's score;
        - with ``goal``: ``goal_shift`` (float32) = cos(perturbed, goal) - cos(original, goal); positive means
          the perturbation moves the cell toward the goal state.

        ``df.attrs`` holds ``genes``, ``symbols``, ``mode``, ``query``, ``goal``, ``n_cells`` and
        ``n_subsampled_from`` (the selection size when it was subsampled, else None).

        Sets ``adata.obs[f"{key_added}_{c}"]`` for ``c`` in ``cos_original_perturbed``, ``delta_logit`` (with a
        query), ``goal_shift`` (with a goal) and ``gene_present`` (nullable boolean), NaN/NA for cells not
        perturbed (older columns of these names are dropped first); and ``adata.uns[key_added]`` (genes, mode,
        query, goal, cell counts, model name and fingerprint).

    Raises
    ------
    GeneIdentifierError
        If a gene is not in the model's vocabulary (the message lists close matches).
    EmptySelectionError
        If no cell (or no goal cell) is selected.
    AnalysisError
        Unknown ``mode``, no gene, or ``max_cells < 1``.
    QueryError
        Malformed ``query`` or a contrast as ``goal``.
    engine.errors.CancelledError
        When cancelled.

    References
    ----------
    Theodoris et al., Geneformer, *Nature* 2023 (``InSilicoPerturber``); Hsieh et al., scEMB (seed 002);
    Schaefer et al., CellWhisperer (seed 000).
    """
    t0 = time.perf_counter()
    _check_mode(mode)
    tok = model.tokenizer
    tokens, ensembl, symbols = _resolve_genes(tok, genes)
    idx, n_from = _select_cells(adata, cells, max_cells, random_state)
    qvec, scale = _query_vector(model, query)
    gvec, gcells, goal_desc = _goal_spec(adata, model, goal, random_state=random_state)
    expr = _Expression(adata, model, idx if gcells is None else np.concatenate([idx, gcells]))
    enc = expr.encode(idx)
    parts = [enc]
    if gcells is not None:
        parts.append(expr.encode(gcells))
    present = np.isin(enc.input_ids, tokens) & enc.attention_mask
    n_present = present.sum(axis=1)
    if mode == "delete":
        pert = delete_tokens(enc, tokens)
    else:
        pert = overexpress_tokens(
            enc, tokens, cls_token_id=tok.cls_token_id, eos_token_id=tok.eos_token_id, max_length=tok.max_length
        )
    w = min(enc.input_ids.shape[1], pert.input_ids.shape[1])
    changed = (enc.lengths != pert.lengths) | (enc.input_ids[:, :w] != pert.input_ids[:, :w]).any(axis=1)
    changed |= (enc.input_ids[:, w:] != enc.pad_token_id).any(axis=1) | (pert.input_ids[:, w:] != pert.pad_token_id).any(axis=1)
    ch = np.flatnonzero(changed)
    if ch.size:
        parts.append(pert[ch])
    emb = model.embed_encoding(
        _stack(parts) if len(parts) > 1 else enc, batch_size=batch_size, progress=progress, cancel=cancel,
        desc=f"In-silico {mode} ({len(idx)} cells)",
    )
    n, n_goal = len(idx), 0 if gcells is None else gcells.size
    if gcells is not None:
        gvec = _goal_from_embeds(emb[n : n + n_goal])
    orig = _normalize(emb[:n].astype(np.float64))
    pemb = orig.copy()
    pemb[ch] = _normalize(emb[n + n_goal :].astype(np.float64))

    df = pd.DataFrame(index=adata.obs_names[idx].copy())
    df["gene_present"] = n_present > 0
    df["n_genes_present"] = n_present.astype(np.int64)
    cos = np.clip(np.einsum("ij,ij->i", orig, pemb), -1.0, 1.0)
    cos[~changed] = 1.0
    df["cos_original_perturbed"] = cos.astype(np.float32)
    if qvec is not None:
        lo = orig @ qvec * scale
        lp = pemb @ qvec * scale
        lp[~changed] = lo[~changed]
        df["logit_original"] = lo.astype(np.float32)
        df["logit_perturbed"] = lp.astype(np.float32)
        df["delta_logit"] = (lp - lo).astype(np.float32)
    if gvec is not None:
        shift = (pemb - orig) @ gvec
        shift[~changed] = 0.0
        df["goal_shift"] = shift.astype(np.float32)
    df.attrs.update(
        {
            "genes": ensembl,
            "symbols": symbols,
            "mode": mode,
            "query": query,
            "goal": goal_desc or None,
            "n_cells": int(idx.size),
            "n_subsampled_from": n_from,
        }
    )

    # ---------------------------------------------------------------- write to adata
    stale = [f"{key_added}_{c}" for c in OBS_COLUMNS if f"{key_added}_{c}" in adata.obs.columns]
    if stale:
        adata.obs.drop(columns=stale, inplace=True)
    for c in ("cos_original_perturbed", "delta_logit", "goal_shift"):
        if c in df.columns:
            col = np.full(adata.n_obs, np.nan, dtype=np.float64)
            col[idx] = df[c].to_numpy()
            adata.obs[f"{key_added}_{c}"] = col
    gp = pd.array([pd.NA] * adata.n_obs, dtype="boolean")
    gp[idx] = df["gene_present"].to_numpy()
    adata.obs[f"{key_added}_gene_present"] = pd.Series(gp, index=adata.obs_names)
    adata.uns[key_added] = {
        "genes": list(ensembl),
        "symbols": list(symbols),
        "genes_requested": [genes] if isinstance(genes, str) else [str(g) for g in genes],
        "mode": mode,
        "query": query or "",
        "goal": goal_desc,
        "n_cells": int(idx.size),
        "n_subsampled_from": int(n_from or 0),
        "n_cells_changed": int(ch.size),
        "random_state": int(random_state),
        "max_length": int(tok.max_length),
        "logit_scale": scale,
        "model_name": model.name,
        "model_fingerprint": model.fingerprint(),
    }
    log.info("in-silico %s of %s in %d cells in %.2f s", mode, symbols or ensembl, idx.size, time.perf_counter() - t0)
    return df


# =========================================================================== scan
def _pairs(present: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(gene_index, cell_index)`` rows to embed, gene-major."""
    n_cells, n_genes = present.shape
    if mode == "delete":
        g, c = np.nonzero(present.T)
        return g.astype(np.int64), c.astype(np.int64)
    return np.repeat(np.arange(n_genes), n_cells), np.tile(np.arange(n_cells), n_genes)


def perturb_scan(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    *,
    genes: Sequence[str] | None = None,
    mode: str = "delete",
    cells=None,
    query: str | None = None,
    goal=None,
    max_cells: int = 500,
    max_genes: int = 200,
    batch_size: int = 1024,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    random_state: int = 0,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Perturb many genes one at a time in the selected cells and rank them by their effect.

    Each gene is deleted (or overexpressed) alone in every selected cell, exactly as in :func:`perturb`. All
    perturbed encodings of a chunk of genes x cells are built at once as one
    :class:`~engine.models.tokenizer.RankEncoding` and embedded in large batches; the unperturbed cells are embedded
    once.

    For ``"delete"`` only the cells that hold the gene in their (truncated) rank encoding are re-embedded,
    and the means are over those cells only (a cell without the gene is unchanged, its effect exactly 0, and
    counting it would only dilute the mean by the gene's detection rate; ``n_cells_expressing`` gives that
    rate). For ``"overexpress"`` every selected cell is perturbed and the means are over all of them.

    Ranking (``df.attrs['sort_by']``, ``df.attrs['ascending']``):

    - with ``query``: by ``mean_delta_logit``. For ``"delete"`` ascending: the first genes are those whose
      removal lowers the query's score most, i.e. the genes the score depends on most (a negative value means
      deletion moves cells away from the query; a positive one means the gene holds the score back). For
      ``"overexpress"`` descending: the first genes are those whose overexpression raises the score most.
    - without ``query``, with ``goal``: by ``mean_goal_shift`` descending (genes whose perturbation moves the
      cells toward the goal state most come first).
    - with neither: by ``mean_cos_original_perturbed`` ascending (largest embedding shift first).

    Genes without any perturbed cell get NaN means and come last.

    Parameters
    ----------
    adata
        Cells x genes; ``X`` is never modified and nothing is written to ``adata``.
    model
        A :class:`~engine.models.model.TranscriptomeTextModel` with any rank-encoding transcriptome tower.
    genes
        Genes to scan (symbols or Ensembl IDs). Default: the genes present in the selected cells' rank
        encodings, most frequently present first, at most ``max_genes``.
    mode
        ``"delete"`` or ``"overexpress"``.
    cells
        Boolean mask, positions or obs names; None means all cells.
    query
        Text whose logit change ranks the genes; ``"A MINUS B"`` allowed.
    goal
        Goal state (a text or goal cells), as in :func:`perturb`.
    max_cells
        At most this many cells (seeded subsample with ``random_state`` beyond).
    max_genes
        At most this many genes (the first ones when ``genes`` is given).
    batch_size
        Perturbed cells per forward pass.
    progress
        Show a tqdm progress bar (unit: perturbed cells).
    cancel
        Callable polled between batches; returning True raises :class:`~engine.errors.CancelledError`.
    chunk_size
        Perturbed cells built per chunk (memory bound; default ``4 x batch_size``).

    Returns
    -------
    pandas.DataFrame
        One row per gene, sorted as described, columns ``gene`` (vocabulary id, Ensembl), ``symbol``,
        ``n_cells_expressing`` (selected cells holding the gene), ``n_cells_perturbed`` (cells averaged over),
        ``mean_delta_logit`` (NaN without ``query``), ``mean_cos_original_perturbed``, ``mean_goal_shift``
        (NaN without ``goal``). ``df.attrs``: ``mode``, ``query``, ``goal``, ``n_cells``,
        ``n_subsampled_from``, ``sort_by``, ``ascending``.

    Raises
    ------
    GeneIdentifierError
        If a listed gene is not in the vocabulary (close matches are listed).
    EmptySelectionError
        If no cell is selected, or the selected cells express no gene of the vocabulary.
    AnalysisError
        Unknown ``mode``, ``max_cells`` or ``max_genes`` below 1.
    QueryError
        Malformed ``query`` or a contrast as ``goal``.
    engine.errors.CancelledError
        When cancelled.

    References
    ----------
    Theodoris et al., Geneformer, *Nature* 2023 (``InSilicoPerturber`` with ``genes_to_perturb="all"``);
    Hsieh et al., scEMB (seed 002), gene ranking by embedding shift.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    _check_mode(mode)
    if int(max_genes) < 1:
        raise AnalysisError("max_genes must be at least 1", found=max_genes, expected="a positive integer")
    tok = model.tokenizer
    lut = _token_positions(tok)
    idx, n_from = _select_cells(adata, cells, max_cells, random_state)
    qvec, scale = _query_vector(model, query)
    gvec, gcells, goal_desc = _goal_spec(adata, model, goal, random_state=random_state)
    expr = _Expression(adata, model, idx if gcells is None else np.concatenate([idx, gcells]))
    enc = expr.encode(idx)
    attn = enc.attention_mask

    if genes is None:
        ids = enc.input_ids[attn]
        ids = ids[(ids < lut.size)]
        ids = ids[lut[ids] >= 0]  # gene tokens only (no <cls>/<eos>)
        counts = np.bincount(ids, minlength=lut.size)
        cand = np.flatnonzero(counts)
        if cand.size == 0:
            raise EmptySelectionError(
                "The selected cells express no gene of the model's vocabulary",
                found=f"{idx.size} cells with empty rank encodings",
                expected="cells with expression",
            )
        order = np.lexsort((cand, -counts[cand]))  # most frequent first, then token id
        tokens = cand[order][: int(max_genes)].astype(np.int64)
        pos = lut[tokens]
        ensembl, symbols = [str(g) for g in tok.gene_ids[pos]], _symbols(tok, pos)
    else:
        tokens, ensembl, symbols = _resolve_genes(tok, genes)
        tokens, ensembl, symbols = tokens[: int(max_genes)], ensembl[: int(max_genes)], symbols[: int(max_genes)]

    n_cells, n_genes = len(enc), tokens.size
    # presence matrix (n_cells, n_genes): does cell c hold gene g
    col = np.full(lut.size, -1, dtype=np.int64)
    col[tokens] = np.arange(n_genes)
    safe = np.where((enc.input_ids < lut.size) & attn, enc.input_ids, 0)
    hit = col[safe]
    hit[~attn] = -1
    present = np.zeros((n_cells, n_genes), dtype=bool)
    r, c = np.nonzero(hit >= 0)
    present[r, hit[r, c]] = True
    n_expr = present.sum(axis=0)

    if gcells is None:
        orig = model.embed_encoding(enc, batch_size=batch_size, cancel=cancel)
    else:
        both = model.embed_encoding(_stack([enc, expr.encode(gcells)]), batch_size=batch_size, cancel=cancel)
        orig, gvec = both[:n_cells], _goal_from_embeds(both[n_cells:])
    del expr
    orig = _normalize(orig.astype(np.float64)).astype(np.float32)
    g_of_row, c_of_row = _pairs(present, mode)
    n_rows = g_of_row.size
    sum_cos = np.zeros(n_genes)
    sum_dl = np.zeros(n_genes)
    sum_gs = np.zeros(n_genes)
    n_pert = np.bincount(g_of_row, minlength=n_genes)
    chunk = max(int(chunk_size or 4 * batch_size), 1)
    with tqdm(total=n_rows, desc=f"Perturbation scan ({mode}, {n_genes} genes)", unit="cell", disable=not progress) as bar:
        for s in range(0, n_rows, chunk):
            if cancel is not None and cancel():
                raise CancelledError("The perturbation scan was cancelled", found=f"{s} of {n_rows} perturbed cells done")
            gr, cr = g_of_row[s : s + chunk], c_of_row[s : s + chunk]
            ids, lengths = enc.input_ids[cr], enc.lengths[cr]
            rt = tokens[gr]
            if mode == "delete":
                remove = (ids == rt[:, None]) & _attention(ids, lengths)
                pids, plen = _compact(ids, lengths, remove, enc.pad_token_id)
            else:
                pids, plen = _overexpress_rows(
                    ids, lengths, rt[:, None], pad=enc.pad_token_id, cls_token_id=tok.cls_token_id,
                    eos_token_id=tok.eos_token_id, max_length=tok.max_length,
                )
            pe = model.embed_encoding(RankEncoding(pids, plen, enc.pad_token_id), batch_size=batch_size, cancel=cancel)
            pe = _normalize(pe.astype(np.float64))
            oe = orig[cr].astype(np.float64)
            sum_cos += np.bincount(gr, weights=np.clip(np.einsum("ij,ij->i", oe, pe), -1, 1), minlength=n_genes)
            diff = pe - oe
            if qvec is not None:
                sum_dl += np.bincount(gr, weights=diff @ qvec * scale, minlength=n_genes)
            if gvec is not None:
                sum_gs += np.bincount(gr, weights=diff @ gvec, minlength=n_genes)
            bar.update(gr.size)

    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.where(n_pert > 0, n_pert, np.nan)
        df = pd.DataFrame(
            {
                "gene": ensembl,
                "symbol": symbols,
                "n_cells_expressing": n_expr.astype(np.int64),
                "n_cells_perturbed": n_pert.astype(np.int64),
                "mean_delta_logit": sum_dl / denom if qvec is not None else np.nan,
                "mean_cos_original_perturbed": sum_cos / denom,
                "mean_goal_shift": sum_gs / denom if gvec is not None else np.nan,
            }
        )
    if qvec is not None:
        sort_by, ascending = "mean_delta_logit", mode == "delete"
    elif gvec is not None:
        sort_by, ascending = "mean_goal_shift", False
    else:
        sort_by, ascending = "mean_cos_original_perturbed", True
    df = df.sort_values(sort_by, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)
    df.attrs.update(
        {
            "mode": mode,
            "query": query,
            "goal": goal_desc or None,
            "n_cells": int(n_cells),
            "n_subsampled_from": n_from,
            "sort_by": sort_by,
            "ascending": bool(ascending),
        }
    )
    log.info("perturbation scan: %d genes x %d cells (%d embedded) in %.2f s", n_genes, n_cells, n_rows, time.perf_counter() - t0)
    return df
