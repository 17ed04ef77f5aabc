"""Gene scans: perturb many genes one at a time and rank them by their effect (Geneformer's ``genes_to_perturb="all"``).

See :mod:`engine.tools.perturbation` for the mechanics of a single perturbation.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import AnalysisError, CancelledError, EmptySelectionError
from ..models.tokenizer import RankEncoding
from ._perturb_common import (
    _attention,
    _compact,
    _goal_from_embeds,
    _normalize,
    _overexpress_rows,
    _resolve_genes,
    _stack,
    _symbols,
    _token_positions,
    prepare,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel

__all__ = ["perturb_scan"]

log = logging.getLogger(__name__)


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
    if int(max_genes) < 1:
        raise AnalysisError("max_genes must be at least 1", found=max_genes, expected="a positive integer")
    prep = prepare(adata, model, mode=mode, cells=cells, max_cells=max_cells, query=query, goal=goal, random_state=random_state)
    tok, idx, enc = prep.tokenizer, prep.idx, prep.enc
    qvec, scale, gvec, gcells = prep.qvec, prep.scale, prep.gvec, prep.gcells
    lut = _token_positions(tok)
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
        both = model.embed_encoding(_stack([enc, prep.goal_encoding()]), batch_size=batch_size, cancel=cancel)
        orig, gvec = both[:n_cells], _goal_from_embeds(both[n_cells:])
    prep.expr = None  # the expression matrix is no longer needed
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
    df.attrs.update({**prep.attrs(mode, query, n_cells), "sort_by": sort_by, "ascending": bool(ascending)})
    log.info("perturbation scan: %d genes x %d cells (%d embedded) in %.2f s", n_genes, n_cells, n_rows, time.perf_counter() - t0)
    return df
