"""Knowledge-derived training pairs and the GenePT-style initialisation (default-model recipe)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.training import knowledge


@pytest.mark.slow
def test_build_pairs_small(tmp_path):
    tok = knowledge.build_vocabulary(tmp_path / "genes.tsv", max_length=64)
    assert len(tok.gene_ids) > 10_000 and all(g.startswith("ENSG") for g in tok.gene_ids[:100])
    data = knowledge.build_pairs(vocabulary=tmp_path / "genes.tsv", n_per_celltype=3, n_per_geneset=1,
                                 n_per_gene=1, n_per_reference_cell=1, include_go=False)
    assert data.X.shape[0] == len(data.texts) == len(data.groups)
    assert data.X.shape[1] == len(tok.gene_ids) and data.X.nnz > 0 and data.X.data.min() > 0
    assert any("B cell" in t for t in data.texts) and any("prolif" in t for t in data.texts)
    # a B-cell pseudo-cell ranks B-cell markers first
    tok.max_length = 64
    rows = [k for k, t in enumerate(data.texts) if "B cell" in t][:50]
    enc = tok.encode_matrix(data.X[rows], data.var)
    b_markers = {"MS4A1", "CD79A", "CD79B", "BANK1", "BLK", "FCRLA", "CD19", "CD22"}
    hits = [
        bool({s.upper() for s in np.asarray(tok.symbols)[np.searchsorted(tok.token_ids, enc.tokens(i)[:5])]} & b_markers)
        for i in range(len(rows))
    ]
    assert any(hits)


def test_weak_labels_are_marker_sets():
    w = knowledge.weak_labels()
    assert len(w) == 559
    named = set(w["main"]) - {""}
    assert named and all(n.endswith("(human immune)") for n in named)


def test_weak_labels_need_the_canonical_marker_or_several_markers():
    """No reference cell expresses CD34, KIT or THY1, so none may be called a haematopoietic stem cell
    (the ungated mean z made 44 of them HSCs through the broadly expressed CD59 and SOX4)."""
    X, genes = knowledge.reference_expression()
    sym = genes["symbol"].str.upper().to_numpy()
    assert X[:, np.isin(sym, ["CD34", "KIT", "THY1"])].nnz == 0
    w = knowledge.weak_labels()
    assert not (w["main"] == "Hematopoietic stem cell (human immune)").any()
    # the common blood types are still found
    counts = w["main"].value_counts()
    for t in ("CD14+ Monocyte", "T cell", "Natural killer cell", "B cell"):
        assert counts.get(f"{t} (human immune)", 0) >= 10, counts


def test_cd_style_names():
    assert knowledge._cd_style("CD4-positive, CD25-positive, alpha-beta regulatory T cell") == "CD4+ CD25+ alpha-beta regulatory T cell"
    assert knowledge._cd_style("CD16-negative, CD56-bright natural killer cell, human") == "CD16- CD56-bright natural killer cell, human"
    assert knowledge._cd_style("B cell") == "B cell"


def test_marker_set_cell_ontology_map_is_valid():
    from engine.io.ontology import cell_ontology_table, find_cell_type

    table = cell_ontology_table()
    gmt = knowledge._read_gmt(knowledge.GENESET_DIR / knowledge.CELLTYPE_GMT)
    bases = {k.rsplit(" (", 1)[0] for k in gmt}
    for name, ids in knowledge.MARKER_SET_CL.items():
        assert name in bases, name  # a key that no marker set uses would be silently dead
        assert find_cell_type(name) is None, name  # the ontology lookup would win anyway
        assert ids and all(i in table.index for i in ids), (name, ids)
    rng = np.random.default_rng(0)
    texts = knowledge._celltype_texts("CD8 TEM (human immune)", "", ["GZMB", "PRF1"], rng, cd_style=True, cl_map=True)
    assert "effector memory CD8-positive, alpha-beta T cell" in texts
    assert "CD8+ alpha-beta cytotoxic T cell" in texts
    assert any(t.startswith("cell type: CD8 TEM. ") for t in texts)  # with the CL definition
    plain = knowledge._celltype_texts("CD8 TEM (human immune)", "", ["GZMB", "PRF1"], rng)
    assert not any("cytotoxic" in t for t in plain)


def test_holdout_cells_fixed_and_disjoint():
    a, b = knowledge.holdout_cells(0.2), knowledge.holdout_cells(0.2)
    assert np.array_equal(a, b) and a.size == round(0.2 * 559) and np.unique(a).size == a.size
    assert knowledge.holdout_cells(0.0).size == 0


def test_variable_gene_ranking_sorted():
    r = knowledge.variable_gene_ranking()
    assert r.index.str.startswith("ENSG").all() and r.is_monotonic_decreasing and len(r) > 5_000


@pytest.mark.slow
def test_build_pairs_holdout_and_panels(tmp_path):
    tok = knowledge.build_vocabulary(tmp_path / "genes.tsv", max_length=64)
    kw = dict(vocabulary=tmp_path / "genes.tsv", n_per_celltype=2, n_per_geneset=1, n_per_gene=1, include_go=False)
    full = knowledge.build_pairs(n_per_reference_cell=1, **kw)
    held = knowledge.build_pairs(n_per_reference_cell=1, holdout_fraction=0.5, **kw)
    # weakly labelled copies of held-out cells are gone
    assert held.X.shape[0] < full.X.shape[0]
    panel = knowledge.build_pairs(n_per_reference_cell=0, panel_fraction=1.0, panel_sizes=(500, 500), **kw)
    top = set(knowledge.variable_gene_ranking().index[:500])
    ids = np.asarray(tok.gene_ids)
    nnz_genes = set(ids[np.unique(panel.X.indices)])
    # every profile restricted to the 500-gene panel, except sets with fewer than two panel genes
    def restricted(d):
        return np.mean([len(set(ids[d.X[i].indices]) - top) == 0 for i in range(d.X.shape[0])])

    # profiles are restricted to the 500-gene panel, except where fewer than two of the set's genes are in it
    assert restricted(panel) > 0.2 and restricted(full) < 0.01 and len(nnz_genes) > 500
    # shallow re-sampling gives integer counts with fewer genes per profile than the deep originals
    shallow = knowledge.build_pairs(n_per_reference_cell=1, depth_fraction=1.0, depth_range=(500, 500), **kw)
    assert np.allclose(shallow.X.data, np.round(shallow.X.data))
    assert np.diff(shallow.X.indptr).mean() < np.diff(full.X.indptr).mean()


@pytest.mark.slow
def test_reference_depth_fraction_resamples_only_reference_cell_pairs(tmp_path):
    knowledge.build_vocabulary(tmp_path / "genes.tsv", max_length=64)
    kw = dict(vocabulary=tmp_path / "genes.tsv", n_per_geneset=0, n_per_gene=0, include_go=False)
    # only the weakly labelled reference cells' own pairs: every one re-sampled to integer counts
    ref = knowledge.build_pairs(n_per_celltype=0, n_per_reference_cell=1, reference_depth_fraction=1.0,
                                depth_range=(500, 500), **kw)
    n_labelled = int((knowledge.weak_labels()["main"] != "").sum())
    assert ref.X.shape[0] == n_labelled
    assert np.allclose(ref.X.data, np.round(ref.X.data))
    # marker pseudo-cells keep their non-integer values (the option leaves them alone)
    pseudo = knowledge.build_pairs(n_per_celltype=2, n_per_reference_cell=0, reference_depth_fraction=1.0, **kw)
    assert not np.allclose(pseudo.X.data, np.round(pseudo.X.data))


def test_holdout_folds_are_disjoint_halves_covering_every_cell():
    from engine.errors import AnalysisError
    from engine.training.knowledge import holdout_cells, reference_expression

    n = reference_expression()[0].shape[0]
    a, b = holdout_cells(0.5, 0), holdout_cells(0.5, 1)
    assert np.intersect1d(a, b).size == 0 and np.union1d(a, b).size == n
    assert np.array_equal(a, holdout_cells(0.5, 0))  # fixed
    assert np.array_equal(holdout_cells(0.2), holdout_cells(0.2, None))  # the single fixed hold-out (fold None) is unchanged
    with pytest.raises(AnalysisError, match="fold"):
        holdout_cells(0.5, 2)


def test_panhuman_names_come_from_the_cell_ontology():
    from engine.training.knowledge import panhuman_name, panhuman_names

    names = panhuman_names()
    assert names["CL:0000084"] == "T cell" and len(names) > 150
    assert panhuman_name("CD8 TCM (human immune)") == ("Memory CD8 T cell", False)  # via MARKER_SET_CL's 2nd term
    assert panhuman_name("CD56-dim NK cell (human immune)") == ("CD16 NK cell", False)
    assert panhuman_name("CD8 TEM (human immune)") == ("Memory CD8 T cell", True)  # through an ancestor
    assert panhuman_name("No such cell type") is None


def test_build_pairs_holdout_fold_leaves_out_that_half(tmp_path):
    from engine.training.knowledge import build_pairs, holdout_cells

    held = holdout_cells(0.5, 1)
    d = build_pairs(n_per_celltype=1, n_per_geneset=0, n_per_gene=0, n_per_reference_cell=1, include_go=False,
                    holdout_fraction=0.5, holdout_fold=1)
    d0 = build_pairs(n_per_celltype=1, n_per_geneset=0, n_per_gene=0, n_per_reference_cell=1, include_go=False,
                     holdout_fraction=0.5, holdout_fold=0)
    # one pair per weakly labelled training cell: the two halves give different pair counts unless equal by chance,
    # and neither includes the other half's labelled cells
    from engine.training.knowledge import weak_labels

    lab = np.flatnonzero(weak_labels()["main"].to_numpy() != "")
    assert len(d) - len(d0) == (np.setdiff1d(lab, held).size - np.intersect1d(lab, held).size)


def test_ontology_ancestors():
    from engine.io.ontology import ancestors

    anc = ancestors("CL:0000913")  # effector memory CD8-positive, alpha-beta T cell
    assert anc["CL:0000084"] >= 2 and min(anc.values()) == 1  # T cell, some steps up
    assert ancestors("CL:9999999") == {}
