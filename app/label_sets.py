"""Built-in zero-shot label sets (data only).

Each set is a list of ``(label, Cell Ontology id or None)``. Cell-type labels are the
Cell Ontology's own labels (CL v2026-03-26), so the ``"langcell"`` template
(``"cell type: {label}. {definition}"``) finds their definitions through
``engine.io.ontology``; states (cell cycle, activation) have no CL id. ``template`` is
the template the set is meant for: a key of ``engine.tools.score.TEMPLATES`` or a format
string with ``{label}``.
"""
from __future__ import annotations

__all__ = ["LABEL_SETS", "label_names"]

LABEL_SETS: dict[str, dict] = {
    "Immune / blood cell types": {
        "template": "cellwhisperer",
        "description": "Peripheral blood and bone-marrow immune cells (PBMC-level resolution).",
        "labels": [
            ("CD4-positive, alpha-beta T cell", "CL:0000624"),
            ("CD8-positive, alpha-beta T cell", "CL:0000625"),
            ("regulatory T cell", "CL:0000815"),
            ("gamma-delta T cell", "CL:0000798"),
            ("natural killer cell", "CL:0000623"),
            ("naive B cell", "CL:0000788"),
            ("memory B cell", "CL:0000787"),
            ("plasma cell", "CL:0000786"),
            ("classical monocyte", "CL:0000860"),
            ("non-classical monocyte", "CL:0000875"),
            ("conventional dendritic cell", "CL:0000990"),
            ("plasmacytoid dendritic cell", "CL:0000784"),
            ("megakaryocyte", "CL:0000556"),
            ("erythrocyte", "CL:0000232"),
            ("hematopoietic stem cell", "CL:0000037"),
            ("neutrophil", "CL:0000775"),
        ],
    },
    "Immune (coarse)": {
        "template": "cellwhisperer",
        "description": "Broad immune lineages.",
        "labels": [
            ("T cell", "CL:0000084"),
            ("natural killer cell", "CL:0000623"),
            ("B cell", "CL:0000236"),
            ("CD14-positive monocyte", "CL:0001054"),
            ("conventional dendritic cell", "CL:0000990"),
            ("megakaryocyte", "CL:0000556"),
        ],
    },
    "Pancreas cell types": {
        "template": "cellwhisperer",
        "description": "Islet endocrine, exocrine and stromal cells of the pancreas.",
        "labels": [
            ("pancreatic A cell", "CL:0000171"),
            ("type B pancreatic cell", "CL:0000169"),
            ("pancreatic D cell", "CL:0000173"),
            ("pancreatic PP cell", "CL:0002275"),
            ("pancreatic epsilon cell", "CL:0005019"),
            ("pancreatic acinar cell", "CL:0002064"),
            ("pancreatic ductal cell", "CL:0002079"),
            ("pancreatic stellate cell", "CL:0002410"),
            ("endothelial cell", "CL:0000115"),
            ("macrophage", "CL:0000235"),
            ("mast cell", "CL:0000097"),
            ("Schwann cell", "CL:0002573"),
        ],
    },
    "Lung cell types": {
        "template": "cellwhisperer",
        "description": "Airway and alveolar epithelium, stroma, endothelium and lung immune cells.",
        "labels": [
            ("pulmonary alveolar type 1 cell", "CL:0002062"),
            ("pulmonary alveolar type 2 cell", "CL:0002063"),
            ("lung multiciliated epithelial cell", "CL:1000271"),
            ("club cell", "CL:0000158"),
            ("respiratory basal cell", "CL:0002633"),
            ("goblet cell", "CL:0000160"),
            ("pulmonary neuroendocrine cell", "CL:1000223"),
            ("alveolar macrophage", "CL:0000583"),
            ("fibroblast", "CL:0000057"),
            ("smooth muscle cell", "CL:0000192"),
            ("capillary endothelial cell", "CL:0002144"),
            ("endothelial cell of lymphatic vessel", "CL:0002138"),
            ("mesothelial cell", "CL:0000077"),
        ],
    },
    "Brain cell types": {
        "template": "cellwhisperer",
        "description": "Neurons, glia and vascular cells of the brain.",
        "labels": [
            ("glutamatergic neuron", "CL:0000679"),
            ("GABAergic neuron", "CL:0000617"),
            ("astrocyte", "CL:0000127"),
            ("oligodendrocyte", "CL:0000128"),
            ("oligodendrocyte precursor cell", "CL:0002453"),
            ("microglial cell", "CL:0000129"),
            ("endothelial cell", "CL:0000115"),
            ("pericyte", "CL:0000669"),
            ("ependymal cell", "CL:0000065"),
            ("vascular leptomeningeal cell", "CL:4023051"),
        ],
    },
    "Cell-cycle phase": {
        "template": "A sample of cells in {label}",
        "description": "Cell-cycle states (no Cell Ontology terms).",
        "labels": [
            ("G1 phase, not dividing", None),
            ("S phase, replicating DNA", None),
            ("G2/M phase, dividing", None),
        ],
    },
    "Activation state": {
        "template": "A sample of {label} cells",
        "description": "Functional states of immune cells (no Cell Ontology terms).",
        "labels": [
            ("resting, quiescent", None),
            ("activated", None),
            ("proliferating", None),
            ("exhausted", None),
            ("interferon-stimulated", None),
            ("stressed, apoptotic", None),
        ],
    },
}


def label_names(set_name: str) -> list[str]:
    """Label names of a built-in set, in order."""
    return [label for label, _ in LABEL_SETS[set_name]["labels"]]
