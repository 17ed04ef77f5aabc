"""Paired data container and its readers (engine.training.pairs)."""
from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.errors import ConfigError, DataError, MissingKeyError
from engine.training.pairs import PairedData, clean_text, from_anndata, from_archs4, load_source, write_tiny_archs4

from conftest import GENES, make_counts


def _pd(genes, n=4, texts=None, groups=None, name="p", seed=0):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(2.0, size=(n, len(genes))).astype(np.float32))
    return PairedData(X=X, var=pd.DataFrame(index=genes), texts=texts or [f"t{i}" for i in range(n)], groups=groups, name=name)


def test_container_basics():
    p = _pd(["A", "B", "C"], n=5, groups=np.array([0, 0, 1, 1, 2]))
    assert len(p) == 5 and p.n_genes == 3
    s = p.subset([4, 0])
    assert s.texts == ["t4", "t0"] and s.groups.tolist() == [2, 0]
    assert (s.X.toarray() == p.X.toarray()[[4, 0]]).all()
    m = p.subset(np.array([True, False, True, False, False]))
    assert m.texts == ["t0", "t2"]
    texts, idx = _pd(["A"], n=3, texts=["x", "y", "x"]).unique_texts()
    assert texts == ["x", "y"] and idx.tolist() == [0, 1, 0]


def test_container_validates():
    with pytest.raises(DataError):
        PairedData(X=sp.csr_matrix(np.ones((2, 2))), var=pd.DataFrame(index=["a", "b"]), texts=["x"])
    with pytest.raises(DataError):
        PairedData(X=sp.csr_matrix(-np.ones((1, 2))), var=pd.DataFrame(index=["a", "b"]), texts=["x"])
    with pytest.raises(DataError):
        PairedData(X=sp.csr_matrix(np.ones((1, 2))), var=pd.DataFrame(index=["a"]), texts=["x"])


def test_concat_union_of_genes_zero_filled():
    a = _pd(["A", "B"], n=2, groups=np.array([0, 1]), name="a")
    b = _pd(["B", "C", "C"], n=3, name="b", seed=1)  # duplicate C columns are summed
    c = PairedData.concat([a, b])
    assert list(c.var.index) == ["A", "B", "C"]
    assert c.X.shape == (5, 3) and len(c) == 5
    Xa, Xb = a.X.toarray(), b.X.toarray()
    assert (c.X.toarray()[:2] == np.c_[Xa, np.zeros(2)]).all()
    assert (c.X.toarray()[2:] == np.c_[np.zeros(3), Xb[:, 0], Xb[:, 1] + Xb[:, 2]]).all()
    # groups offset per part; part b (no groups) gets one group per unique text
    assert c.groups.tolist() == [0, 1, 2, 3, 4]
    assert c.texts == a.texts + b.texts and c.name == "a+b"
    with pytest.raises(DataError):
        PairedData.concat([])


def test_split_grouped_keeps_groups_together():
    groups = np.repeat(np.arange(10), 10)
    p = _pd(["A", "B"], n=100, groups=groups)
    tr, va = p.split(0.2, seed=0)
    assert len(tr) + len(va) == 100
    assert 15 <= len(va) <= 30
    assert not set(tr.groups) & set(va.groups)
    tr2, va2 = p.split(0.2, seed=0)
    assert va2.texts == va.texts  # reproducible
    # without groups: identical texts stay together
    q = _pd(["A"], n=40, texts=[f"text {i % 8}" for i in range(40)])
    tr, va = q.split(0.25, seed=1)
    assert not set(tr.texts) & set(va.texts) and len(va) > 0
    # by_group=False splits single pairs; val_fraction 0 gives an empty validation set
    tr, va = p.split(0.1, seed=0, by_group=False)
    assert len(va) == 10
    tr, va = p.split(0.0)
    assert len(tr) == 100 and len(va) == 0


@pytest.fixture
def labelled_adata():
    X = make_counts(60)
    obs = pd.DataFrame(
        {
            "cell_type": ["B cell"] * 30 + ["T cell"] * 30,
            "tissue": ["blood"] * 60,
            "description": ["a B lymphocyte from blood"] * 30 + ["a T lymphocyte"] * 29 + [None],
        },
        index=[f"c{i}" for i in range(60)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))


def test_from_anndata_text_column(labelled_adata):
    X0 = labelled_adata.X.copy()
    p = from_anndata(labelled_adata, text_key="description", group_key="cell_type")
    assert len(p) == 59  # the cell without text is dropped
    assert p.texts[0] == "a B lymphocyte from blood" and p.texts[-1] == "a T lymphocyte"
    assert p.groups.tolist() == [0] * 30 + [1] * 29
    assert p.meta["obs_name"].iloc[-1] == "c58"
    assert p.X.shape == (59, len(GENES))
    assert (labelled_adata.X != X0).nnz == 0  # data untouched
    # rank information survives: marker genes of B cells rank high in B cells
    row = p.X[0].toarray().ravel()
    assert row[GENES.index("MS4A1")] > np.median(row)


def test_from_anndata_templated_fields(labelled_adata):
    p = from_anndata(labelled_adata, fields=["cell_type", "tissue"])
    t = p.texts[0]
    assert t.startswith("cell type: B cell. A lymphocyte of B lineage")
    assert t.endswith("tissue: blood.")
    assert "A cell found" not in t  # tissue values get no cell-type definition
    q = from_anndata(labelled_adata, fields=["cell_type", "tissue"], ontology_definitions=False)
    assert q.texts[0] == "cell type: B cell. tissue: blood."
    r = from_anndata(labelled_adata)  # default fields present: cell_type, tissue
    assert r.texts[0] == t
    s = from_anndata(labelled_adata, template="{cell_type} in the {tissue}")
    assert s.texts[0] == "B cell in the blood" and s.texts[-1] == "T cell in the blood"


