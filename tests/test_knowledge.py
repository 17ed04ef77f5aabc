"""Knowledge-derived training pairs and the GenePT-style initialisation (default-model recipe)."""
from __future__ import annotations

import numpy as np
import pytest

from engine import knowledge


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
