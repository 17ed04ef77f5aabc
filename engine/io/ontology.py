"""Cell Ontology look-ups (labels, synonyms, definitions) through ``cellxgene-ontology-guide``.

Used for LangCell-style label texts ("cell type: {label}. {definition}"; Zhao et al.
2024, seed 001) and for text pairs of the default model. Works offline: the
ontology ships inside the package (CL v2026-03-26, CC-BY-4.0).
"""
from __future__ import annotations

import re
from functools import lru_cache

import pandas as pd

__all__ = ["cell_ontology_table", "find_cell_type", "definition", "ancestors"]


@lru_cache(maxsize=1)
def _parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


@lru_cache(maxsize=1)
def cell_ontology_table() -> pd.DataFrame:
    """All non-deprecated CL terms.

    Returns
    -------
    pandas.DataFrame
        Index ``CL:…`` ids; columns ``label``, ``definition`` (may be empty), ``synonyms`` (list of str).
    """
    op = _parser()
    ids = [t for t in op.get_term_label_to_id_map("CL").values() if t.startswith("CL:")]
    ids = [t for t in dict.fromkeys(ids) if not op.is_term_deprecated(t)]
    labels = op.map_term_labels(ids)
    defs = op.map_term_descriptions(ids)
    syns = op.map_term_synonyms(ids)
    return pd.DataFrame(
        {
            "label": [labels.get(t) or "" for t in ids],
            "definition": [defs.get(t) or "" for t in ids],
            "synonyms": [list(syns.get(t) or []) for t in ids],
        },
        index=pd.Index(ids, name="term_id"),
    )


def _norm(text: str) -> str:
    text = text.lower().replace("-positive", "+").replace("positive", "+")
    text = re.sub(r"[^a-z0-9+]+", " ", text)
    text = re.sub(r"\bcells\b", "cell", text)
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _lookup() -> dict[str, str]:
    table = cell_ontology_table()
    out: dict[str, str] = {}
    for tid, row in table.iterrows():  # synonyms first, labels win on clashes
        for s in row["synonyms"]:
            out.setdefault(_norm(s), tid)
    for tid, row in table.iterrows():
        out[_norm(row["label"])] = tid
    return out


def find_cell_type(name: str) -> str | None:
    """CL id whose label or synonym matches ``name`` (case, plural and punctuation insensitive), else None."""
    if name.strip().upper().startswith("CL:"):
        tid = name.strip().upper()
        return tid if tid in cell_ontology_table().index else None
    key = _norm(name)
    hit = _lookup().get(key)
    if hit is None and not key.endswith("cell"):
        hit = _lookup().get(key + " cell")
    return hit


def definition(name: str) -> str:
    """Text definition of a cell type name or CL id ('' when unknown or undefined)."""
    tid = find_cell_type(name)
    if tid is None:
        return ""
    return str(cell_ontology_table().loc[tid, "definition"] or "")


def ancestors(term_id: str) -> dict[str, int]:
    """Ancestors of a CL term with their is_a distance (1 = parent); empty for an unknown id."""
    try:
        return dict(_parser().get_term_ancestors_with_distances(term_id))
    except (KeyError, ValueError):
        return {}
