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

import logging
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd

from ._perturb_common import MODES, _goal_from_embeds, _normalize, _resolve_genes, _stack, delete_tokens, overexpress_tokens, prepare
from .perturbation_scan import perturb_scan

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel

__all__ = ["perturb", "perturb_scan", "delete_tokens", "overexpress_tokens", "MODES"]

log = logging.getLogger(__name__)

#: Columns written to ``obs`` by :func:`perturb` (prefixed with ``f"{key_added}_"``).
OBS_COLUMNS = ("cos_original_perturbed", "delta_logit", "goal_shift", "gene_present")


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
    prep = prepare(adata, model, mode=mode, cells=cells, max_cells=max_cells, query=query, goal=goal, random_state=random_state)
    tok, idx, enc = prep.tokenizer, prep.idx, prep.enc
    qvec, scale, gvec, gcells, goal_desc = prep.qvec, prep.scale, prep.gvec, prep.gcells, prep.goal_desc
    tokens, ensembl, symbols = _resolve_genes(tok, genes)
    parts = [enc]
    if gcells is not None:
        parts.append(prep.goal_encoding())
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
    df.attrs.update({"genes": ensembl, "symbols": symbols, **prep.attrs(mode, query, idx.size)})

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
        "n_subsampled_from": int(prep.n_from or 0),
        "n_cells_changed": int(ch.size),
        "random_state": int(random_state),
        "max_length": int(tok.max_length),
        "logit_scale": scale,
        "model_name": model.name,
        "model_fingerprint": model.fingerprint(),
    }
    log.info("in-silico %s of %s in %d cells in %.2f s", mode, symbols or ensembl, idx.size, time.perf_counter() - t0)
    return df
