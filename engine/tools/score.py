"""Score cells against free text, label sets and term libraries.

Implements CellWhisperer's interactive scoring (seed 000 §3.2, appendix C/D; peers.md §1.6):
per-cell logits = cosine(transcriptome_embeds, text_embeds) x exp(logit_scale), the
"A MINUS B" contrast, zero-shot labels by a softmax over label texts, and keyword
descriptions of a set of cells (mean embedding scored against term libraries,
z-scored across terms). LangCell's ontology label texts (seed 001) are a template.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import string
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from .embed import cache_dir, get_embeds
from ..errors import EmptySelectionError, QueryError

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
]

log = logging.getLogger(__name__)

#: Label templates. ``{label}`` is the label, ``{definition}`` its Cell Ontology definition.
TEMPLATES: dict[str, str] = {
    "cellwhisperer": "A sample of {label} from a healthy individual",
    "langcell": "cell type: {label}. {definition}",
    "plain": "{label}",
}
MAX_QUERY_CHARS = 2000
#: Longest custom template accepted by :func:`label_texts` (characters).
MAX_TEMPLATE_CHARS = 500
#: Longest label accepted by :func:`zero_shot` (characters).
MAX_LABEL_CHARS = 500
#: Longest label text a template may produce (characters; a Cell Ontology definition is at most ~1,000).
MAX_LABEL_TEXT_CHARS = 4000
#: The only template fields: the label and its Cell Ontology definition.
TEMPLATE_FIELDS = ("label", "definition")


def _refuse_unstorable(text: str, what: str) -> None:
    """Raise QueryError for NUL, other control characters (except whitespace) and lone surrogates.

    Such characters cannot be written to an .h5ad file (h5py refuses lone surrogates and truncates at NUL),
    so they are refused where the text enters rather than when the results are saved.
    """
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            raise QueryError(f"The {what} holds a lone surrogate character", found=f"U+{code:04X} at position {i}",
                             expected="text of valid Unicode characters", fix="retype the text without it")
        if unicodedata.category(ch) == "Cc" and not ch.isspace():
            raise QueryError(f"The {what} holds a control character", found=f"U+{code:04X} at position {i}",
                             expected="printable text (tabs and line breaks count as spaces)",
                             fix="retype the text without it")


def _clean_query(text: str) -> str:
    if not isinstance(text, str):
        raise QueryError("A query must be text", found=type(text).__name__, expected="a string such as 'B cells'")
    _refuse_unstorable(text, "query")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = " ".join(text.split())
    if not text:
        raise QueryError("The query is empty", found="an empty or whitespace-only text", expected="a description such as 'B cells'")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError("The query is too long", found=f"{len(text)} characters", expected=f"at most {MAX_QUERY_CHARS}")
    return text


def clean_labels(labels: Sequence[str], what: str = "label") -> list[str]:
    """Check and normalise label names for zero-shot labelling (whitespace collapsed).

    Parameters
    ----------
    labels
        Label names.
    what
        Word used in error messages (``"label"``, ``"candidate label"``).

    Returns
    -------
    list of str
        The labels with runs of whitespace collapsed to one space.

    Raises
    ------
    QueryError
        A label is not text, is empty, longer than :data:`MAX_LABEL_CHARS`, holds a control character or a lone
        surrogate, or has no letter or digit (an emoji- or punctuation-only label would be scored like any
        other text and can win the softmax for many cells).
    """
    if isinstance(labels, str):
        raise QueryError(f"The {what}s must be a list of names", found=repr(labels[:80]),
                         expected="a list such as ['B cell', 'T cell']")
    out = []
    for lab in labels:
        if not isinstance(lab, str):
            lab = str(lab)
        _refuse_unstorable(lab, what)
        lab = " ".join(lab.split())
        if not lab:
            raise QueryError(f"A {what} is empty", found=repr(lab), expected="non-empty label names")
        if len(lab) > MAX_LABEL_CHARS:
            raise QueryError(f"A {what} is too long", found=f"{len(lab)} characters ({lab[:40]!r}...)",
                             expected=f"at most {MAX_LABEL_CHARS} characters")
        if not any(ch.isalnum() for ch in lab):
            raise QueryError(f"A {what} has no letters or digits", found=repr(lab),
                             expected="a name such as 'B cell' (emoji or punctuation alone carry no meaning for the model)",
                             fix="remove that label or spell it out")
        out.append(lab)
    return out


def check_template(template: str) -> str:
    """Resolve and check a label template; return the format string.

    Parameters
    ----------
    template
        A key of :data:`TEMPLATES` or a custom template holding the fields ``{label}`` (``{}`` means
        ``{label}``) and optionally ``{definition}``. Fields take no format spec (``{label:>30}``), conversion
        (``{label!r}``), attribute or index; ``{{`` and ``}}`` are literal braces.

    Returns
    -------
    str
        The format string (``{}`` replaced by ``{label}``).

    Raises
    ------
    QueryError
        Not text, longer than :data:`MAX_TEMPLATE_CHARS`, unbalanced braces, no field, or a field other than
        ``{label}`` / ``{definition}`` (the message names what was found and what is allowed).
    """
    if not isinstance(template, str):
        raise QueryError("A template must be text", found=type(template).__name__, expected="e.g. 'A sample of {label}'")
    fmt = TEMPLATES.get(template, template)
    if len(fmt) > MAX_TEMPLATE_CHARS:
        raise QueryError("The template is too long", found=f"{len(fmt)} characters",
                         expected=f"at most {MAX_TEMPLATE_CHARS} characters with {{label}}")
    _refuse_unstorable(fmt, "template")
    allowed = "the fields {label} and {definition} only, with no format spec, conversion or attribute"
    try:
        parts = list(string.Formatter().parse(fmt))
    except ValueError as err:
        raise QueryError("The template cannot be read", found=f"{fmt!r}: {err}", expected=allowed,
                         fix="write literal braces as {{ and }}") from err
    n_fields = 0
    for _, field, spec, conv in parts:
        if field is None:
            continue
        n_fields += 1
        shown = "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if field not in ("",) + TEMPLATE_FIELDS or spec or conv:
            raise QueryError("The template holds a field that is not allowed", found=shown, expected=allowed)
    if n_fields == 0:
        raise QueryError("The template has no placeholder", found=repr(fmt), expected="a text with {label}, e.g. 'A sample of {label}'")
    pieces = []
    for lit, field, _, _ in parts:
        pieces.append(lit.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            pieces.append("{" + (field or "label") + "}")
    return "".join(pieces)


def _fill(fmt: str, values: dict[str, str]) -> str:
    """Fill a template checked by :func:`check_template` without ``str.format`` (no widths, no attributes)."""
    return "".join(lit + ("" if field is None else values[field or "label"])
                   for lit, field, _, _ in string.Formatter().parse(fmt))


def split_contrast(query: str) -> tuple[str, str | None]:
    """Split CellWhisperer's ``"A MINUS B"`` form into ``(A, B)``; ``B`` is None for a plain query.

    Raises
    ------
    QueryError
        If a side is empty or ``MINUS`` appears more than once.
    """
    query = _clean_query(query)
    parts = re.split(r"\s+MINUS\s+|^MINUS\s+|\s+MINUS$", query)
    if len(parts) == 1:
        return parts[0], None
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise QueryError(
            "A contrast query needs text on both sides of one MINUS",
            found=repr(query),
            expected="'A MINUS B', e.g. 'T cells MINUS regulatory T cells'",
        )
    return parts[0].strip(), parts[1].strip()


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()
    return s[:n] or "query"


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
    emb = get_embeds(adata, model, key=obsm_key)
    texts = [pos] if neg is None else [pos, neg]
    text_embeds = model.embed_texts(texts)
    scale = float(model.logit_scale.detach().exp().cpu())
    logits = emb @ text_embeds.T * scale
    scores = logits[:, 0] if neg is None else logits[:, 0] - logits[:, 1]
    scores = scores.astype(np.float32)
    if write:
        key = key_added or f"score_{_slug(query)}"
        adata.obs[key] = scores
        hist = dict(adata.uns.get("lexicell_queries", {}))
        hist[key] = {"query": query, "model": model.name, "logit_scale": scale}
        adata.uns["lexicell_queries"] = hist
    return scores


def label_texts(labels: Sequence[str], template: str = "cellwhisperer", *, definitions: dict | None = None) -> list[str]:
    """Turn labels into texts through a template.

    Parameters
    ----------
    labels
        Label names (e.g. cell types).
    template
        A key of :data:`TEMPLATES` or a format string with ``{label}`` (or ``{}``) and optionally
        ``{definition}``.
    definitions
        Label -> definition; missing ones come from the Cell Ontology (empty when not found; the text then
        ends after the label).

    Returns
    -------
    list of str
        One text per label, whitespace collapsed, without a trailing full stop.

    Raises
    ------
    QueryError
        A bad template (see :func:`check_template`) or a produced text longer than
        :data:`MAX_LABEL_TEXT_CHARS`.
    """
    fmt = check_template(template)
    fields = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
    out = []
    for lab in labels:
        d = ""
        if "definition" in fields:
            d = (definitions or {}).get(lab)
            if d is None:
                from ..io.ontology import definition

                d = definition(lab)
        text = _fill(fmt, {"label": str(lab), "definition": str(d or "")})
        if len(text) > MAX_LABEL_TEXT_CHARS:
            raise QueryError("A label text is too long", found=f"{len(text)} characters for label {str(lab)[:40]!r}",
                             expected=f"at most {MAX_LABEL_TEXT_CHARS} characters", fix="use a shorter template or label")
        out.append(" ".join(text.split()).rstrip(" ."))
    return out


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def centered(embeds: np.ndarray, center: float = 0.0) -> np.ndarray:
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
    return (emb - np.float32(center) * emb.mean(0, keepdims=True)).astype(np.float32)


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
                 csls: int = 0) -> np.ndarray:
    """Cell x label logits of zero-shot labelling, optionally corrected for hub labels.

    ``cos(x, t) x scale`` (the seed's protocol); with ``center`` the cells are first centred
    (:func:`centered`, DN); with ``csls`` = k, ``(cos(x, t) - 0.5 r_k(t)) x scale`` (:func:`csls_offsets`,
    CSLS halved so the temperature stays that of the model).

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_labels)`` float64.
    """
    e = centered(embeds, center).astype(np.float64)
    t = np.asarray(text_embeds, dtype=np.float64)
    logits = e @ t.T
    if csls:
        logits = logits - 0.5 * csls_offsets(embeds, text_embeds, csls)[None, :].astype(np.float64)
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
    emb = get_embeds(adata, model, key=obsm_key)
    texts = label_texts(labels, template, definitions=definitions)
    text_embeds = model.embed_texts(texts)
    scale = float(model.logit_scale.detach().exp().cpu())
    probs = softmax(label_logits(emb, text_embeds, scale, center=center, csls=csls), axis=1).astype(np.float32)
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


# --------------------------------------------------------------------------- term libraries
def _pretty_term(term: str) -> str:
    """Make gene-set names readable for the text tower (``HALLMARK_G2M_CHECKPOINT`` -> ``g2m checkpoint``)."""
    t = re.sub(r"^(HALLMARK|REACTOME|KEGG|WP|BIOCARTA|PID|GOBP|GOMF|GOCC|GO)_", "", term)
    if t.isupper() or "_" in t:
        t = t.replace("_", " ").lower()
    return t


def term_libraries(names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Term libraries for :func:`describe`: gene-set names of the shipped libraries plus Cell Ontology labels.

    Returns
    -------
    dict
        Library name -> list of term names (the gene-set names, as CellWhisperer uses Enrichr term names).
    """
    from ..io import genesets
    from ..io.ontology import cell_ontology_table

    libs: dict[str, list[str]] = {}
    wanted = list(names) if names is not None else None
    for name in genesets.list_libraries():
        if wanted is None or name in wanted:
            libs[name] = list(genesets.load_library(name).keys())
    if wanted is None or "Cell_Ontology" in wanted:
        libs["Cell_Ontology"] = sorted(set(cell_ontology_table()["label"]) - {""})
    return libs


