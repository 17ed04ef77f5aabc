"""Cell-type names, Cell Ontology terms and marker-based weak labels of the reference cells.

The pegasus marker sets (``assets/genesets``) are named the way their authors wrote them ("CD8 TEM
(human immune)"); here they are tied to Cell Ontology terms (:func:`marker_set_terms`, with the hand-curated
:data:`MARKER_SET_CL`), phrased as training texts (labels, synonyms, definitions, flow-cytometry "CD14+"
style), placed in their blood lineage (:func:`lineage`) and in the Azimuth pan-human naming scheme
(:func:`panhuman_name`). :func:`weak_labels` labels the reference cells from marker scores, with no ground
truth involved.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pandas as pd

from .genes import (
    CELLTYPE_GMT,
    GENESET_DIR,
    _read_gmt,
    first_positions,
    gene_table,
    nonzero_medians,
    reference_expression,
    strip_tissue,
    symbol_positions,
)

__all__ = [
    "MARKER_SET_CL",
    "MAIN_TYPES",
    "marker_set_terms",
    "weak_labels",
    "PANHUMAN_NAMES",
    "panhuman_names",
    "panhuman_name",
    "LINEAGES",
    "lineage",
]

#: Cell Ontology terms of the marker sets whose names :func:`engine.io.ontology.find_cell_type` cannot match
#: (abbreviations such as "CD4 TCM" = central memory CD4-positive T cell). Curated by hand from CL v2026-03;
#: several terms per set where CL has both the specific term and the common parent people also use.
MARKER_SET_CL = {
    "CD4 Naive T cell": ["CL:0000895"],
    "CD4 TCM": ["CL:0000904", "CL:0000897"],
    "CD4 TEM": ["CL:0000905", "CL:0000897"],
    "T regulatory cell": ["CL:0000792", "CL:0000815"],
    "CD4 CTL": ["CL:0000934"],
    "CD8 Naive T cell": ["CL:0000900"],
    "CD8 TCM": ["CL:0000907", "CL:0000909"],
    "CD8 TEM": ["CL:0000913", "CL:0000794"],
    "MAIT": ["CL:0000940"],
    "CD56-dim NK cell": ["CL:0000939"],
    "CD56-bright NK cell": ["CL:0000938"],
    "Pre B cell": ["CL:0000817"],
    "Dark zone B cell": ["CL:0000844"],
    "Light zone B cell": ["CL:0000844"],
    "CD1C+ dendritic cell": ["CL:0002399"],
    "CLEC9A+ dendritic cell": ["CL:0002394"],
    "Erythroid cell": ["CL:0000764"],
    "Pro-Neutrophil": ["CL:0000834"],
    "Pre-Neutrophil": ["CL:0000834"],
    "Tregs": ["CL:0000792", "CL:0000815"],
    "T_Naive": ["CL:0000898"],
    "DC_Migratory": ["CL:4047054"],
    "EC lymphatic": ["CL:0002138"],
    "fDC": ["CL:0000442"],
    "DCs_CLEC9A": ["CL:0002394"],
    "DCs_CD1C": ["CL:0002399"],
    "pDCs": ["CL:0000784"],
    "B_Naive": ["CL:0000788"],
    "B_Memory": ["CL:0000787"],
    "B_Germinal_Center": ["CL:0000844"],
    "B_light_zone": ["CL:0000844"],
    "B_dark_zone": ["CL:0000844"],
    "Mono_DCs": ["CL:0011031"],
    "MyoF": ["CL:0000186"],
    "Alveolar type I cell": ["CL:0002062"],
    "Alveolar type II cell": ["CL:0002063"],
    "Plumonary neuroendocrine cell": ["CL:1000223"],
    "Submucosal gland serous cell": ["CL:1000331"],
    "EC artery": ["CL:1000413"],
    "EC vein": ["CL:0002543"],
    "Aerocyte": ["CL:4028003"],
    "EC general capillary": ["CL:4028002"],
    "Airway smooth muscle cell": ["CL:0002598"],
    "Alveolar fibroblast": ["CL:4028004"],
    "GABAergic SST interneuron": ["CL:4023017"],
    "GABAergic PVALB interneuron": ["CL:4023018"],
    "GABAergic VIP interneuron": ["CL:4023016"],
    "OPC": ["CL:0002453"],
    "Microglia": ["CL:0000129"],
}


def _cd_style(name: str) -> str:
    """Cell Ontology's "CD4-positive, CD25-positive ..." written the way biologists do: "CD4+ CD25+ ..."."""
    t = re.sub(r"\b([A-Za-z0-9]+)-positive\b,?", r"\1+", name)
    t = re.sub(r"\b([A-Za-z0-9]+)-negative\b,?", r"\1-", t)
    return re.sub(r"\s+", " ", t).strip()


