"""Score cells against free text, label sets and term libraries.

Implements CellWhisperer's interactive scoring (seed 000 §3.2, appendix C/D; peers.md §1.6):
per-cell logits = cosine(transcriptome_embeds, text_embeds) x exp(logit_scale), the
"A MINUS B" contrast, zero-shot labels by a softmax over label texts, and keyword
descriptions of a set of cells (mean embedding scored against term libraries,
z-scored across terms). LangCell's ontology label texts (seed 001) are a template.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..errors import EmptySelectionError, QueryError
from .describe import _pretty_term, _term_embeds, describe, term_libraries  # noqa: F401 - re-exported
from .embed import embeds_source
from .selection import _cell_positions  # noqa: F401 - re-exported (perturbation imports it from here)
from .queries import (  # noqa: F401 - re-exported (they lived here before 0.1's split)
    MAX_LABEL_CHARS,
    MAX_LABEL_TEXT_CHARS,
    MAX_QUERY_CHARS,
    MAX_TEMPLATE_CHARS,
    TEMPLATE_FIELDS,
    TEMPLATES,
    _clean_query,
    _fill,
    _refuse_unstorable,
    _slug,
    check_template,
    clean_labels,
    label_texts,
    split_contrast,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel

__all__ = [
    "TEMPLATES",
    "score_text",
    "split_contrast",
    "label_texts",
    "check_template",
    "clean_labels",
    "zero_shot",
    "centered",
    "csls_offsets",
    "label_logits",
    "describe",
    "term_libraries",
    "softmax",
    "row_blocks",
    "mean_embedding",
    "SCORE_CHUNK",
]

log = logging.getLogger(__name__)

def score_text(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    query: str,
    *,
    key_added: str | None = None,
    obsm_key: str = "transcriptome_embeds",
    write: bool = True,
) -> np.ndarray:
    """Score every cell against a free-text query.

    Parameters
    ----------
    adata
        Cells with ``obsm[obsm_key]`` from :func:`engine.embed_cells` made by ``model``.
    model
        The transcriptome-text model.
    query
        A description (``"B cells"``), or ``"A MINUS B"`` to subtract the score of B from that of A.
    key_added
        ``obs`` column to write (default ``"score_<slug of query>"``).
    write
        False returns the scores without touching ``adata``.

    Embeddings are read in row blocks of :data:`SCORE_CHUNK` cells, so ``obsm[obsm_key]`` may also be a
    memory map or a dask/zarr array (large datasets); the result is the same.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` float32 logits = cosine x ``exp(logit_scale)`` (CellWhisperer's raw score; a contrast
        is a difference of two logits). Sets ``obs[key_added]`` and ``uns['lexicell_queries'][key_added]``.

    Raises
    ------
    QueryError
        Empty, non-text, too long or malformed contrast queries; NUL or other control characters and lone
        surrogates (they could not be saved to an .h5ad file).
    MissingEmbeddingError, ModelMismatchError
        Without embeddings, or embeddings of another model.
    """
    pos, neg = split_contrast(query)
    emb = embeds_source(adata, model, key=obsm_key)
    texts = [pos] if neg is None else [pos, neg]
    text_embeds = model.embed_texts(texts)
    scale = float(model.logit_scale.detach().exp().cpu())
    scores = np.empty(emb.shape[0], dtype=np.float32)
    for start, block in row_blocks(emb):
        logits = block @ text_embeds.T * scale
        scores[start : start + block.shape[0]] = logits[:, 0] if neg is None else logits[:, 0] - logits[:, 1]
    if write:
        key = key_added or f"score_{_slug(query)}"
        adata.obs[key] = scores
        hist = dict(adata.uns.get("lexicell_queries", {}))
        hist[key] = {"query": query, "model": model.name, "logit_scale": scale}
        adata.uns["lexicell_queries"] = hist
    return scores

#: Cells per block in :func:`score_text` and :func:`zero_shot` (float64 temporaries of ``block x d``).
SCORE_CHUNK = 65_536


def row_blocks(emb, chunk: int | None = None):
    """Yield ``(start, (rows, d) float32 block)`` of an ndarray, memory map, zarr, h5py or dask array."""
    step = int(chunk or SCORE_CHUNK)
    for start in range(0, emb.shape[0], step):
        block = emb[start : start + step]
        if hasattr(block, "compute"):
            block = block.compute()
        yield start, np.asarray(block, dtype=np.float32)


def mean_embedding(emb) -> np.ndarray:
    """``(d,)`` float32 mean of the rows of ``emb`` (any array :func:`row_blocks` reads), in one pass."""
    total = np.zeros(emb.shape[1], dtype=np.float64)
    for _, block in row_blocks(emb):
        total += block.sum(0, dtype=np.float64)
    return (total / max(emb.shape[0], 1)).astype(np.float32)


def _csls_offsets_blocks(emb, text_embeds: np.ndarray, k: int) -> np.ndarray:
    """:func:`csls_offsets` over all cells of ``emb`` in row blocks (a running top-k per label)."""
    if emb.shape[0] <= SCORE_CHUNK:
        return csls_offsets(next(row_blocks(emb))[1] if emb.shape[0] else np.zeros((0, text_embeds.shape[1])),
                            text_embeds, k)
    k = min(int(k), emb.shape[0])
    top = None
    t = np.asarray(text_embeds, dtype=np.float32).T
    for _, block in row_blocks(emb):
        sims = block @ t
        cand = sims if top is None else np.concatenate([top, sims], axis=0)
        top = np.partition(cand, cand.shape[0] - k, axis=0)[cand.shape[0] - k:] if cand.shape[0] > k else cand
    return top.mean(0).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def centered(embeds: np.ndarray, center: float = 0.0, *, mean: np.ndarray | None = None) -> np.ndarray:
    """Subtract ``center`` times the mean embedding of the cells: distribution normalisation (DN).

    Zhou et al., "Test-time distribution normalization for contrastively learned vision-language models"
    (NeurIPS 2023) score ``(x - 0.5 mu) . t`` instead of ``x . t``, ``mu`` the mean embedding of the items being
    scored. Per label it subtracts ``center x (mu . t)``, so label texts that sit close to the average cell
    (hubs that win the softmax for cells matching nothing well) lose that advantage.

    Parameters
    ----------
    embeds
        ``(n_cells, d)`` embeddings.
    center
        Weight of the mean, ``0`` (no change) to ``1`` (fully centred); DN uses 0.5.
    mean
        ``(d,)`` mean embedding to use (default: the mean of ``embeds``; chunked scoring passes the mean of all
        cells, :func:`mean_embedding`).

    Returns
    -------
    numpy.ndarray
        ``(n_cells, d)`` float32 (not re-normalised, as in DN).

    Raises
    ------
    QueryError
        ``center`` outside [0, 1].
    """
    if not 0.0 <= float(center) <= 1.0:
        raise QueryError("The centring weight must lie in [0, 1]", found=center, expected="0 (off) to 1; 0.5 is DN")
    emb = np.asarray(embeds, dtype=np.float32)
    if center == 0 or emb.shape[0] == 0:
        return emb
    mu = emb.mean(0, keepdims=True) if mean is None else np.asarray(mean, dtype=np.float32).reshape(1, -1)
    return (emb - np.float32(center) * mu).astype(np.float32)


def csls_offsets(embeds: np.ndarray, text_embeds: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-label hubness penalty of CSLS: each label's mean cosine with its ``k`` most similar cells.

    Conneau et al., "Word translation without parallel data" (ICLR 2018), score ``2 cos(x, t) - r(x) - r(t)``;
    ``r(x)`` is the same for every label of a cell and cancels in a softmax over labels, so only
    ``r(t)`` matters: a label text close to many cells (a hub) is marked down.

    Parameters
    ----------
    embeds
        ``(n_cells, d)`` L2-normalised cell embeddings.
    text_embeds
        ``(n_labels, d)`` L2-normalised label embeddings.
    k
        Cells per label (capped at ``n_cells``).

    Returns
    -------
    numpy.ndarray
        ``(n_labels,)`` float32 mean top-``k`` cosine per label.

    Raises
    ------
    QueryError
        ``k`` below 1.
    """
    if int(k) < 1:
        raise QueryError("The CSLS neighbourhood must hold at least one cell", found=k, expected="k >= 1, e.g. 10")
    sims = np.asarray(embeds, dtype=np.float32) @ np.asarray(text_embeds, dtype=np.float32).T
    k = min(int(k), sims.shape[0])
    if k == 0:
        return np.zeros(sims.shape[1], dtype=np.float32)
    top = np.partition(sims, sims.shape[0] - k, axis=0)[sims.shape[0] - k:]
    return top.mean(0).astype(np.float32)


def label_logits(embeds: np.ndarray, text_embeds: np.ndarray, scale: float, *, center: float = 0.0,
                 csls: int = 0, mean: np.ndarray | None = None, offsets: np.ndarray | None = None) -> np.ndarray:
    """Cell x label logits of zero-shot labelling, optionally corrected for hub labels.

    ``cos(x, t) x scale`` (the seed's protocol); with ``center`` the cells are first centred
    (:func:`centered`, DN); with ``csls`` = k, ``(cos(x, t) - 0.5 r_k(t)) x scale`` (:func:`csls_offsets`,
    CSLS halved so the temperature stays that of the model).

    ``mean`` and ``offsets`` (``(d,)`` and ``(n_labels,)``) replace the mean embedding and the CSLS offsets
    computed from ``embeds``; :func:`zero_shot` passes those of all cells when it scores a block of them.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_labels)`` float64.
    """
    e = centered(embeds, center, mean=mean).astype(np.float64)
    t = np.asarray(text_embeds, dtype=np.float64)
    logits = e @ t.T
    if csls:
        off = csls_offsets(embeds, text_embeds, csls) if offsets is None else np.asarray(offsets)
        logits = logits - 0.5 * off[None, :].astype(np.float64)
    return logits * float(scale)


def zero_shot(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    labels: Sequence[str],
    *,
    template: str = "cellwhisperer",
    definitions: dict | None = None,
    key_added: str = "zero_shot",
    obsm_key: str = "transcriptome_embeds",
    center: float = 0.0,
    csls: int = 0,
    write: bool = True,
) -> pd.DataFrame:
    """Label cells zero-shot from any list of names.

    Each label is embedded through ``template``, cells are scored against all label texts (logits), and a
    softmax over labels per cell gives probabilities (seed 000 appendix D; LangCell, seed 001).

    Parameters
    ----------
    labels
        At least two distinct, non-empty label names.
    template
        ``"cellwhisperer"`` ("A sample of {label} from a healthy individual"), ``"langcell"``
        ("cell type: {label}. {definition}", Cell Ontology definitions), ``"plain"`` or a format string.
    obsm_key
        Embeddings to score: ``"transcriptome_embeds"`` (the seed's protocol) or the neighbour-smoothed
        ``"transcriptome_embeds_smoothed"`` of :func:`engine.smooth_embeds`.
    center
        Distribution normalisation weight (:func:`centered`; 0 = the seed's protocol, 0.5 = DN), with the mean
        taken over all cells of ``adata``.
    csls
        CSLS hubness correction with this many cells per label (:func:`csls_offsets`; 0 = off).

    Cells are scored in row blocks of :data:`SCORE_CHUNK` (the mean and the CSLS offsets in a first pass over
    all cells), so ``obsm[obsm_key]`` may be a memory map or a dask/zarr array and the temporaries stay
    bounded; the result is the same as scoring all cells at once.

    Returns
    -------
    pandas.DataFrame
        ``(n_cells, n_labels)`` float32 probabilities (rows sum to 1), index ``obs_names``. Sets
        ``obs[key_added]`` (categorical best label), ``obs[key_added + '_probability']``,
        ``obsm[key_added + '_probabilities']`` and ``uns[key_added]`` (labels, texts, template).

    Raises
    ------
    QueryError
        Fewer than two labels, empty, duplicate or over-long labels, labels without letters or digits
        (:func:`clean_labels`), or a bad template (:func:`check_template`).
    MissingEmbeddingError, ModelMismatchError
        See :func:`score_text`.
    """
    labels = clean_labels(labels)
    if len(set(labels)) != len(labels):
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        raise QueryError("Labels must be distinct", found=f"duplicates {dup}", expected="each label once")
    if len(labels) < 2:
        raise QueryError("Zero-shot labelling needs at least two labels", found=labels, expected="two or more labels")
    emb = embeds_source(adata, model, key=obsm_key)
    texts = label_texts(labels, template, definitions=definitions)
    text_embeds = model.embed_texts(texts)
    scale = float(model.logit_scale.detach().exp().cpu())
    centered(np.zeros((0, 1)), center)  # checks the weight before any pass over the cells
    if int(csls) < 0:
        csls_offsets(np.zeros((0, 1)), np.zeros((0, 1)), csls)
    mean = mean_embedding(emb) if center else None
    offsets = _csls_offsets_blocks(emb, text_embeds, int(csls)) if csls else None
    probs = np.empty((emb.shape[0], len(labels)), dtype=np.float32)
    for start, block in row_blocks(emb):
        logits = label_logits(block, text_embeds, scale, center=center, csls=csls, mean=mean, offsets=offsets)
        probs[start : start + block.shape[0]] = softmax(logits, axis=1)
    df = pd.DataFrame(probs, index=adata.obs_names.copy(), columns=labels)
    if write:
        best = probs.argmax(axis=1)
        adata.obs[key_added] = pd.Categorical(np.asarray(labels, dtype=object)[best], categories=labels)
        adata.obs[f"{key_added}_probability"] = probs[np.arange(len(best)), best]
        adata.obsm[f"{key_added}_probabilities"] = probs
        adata.uns[key_added] = {"labels": list(labels), "texts": texts, "template": TEMPLATES.get(template, template),
                                "model": model.name, "obsm_key": obsm_key, "center": float(center),
                                "csls": int(csls)}
    return df