def _term_embeds(model: "TranscriptomeTextModel", terms: list[str]) -> np.ndarray:
    """Text embeddings of many terms, cached on disk per model fingerprint and term list."""
    texts = [_pretty_term(t) for t in terms]
    h = hashlib.blake2b(("\x1f".join(texts) + model.fingerprint()).encode(), digest_size=16).hexdigest()
    f = Path(cache_dir()) / "terms" / f"{h}.npy"
    if f.is_file():
        try:
            arr = np.load(f, allow_pickle=False)
            if arr.shape == (len(texts), model.projection_dim):
                return arr
        except (OSError, ValueError):
            pass
    arr = model.embed_texts(texts, cache=False, batch_size=256)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, f)
    return arr


def describe(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    cells=None,
    *,
    libraries: Sequence[str] | dict[str, Sequence[str]] | None = None,
    top_n: int = 5,
    obsm_key: str = "transcriptome_embeds",
) -> pd.DataFrame:
    """Describe a set of cells with keywords, as CellWhisperer's "describe selection".

    The mean ``transcriptome_embeds`` of the cells (not re-normalised) is scored against every term of every
    library; scores are z-scored across all terms, negative ones dropped, and the ``top_n`` terms per
    library kept; libraries are ordered by their best z-score.

    Parameters
    ----------
    cells
        Boolean mask ``(n_cells,)``, integer positions or obs names; None means all cells.
    libraries
        Library names (see :func:`term_libraries`) or a dict name -> terms.

    Returns
    -------
    pandas.DataFrame
        Columns ``library``, ``term``, ``zscore``, ``logit``.

    Raises
    ------
    EmptySelectionError
        If no cell is selected.
    """
    emb = get_embeds(adata, model, key=obsm_key)
    idx = _cell_positions(adata, cells)
    if idx.size == 0:
        raise EmptySelectionError("No cells are selected", found="an empty selection", expected="at least one cell", fix="select cells on the map first")
    mean = emb[idx].mean(axis=0)
    libs = libraries if isinstance(libraries, dict) else term_libraries(libraries)
    all_terms = [(lib, t) for lib, terms in libs.items() for t in terms]
    if not all_terms:
        raise QueryError("No terms to describe with", found="empty libraries", expected="at least one term")
    text_embeds = _term_embeds(model, [t for _, t in all_terms])
    scale = float(model.logit_scale.detach().exp().cpu())
    logits = text_embeds @ mean * scale
    z = (logits - logits.mean()) / (logits.std() + 1e-12)
    df = pd.DataFrame({"library": [lib for lib, _ in all_terms], "term": [t for _, t in all_terms], "zscore": z, "logit": logits})
    df = df[df["zscore"] > 0].sort_values("zscore", ascending=False)
    df = df.groupby("library", sort=False).head(top_n)
    order = df.groupby("library", sort=False)["zscore"].max().sort_values(ascending=False).index
    df["library"] = pd.Categorical(df["library"], categories=list(order))
    out = df.sort_values(["library", "zscore"], ascending=[True, False]).reset_index(drop=True)
    out["library"] = out["library"].astype(str)
    return out


def _cell_positions(adata: "AnnData", cells) -> np.ndarray:
    """Integer positions from a mask, positions, obs names or None (all cells)."""
    n = adata.n_obs
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise EmptySelectionError("The selection mask has the wrong length", found=arr.shape, expected=f"({n},)")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.array([], dtype=int)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() >= n:
            raise EmptySelectionError("Cell positions are out of range", found=f"{arr.min()}..{arr.max()}", expected=f"0..{n - 1}")
        return arr.astype(int)
    pos = adata.obs_names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        raise EmptySelectionError("Some selected cells are not in the dataset", found=list(arr[pos < 0][:5]), expected="obs names of this dataset")
    return pos