def _celltype_texts(name: str, description: str, markers: list[str], rng, cd_style: bool = False,
                    cl_map: bool = False) -> list[str]:
    from ...io.ontology import cell_ontology_table

    base = strip_tissue(name)
    tissue = re.search(r"\(human (\w+)\)$", name)
    tissue = tissue.group(1) if tissue else ""
    names = [base]
    definition = ""
    tids = marker_set_terms(name, curated=cl_map)
    table = cell_ontology_table()
    for t in tids:
        if t not in table.index:
            continue
        row = table.loc[t]
        names += [row["label"], *row["synonyms"][:4]]
        definition = definition or row["definition"]
    if cd_style:
        names += [_cd_style(n) for n in names]
    names = list(dict.fromkeys(n for n in names if n))
    texts = []
    for n in names:
        texts += [n, f"{n}s", f"A sample of {n} from a healthy individual", f"{n} from human {tissue}".strip()]
        if definition:
            texts += [f"cell type: {n}. {definition}", f"{n}. {definition}"]
    m = [g for g in markers[:6]]
    if len(m) >= 2:
        texts.append(f"{base} expressing {', '.join(m[:3])}")
    if definition:
        texts.append(definition)
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def _cd_aliases() -> dict[str, list[str]]:
    """Approved symbol -> its CD-antigen aliases (e.g. NCAM1 -> CD56) from the HGNC table."""
    df = gene_table()
    out: dict[str, list[str]] = {}
    for sym, al, prev in zip(df["symbol"], df["alias_symbols"].fillna(""), df["prev_symbols"].fillna("")):
        cds = [a for a in f"{al}|{prev}".split("|") if re.fullmatch(r"CD\d+[A-Z]?", a)]
        if cds:
            out[str(sym)] = cds
    return out


MAIN_TYPES = (
    "T cell", "Natural killer cell", "B cell", "Plasma cell", "CD14+ Monocyte", "CD16+ Monocyte",
    "CD1C+ dendritic cell", "Plasmacytoid dendritic cell", "Platelet", "Erythroid cell", "Hematopoietic stem cell",
)


def _celltype_hierarchy(ct: dict) -> dict[str, str]:
    """Pegasus marker set -> its parent set (from "a subtype of X" in the description)."""
    parents = {}
    for name, (desc, _) in ct.items():
        m = re.search(r"a subtype of (.+?)[.,]", desc)
        if m:
            suffix = re.search(r"\((human \w+)\)$", name)
            parents[name] = f"{m.group(1)} ({suffix.group(1)})" if suffix else m.group(1)
    return parents


@lru_cache(maxsize=1)
def weak_labels(min_z: float = 0.5, min_markers: int = 3) -> pd.DataFrame:
    """Marker-based labels of the reference cells (weak supervision; no ground truth is involved).

    Each gene is z-scored across the reference cells on ``log1p(expression / median)``; a cell's score for a
    cell type is the mean z of the type's markers. The main immune type is the best-scoring one of
    :data:`MAIN_TYPES` (if its score exceeds ``min_z``), the subtype the best-scoring child of that type.
    A cell can only take a main type whose canonical (first-listed) marker it expresses, or at least
    ``min_markers`` of its markers (2 for sets of up to 4 genes): a mean z can otherwise be carried by one
    or two broadly expressed markers (CD59 and SOX4 made 44 of the 559 blood cells "haematopoietic stem
    cells" although no cell expresses CD34, KIT or THY1).

    Returns
    -------
    pandas.DataFrame
        One row per reference cell: ``main`` and ``sub`` marker-set names ('' when unassigned), ``score``.
    """
    X, genes = reference_expression()
    R = np.log1p(X.toarray() / np.maximum(nonzero_medians(X), 1e-3))
    Z = (R - R.mean(0)) / (R.std(0) + 1e-6)
    pos = first_positions(genes["symbol"].str.upper().to_numpy())
    ct = _read_gmt(GENESET_DIR / CELLTYPE_GMT)
    parents = _celltype_hierarchy(ct)

    detected = X > 0

    def score(name, gate: bool = False):
        p = symbol_positions(pos, ct[name][1])
        if not p.size:
            return np.full(Z.shape[0], -np.inf)
        s = Z[:, p].mean(1)
        if gate:
            need = min_markers if len(ct[name][1]) > 4 else 2
            ok = np.asarray(detected[:, p].sum(1)).ravel() >= need
            first = pos.get(ct[name][1][0].upper())
            if first is not None:
                ok |= detected[:, int(first)].toarray().ravel()
            s = np.where(ok, s, -np.inf)
        return s

    mains = [f"{t} (human immune)" for t in MAIN_TYPES if f"{t} (human immune)" in ct]
    S = np.stack([score(m, gate=True) for m in mains], 1)
    best = S.argmax(1)
    out = pd.DataFrame({"main": [mains[b] if S[i, b] > min_z else "" for i, b in enumerate(best)], "sub": "", "score": S.max(1)})
    for m in mains:
        kids = [k for k, p in parents.items() if p == m and k in ct]
        rows = np.flatnonzero(out["main"].to_numpy() == m)
        if kids and rows.size:
            K = np.stack([score(k) for k in kids], 1)[rows]
            out.loc[rows, "sub"] = [kids[j] if K[r, j] > 0 else "" for r, j in enumerate(K.argmax(1))]
    return out


