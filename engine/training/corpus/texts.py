"""Texts for corpus profiles, built the LangCell way from their metadata (seed 001).

LangCell pairs each cell with texts made from its Cell Ontology label, synonyms and definition; CellWhisperer
(seed 000) pairs each sample with a free-text description of its metadata. Each profile here gets several
phrasings (the CL name, a synonym, the source's own label, the definition, tissue, species and assay in
different sentence forms) so that the model learns the language around a cell type, not one template.
"""
from __future__ import annotations

import re
from functools import lru_cache

import pandas as pd

__all__ = ["profile_texts", "describe_profile", "plural"]

_SPECIES_ADJ = {"human": "human", "mouse": "mouse"}


def plural(name: str) -> str:
    """'B cell' -> 'B cells', 'hepatocyte' -> 'hepatocytes' (last word only; names already plural stay)."""
    name = name.strip()
    if not name or name.endswith("s"):
        return name
    if name.endswith(("cell", "cyte", "blast", "phage", "phil", "crophage", "neuron", "progenitor", "precursor", "fibroblast")):
        return name + "s"
    if name.endswith("y"):
        return name[:-1] + "ies"
    return name + "s"


def _clean_label(label: str) -> str:
    s = str(label).replace("_", " ").replace(".", " ").strip()
    s = re.sub(r"\s+", " ", s)
    return s


@lru_cache(maxsize=4096)
def _cl_entry(term_id: str) -> tuple[str, str, tuple[str, ...]]:
    from ...io.ontology import cell_ontology_table

    cl = cell_ontology_table()
    if term_id not in cl.index:
        return term_id, "", ()
    row = cl.loc[term_id]
    syns = tuple(s for s in row["synonyms"] if 3 <= len(s) <= 80)
    return str(row["label"]), str(row["definition"] or ""), syns


def describe_profile(row: pd.Series | dict) -> str:
    """One canonical description of a corpus profile (the ``description`` obs column when the source gives none)."""
    name, _, _ = _cl_entry(str(row["cell_type_ontology_term_id"]))
    species = _SPECIES_ADJ.get(str(row.get("species", "")), str(row.get("species", "")))
    tissue = str(row.get("tissue", "") or "").strip()
    where = f" from {species} {tissue}" if tissue else f" ({species})"
    return f"{plural(name)}{where}, {row.get('assay', '')}".rstrip(", ")


def profile_texts(row: pd.Series | dict) -> list[str]:
    """Several phrasings of one profile's metadata.

    Parameters
    ----------
    row
        A corpus ``obs`` row: ``cell_type_ontology_term_id``, ``source_label``, ``tissue``, ``species``,
        ``assay``, ``description``.

    Returns
    -------
    list of str
        Distinct texts (about 8–14): CL name and plural, a synonym, the source label, LangCell's
        "cell type: {name}. {definition}", name with tissue/species/assay, the source description.
    """
    tid = str(row["cell_type_ontology_term_id"])
    name, definition, syns = _cl_entry(tid)
    src = _clean_label(row.get("source_label", "") or "")
    tissue = str(row.get("tissue", "") or "").strip()
    species = _SPECIES_ADJ.get(str(row.get("species", "")), str(row.get("species", "")))
    assay = str(row.get("assay", "") or "").strip()
    desc = str(row.get("description", "") or "").strip()
    names = plural(name)
    out = [
        name,
        names,
        f"cell type: {name}",
        f"{names} from {tissue}" if tissue else f"{species} {names}",
        f"{species} {tissue} {names}".strip(),
        f"a {species} {tissue} sample of {names}".replace("  ", " "),
        f"{names} in the {tissue} of a healthy {species}" if tissue else f"{names} of a healthy {species}",
    ]
    if definition:
        out.append(f"cell type: {name}. {definition}")
        out.append(f"{definition}")
    if syns:
        out.extend(syns[:3])
        out.append(f"{plural(syns[0])} from {tissue}" if tissue else plural(syns[0]))
    if src and src.lower() not in {name.lower(), names.lower()} and not src.isdigit() and len(src) > 2:
        out.append(src)
        out.append(f"{src} cells from {species} {tissue}".replace("  ", " ").strip())
    if desc:
        out.append(desc)
    if assay:
        out.append(f"{names} profiled by {assay}")
    seen, uniq = set(), []
    for t in out:
        t = re.sub(r"\s+", " ", t).strip()
        if t and t.lower() not in seen:
            seen.add(t.lower())
            uniq.append(t)
    return uniq