def test_from_anndata_missing_keys(labelled_adata):
    with pytest.raises(MissingKeyError, match="cell_type"):
        from_anndata(labelled_adata, text_key="nope")
    with pytest.raises(MissingKeyError):
        from_anndata(labelled_adata, template="{nope} cells")
    bare = ad.AnnData(X=make_counts(4), var=pd.DataFrame(index=GENES))
    with pytest.raises(MissingKeyError):
        from_anndata(bare)


def test_from_anndata_path(tmp_path, labelled_adata):
    f = tmp_path / "cells.h5ad"
    labelled_adata.write_h5ad(f)
    p = load_source({"type": "anndata", "path": str(f), "text_key": "description", "name": "mine"})
    assert len(p) == 59 and p.name == "mine"


def test_archs4_layout_and_reader(tmp_path):
    f = write_tiny_archs4(tmp_path / "tiny.h5", n_samples=30)
    with h5py.File(f, "r") as h:
        assert h["data/expression"].shape == (30, 30)  # genes x samples
        assert h["data/expression"].dtype == np.uint32
        for k in ("geo_accession", "title", "characteristics_ch1", "source_name_ch1", "series_id"):
            assert h[f"meta/samples/{k}"].shape == (30,)
        assert "symbol" in h["meta/genes"] and "ensembl_gene" in h["meta/genes"]
        expr = h["data/expression"][()]
    p = from_archs4(f)
    assert len(p) == 30 and p.n_genes == 30
    assert (p.X.toarray() == expr.T).all()
    assert p.var.index[0] == "ENSG90000000000"  # version stripped
    assert list(p.var.columns) == ["ensembl_id", "gene_symbol"] and p.var["gene_symbol"].iloc[0] == "CD3D"
    assert p.texts[0] == "B cell donor 0 rep1. cell type: B cell, tissue: peripheral blood, donor: D0. B cells"
    assert p.meta["geo_accession"].iloc[0] == "GSM1000000" and p.meta["series_id"].iloc[0] == "GSE100"
    # selection by accession, chunked reading, subsampling
    q = from_archs4(f, samples=["GSM1000005", "GSM1000001"], chunk_size=1)
    assert q.meta["geo_accession"].tolist() == ["GSM1000001", "GSM1000005"]
    assert (q.X.toarray() == expr[:, [1, 5]].T).all()
    r = from_archs4(f, max_samples=7, chunk_size=3, text_fields=("title",))
    assert len(r) == 7 and all("donor" in t for t in r.texts)
    s = from_archs4(f, samples=np.array([0, 29]), chunk_size=10)  # sparse selection
    assert (s.X.toarray() == expr[:, [0, 29]].T).all()
    top = from_archs4(f, max_genes_per_sample=5, chunk_size=7)
    assert (np.diff(top.X.indptr) >= 5).all() and (np.diff(top.X.indptr) <= 8).all()
    row = expr[:, 0]
    assert top.X[0].toarray().ravel().max() == row.max()
    with pytest.raises(DataError):
        from_archs4(f, samples=["GSM0"])
    with pytest.raises(DataError):
        from_archs4(tmp_path / "missing.h5")


def test_clean_text():
    assert clean_text(b"cell type: T cell,tissue:  blood\t") == "cell type: T cell, tissue: blood"
    assert clean_text("na\u00efve T\u2009cell") == "naive T cell"
    assert clean_text(None) == "" and clean_text(float("nan")) == ""


def test_load_source_python_and_errors(tmp_path):
    p = load_source({"type": "python", "callable": "tests.test_pairs:_python_source", "kwargs": {"n": 3}, "name": "py"})
    assert len(p) == 3 and p.name == "py"
    with pytest.raises(ConfigError):
        load_source({"type": "nope"})
    with pytest.raises(ConfigError):
        load_source({"type": "python", "callable": "engine.training.pairs"})
    with pytest.raises(ConfigError):
        load_source({"type": "python", "callable": "engine.training.pairs:nothing_here"})
    with pytest.raises(ConfigError):
        load_source({"type": "python", "callable": "tests.test_pairs:_not_pairs"})


def _python_source(n: int = 2) -> PairedData:
    return _pd(["A", "B"], n=n)


def _not_pairs():
    return 42


def test_obs_template_refuses_format_specs():
    """A training template with a width or conversion is refused before formatting (it could allocate GBs)."""
    import anndata as ad

    from engine.errors import ConfigError
    from engine.training.pairs import from_anndata

    a = ad.AnnData(X=np.ones((2, 3), dtype=np.float32), obs=pd.DataFrame({"cell_type": ["B cell", "T cell"]}, index=["a", "b"]),
                   var=pd.DataFrame(index=["CD3D", "MS4A1", "CD14"]))
    for bad in ("{cell_type:>3000000000}", "{cell_type!r}", "{cell_type.__class__}", "{cell_type[0]}"):
        with pytest.raises((ConfigError, MissingKeyError)):  # never formatted: dotted names are column names
            from_anndata(a, template=bad)
    p = from_anndata(a, template="A sample of {cell_type}")
    assert p.texts == ["A sample of B cell", "A sample of T cell"]