PANHUMAN_NAMES = GENESET_DIR / "panhuman_cell_names.tsv"


@lru_cache(maxsize=1)
def panhuman_names() -> dict[str, str]:
    """Azimuth pan-human cell names by Cell Ontology id (exact matches only; panhumanpy 1.0.0, CC BY 4.0).

    A naming scheme written by other people ("Memory CD8 T cell", "CD16 NK cell", "Treg cell") that no
    training recipe uses: :func:`proxy_benchmark` names its cells with it (``level="panhuman"``) to measure how
    a model reads phrasing it was never trained on.
    """
    d = pd.read_csv(PANHUMAN_NAMES, sep="\t")
    return dict(zip(d["cl_id"], d["name"]))


def panhuman_name(marker_set: str, max_distance: int = 3) -> tuple[str, bool] | None:
    """Pan-human name of a pegasus marker set, through its Cell Ontology term(s).

    The set's terms are :func:`engine.io.ontology.find_cell_type` of its name, else :data:`MARKER_SET_CL`; the
    first term with an exact pan-human name wins, else the nearest ancestor (at most ``max_distance`` is_a
    steps) that has one.

    Returns
    -------
    tuple of (str, bool) or None
        The name and whether it came from an ancestor; None when neither the terms nor their ancestors have one.
    """
    from ...io.ontology import ancestors

    tids = marker_set_terms(marker_set)
    names = panhuman_names()
    for t in tids:
        if t in names:
            return names[t], False
    for t in tids:
        for a, dist in sorted(ancestors(t).items(), key=lambda x: x[1]):
            if dist <= max_distance and a in names:
                return names[a], True
    return None


#: Lineage roots of :func:`lineage` (Cell Ontology id -> name), for the long-list proxy.
LINEAGES = {
    "CL:0000084": "T cell", "CL:0000623": "natural killer cell", "CL:0000236": "B cell", "CL:0000786": "plasma cell",
    "CL:0000576": "monocyte", "CL:0000451": "dendritic cell", "CL:0000775": "neutrophil",
    "CL:0000556": "megakaryocyte", "CL:0000232": "erythrocyte", "CL:0000037": "hematopoietic stem cell",
}


def lineage(term_id: str | None) -> str:
    """The blood lineage of a Cell Ontology term: the nearest of :data:`LINEAGES` among the term and its
    ancestors ('' when none, or for ``None``). ``"CL:0000913"`` (effector memory CD8 T cell) -> ``"T cell"``."""
    from ...io.ontology import ancestors

    if not term_id:
        return ""
    for t, _ in sorted({term_id: 0, **ancestors(term_id)}.items(), key=lambda x: x[1]):
        if t in LINEAGES:
            return LINEAGES[t]
    return ""


def marker_set_terms(marker_set: str, *, curated: bool = True) -> list[str]:
    """Cell Ontology ids of a pegasus marker set: :func:`engine.io.ontology.find_cell_type` of its name (without
    the tissue suffix), else :data:`MARKER_SET_CL` (``curated``; otherwise none)."""
    from ...io.ontology import find_cell_type

    base = strip_tissue(marker_set)
    tid = find_cell_type(base)
    if tid is not None:
        return [tid]
    return list(MARKER_SET_CL.get(base, [])) if curated else []
