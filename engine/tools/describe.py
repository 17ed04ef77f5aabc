"""Describe a set of cells with keywords: the mean embedding scored against term libraries (CellWhisperer's
"describe selection", seed 000 appendix C)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..errors import EmptySelectionError, QueryError
from .embed import cache_dir, get_embeds
from .selection import _cell_positions

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel

__all__ = ["describe", "term_libraries"]


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
