"""Tests of engine.tools.de: top-vs-bottom and two-group differential expression."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.tools.de import de_groups, de_top_vs_bottom
from engine.errors import AnalysisError, DataError, EmptySelectionError, MatrixKindError, MissingKeyError

N_CELLS, N_GENES = 40, 30


def _counts_adata(sparse: bool = True, seed: int = 0) -> ad.AnnData:
    """40 cells x 30 genes of Poisson counts; G_UP rises and G_DOWN falls with the score."""
    rng = np.random.default_rng(seed)
    score = np.linspace(0.0, 1.0, N_CELLS)
    lam = np.full((N_CELLS, N_GENES), 5.0)
    lam[:, 0] = 1.0 + 40.0 * score          # G_UP
    lam[:, 1] = 1.0 + 40.0 * (1.0 - score)  # G_DOWN
    X = rng.poisson(lam).astype(np.float32)
    genes = ["G_UP", "G_DOWN"] + [f"G{i}" for i in range(2, N_GENES)]
    a = ad.AnnData(X=sp.csr_matrix(X) if sparse else X,
                   obs=pd.DataFrame({"qscore": score, "batch": ["a", "b"] * (N_CELLS // 2)},
                                    index=[f"cell{i}" for i in range(N_CELLS)]),
                   var=pd.DataFrame({"symbol": [g.lower() for g in genes]}, index=genes))
    return a


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
@pytest.mark.parametrize("sparse", [True, False])
def test_known_gene_comes_first_with_right_sign(method, sparse):
    a = _counts_adata(sparse=sparse)
    X_before = a.X.copy()
    res = de_top_vs_bottom(a, "qscore", n=10, method=method)
    assert res.loc[0, "gene"] == "G_UP"
    assert res.loc[0, "direction"] == "up"
    assert res.loc[0, "logfoldchange"] > 1 and res.loc[0, "score"] > 0
    assert res.loc[0, "pval_adj"] < 0.01
    assert res.loc[0, "mean_top"] > res.loc[0, "mean_bottom"]
    last = res.iloc[-1]
    assert last["gene"] == "G_DOWN" and last["direction"] == "down" and last["logfoldchange"] < 0
    assert list(res.columns) == ["gene", "logfoldchange", "score", "pval", "pval_adj", "mean_top", "mean_bottom",
                                 "pct_top", "pct_bottom", "direction"]
    assert res["score"].is_monotonic_decreasing
    assert (res["pval_adj"] >= res["pval"] - 1e-12).all()
    # the user's matrix is untouched (counts were normalised on a copy)
    after = a.X.toarray() if sp.issparse(a.X) else a.X
    before = X_before.toarray() if sp.issparse(X_before) else X_before
    np.testing.assert_array_equal(after, before)


def test_obs_and_uns_keys():
    a = _counts_adata()
    res = de_top_vs_bottom(a, "qscore", n=8, key_added="tvb")
    grp = a.obs["tvb"]
    assert isinstance(grp.dtype, pd.CategoricalDtype)
    assert list(grp.cat.categories) == ["top", "bottom", "other"]
    assert (grp == "top").sum() == 8 and (grp == "bottom").sum() == 8 and (grp == "other").sum() == N_CELLS - 16
    # top = highest scores
    assert a.obs.loc[grp == "top", "qscore"].min() > a.obs.loc[grp == "bottom", "qscore"].max()
    u = a.uns["tvb"]
    assert u["params"]["n_used"] == 8 and u["params"]["method"] == "wilcoxon"
    assert u["up_genes"][0] == "G_UP" and u["down_genes"][0] == "G_DOWN"
    assert len(u["table"]) == len(res)
    assert res.attrs["n_used"] == 8 and res.attrs["reduced_from"] is None


def test_scores_as_array_gene_and_unknown_name():
    a = _counts_adata()
    r1 = de_top_vs_bottom(a, a.obs["qscore"].to_numpy(), n=8)
    assert r1.loc[0, "gene"] == "G_UP"
    r2 = de_top_vs_bottom(a, "G_UP", n=8)  # a gene's expression as the score
    assert r2.loc[0, "gene"] == "G_UP"
    with pytest.raises(MissingKeyError, match="neither an obs column nor a gene"):
        de_top_vs_bottom(a, "no_such_score", n=8)
    with pytest.raises(DataError, match="wrong length"):
        de_top_vs_bottom(a, np.zeros(5), n=8)


def test_within_restricts_the_ranking():
    a = _counts_adata()
    within = (a.obs["batch"] == "a").to_numpy()
    res = de_top_vs_bottom(a, "qscore", n=5, within=within)
    chosen = a.obs["de_top_vs_bottom"] != "other"
    assert chosen.sum() == 10
    assert within[chosen.to_numpy()].all()
    assert res.attrs["n_ranked"] == within.sum()
    # obs-name list works too
    res2 = de_top_vs_bottom(a, "qscore", n=5, within=list(a.obs_names[within]))
    pd.testing.assert_frame_equal(res, res2, check_like=False)


def test_reduction_of_n_is_reported(caplog):
    a = _counts_adata()
    with caplog.at_level(logging.WARNING, logger="engine.tools.de"):
        res = de_top_vs_bottom(a, "qscore", n=30)
    assert res.attrs["n_used"] == N_CELLS // 2 and res.attrs["reduced_from"] == 30
    assert any("instead" in r.getMessage() for r in caplog.records)
    assert res.attrs["messages"]
    assert (a.obs["de_top_vs_bottom"] == "top").sum() == 20


def test_fraction():
    a = _counts_adata()
    res = de_top_vs_bottom(a, "qscore", fraction=0.25)
    assert res.attrs["n_used"] == 10
    with pytest.raises(AnalysisError):
        de_top_vs_bottom(a, "qscore", fraction=0.6)
    with pytest.raises(AnalysisError, match="gives only"):
        de_top_vs_bottom(a, "qscore", fraction=0.05)


def test_guard_rails_top_vs_bottom():
    a = _counts_adata()
    with pytest.raises(AnalysisError):
        de_top_vs_bottom(a, "qscore", n=2)
    with pytest.raises(AnalysisError, match="Unknown DE method"):
        de_top_vs_bottom(a, "qscore", n=5, method="logreg")
    small = np.zeros(N_CELLS, dtype=bool)
    small[:5] = True
    with pytest.raises(EmptySelectionError):
        de_top_vs_bottom(a, "qscore", n=5, within=small)
    with pytest.raises(DataError, match="NaN"):
        de_top_vs_bottom(a, np.full(N_CELLS, np.nan), n=5)
    s = a.obs["qscore"].to_numpy().copy()
    s[:4] = np.nan
    res = de_top_vs_bottom(a, s, n=5)
    assert res.attrs["n_nan"] == 4 and res.attrs["n_ranked"] == N_CELLS - 4
    assert (a.obs["de_top_vs_bottom"].iloc[:4] == "other").all()


def test_scaled_x_uses_raw_and_fails_without_it():
    a = _counts_adata()
    import scanpy as sc

    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.raw = a
    a.X = a.X.toarray()
    sc.pp.scale(a)
    assert (a.X < 0).any()
    res = de_top_vs_bottom(a, "qscore", n=8)
    assert res.loc[0, "gene"] == "G_UP" and res.attrs["matrix"].startswith("raw.X")
    b = ad.AnnData(X=a.X.copy(), obs=a.obs.copy(), var=a.var.copy())
    with pytest.raises(MatrixKindError):
        de_top_vs_bottom(b, "qscore", n=8)


def test_gene_symbols_column():
    a = _counts_adata()
    res = de_top_vs_bottom(a, "qscore", n=8, gene_symbols="symbol")
    assert res.loc[0, "gene"] == "g_up" and res.loc[0, "gene_id"] == "G_UP"


def test_de_groups_a_vs_b_and_rest():
    a = _counts_adata()
    hi = (a.obs["qscore"] > 0.75).to_numpy()
    lo = (a.obs["qscore"] < 0.25).to_numpy()
    res = de_groups(a, hi, lo)
    assert res.loc[0, "gene"] == "G_UP" and res.loc[0, "direction"] == "up"
    assert {"mean_A", "mean_B", "pct_A", "pct_B"} <= set(res.columns)
    assert res.attrs["n_a"] == hi.sum() and res.attrs["n_b"] == lo.sum()
    assert list(a.obs["de_groups"].cat.categories) == ["A", "B", "other"]
    rest = de_groups(a, list(a.obs_names[hi]), key_added="hi_vs_rest")
    assert rest.loc[0, "gene"] == "G_UP"
    assert "mean_rest" in rest.columns and rest.attrs["n_b"] == N_CELLS - hi.sum()
    assert (a.obs["hi_vs_rest"] == "rest").sum() == N_CELLS - hi.sum()
    sub = de_groups(a, hi, lo, max_cells=5)
    assert sub.attrs["n_a"] == 5 and sub.attrs["n_b"] == 5 and sub.attrs["subsampled"]


def test_de_groups_guard_rails():
    a = _counts_adata()
    g1 = np.zeros(N_CELLS, dtype=bool)
    g1[:15] = True
    g2 = np.zeros(N_CELLS, dtype=bool)
    g2[10:30] = True
    with pytest.raises(AnalysisError, match="share 5 cells"):
        de_groups(a, g1, g2)
    tiny = np.zeros(N_CELLS, dtype=bool)
    tiny[:2] = True
    with pytest.raises(EmptySelectionError):
        de_groups(a, tiny, ~tiny)
    with pytest.raises(MissingKeyError):
        de_groups(a, ["cell0", "nope"], None)
    with pytest.raises(DataError, match="wrong length"):
        de_groups(a, np.ones(3, dtype=bool))


def test_pbmc_b_cell_score_finds_b_cell_markers():
    """Biology smoke test: score = MS4A1 + CD79A expression; top-vs-bottom finds B-cell genes."""
    import scanpy as sc

    a = sc.datasets.pbmc68k_reduced()  # ships with scanpy; X scaled, raw log-normalised
    expr = a.raw[:, ["MS4A1", "CD79A"]].X
    score = np.asarray(expr.sum(axis=1)).ravel()
    res = de_top_vs_bottom(a, score, n=100)
    top_up = set(res[res["direction"] == "up"]["gene"].head(15))
    markers = {"CD79A", "CD79B", "MS4A1", "CD74", "HLA-DRA", "HLA-DQA1", "HLA-DPB1", "TCL1A", "BANK1", "CD19"}
    assert len(top_up & markers) >= 3, top_up
    assert {"CD79A", "CD79B"} <= top_up


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_de_runs_directly_on_a_backed_file_and_equals_in_memory(tmp_path, fmt):
    """DE on an atlas opened with ``engine.read(..., backed=True)``: only the selected rows are read, X stays on disk."""
    import warnings

    import anndata as ad
    from conftest import GENES, make_counts

    import engine

    X = make_counts(300, seed=5)
    a = ad.AnnData(X=X, obs=pd.DataFrame({"s": np.linspace(0, 1, 300)}, index=[f"c{i}" for i in range(300)]),
                   var=pd.DataFrame(index=GENES))
    path = tmp_path / f"cells.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata 0.12's zarr-format notice
        a.write_h5ad(path) if fmt == "h5ad" else a.write_zarr(path)
    b = engine.read(path, backed=True)
    b.obs["s"] = a.obs["s"].to_numpy()
    cells = np.arange(10, 290)
    mem = de_top_vs_bottom(a, "s", within=cells, fraction=0.25)
    on_disk = de_top_vs_bottom(b, "s", within=cells, fraction=0.25)
    pd.testing.assert_frame_equal(mem.reset_index(drop=True), on_disk.reset_index(drop=True))
    assert engine.is_backed(b)
    # a gene's expression as the score (read by row chunks from disk) gives the same groups
    g_mem = de_top_vs_bottom(a, "CD3D", fraction=0.25, key_added="by_gene")
    g_disk = de_top_vs_bottom(b, "CD3D", fraction=0.25, key_added="by_gene")
    pd.testing.assert_frame_equal(g_mem.reset_index(drop=True), g_disk.reset_index(drop=True))
    pd.testing.assert_series_equal(a.obs["by_gene"], b.obs["by_gene"], check_names=False)


# ---------------------------------------------------------------------- the app's volcano plot of a DE table
def _de_table() -> pd.DataFrame:
    return pd.DataFrame({
        "gene": ["UP1", "UP2", "DOWN1", "FLAT", "WEAK", "HUGE", "NAN"],
        "logfoldchange": [2.0, 1.0, -3.0, 0.1, 2.0, 30.0, np.nan],
        "pval_adj": [1e-10, 1e-3, 1e-5, 1e-20, 0.5, 1e-30, 1e-4],
    })


def test_volcano_update_fills_sources_classes_labels_and_ranges():
    from app import plots

    v = plots.Volcano(n_labels=3, max_lfc=10.0)
    fig = v.figure
    v.update(_de_table(), title="Top vs bottom 30 cells")
    data = v.source.data
    assert set(data) == {"gene", "logfoldchange", "neg_log10_padj", "lfc_exact", "class"}
    by_gene = {g: i for i, g in enumerate(data["gene"])}
    assert set(by_gene) == {"UP1", "UP2", "DOWN1", "FLAT", "WEAK", "HUGE"}  # the NaN row is dropped
    cls = {g: data["class"][i] for g, i in by_gene.items()}
    assert cls == {"UP1": "up in top", "UP2": "up in top", "HUGE": "up in top", "DOWN1": "up in bottom",
                   "FLAT": "not significant", "WEAK": "not significant"}
    assert data["class"][:2] == ["not significant"] * 2  # grey drawn first, under the coloured genes
    i = by_gene["HUGE"]  # clipped for drawing, exact in the hover
    assert data["logfoldchange"][i] == 10.0 and data["lfc_exact"][i] == 30.0
    np.testing.assert_allclose(data["neg_log10_padj"][by_gene["UP1"]], 10.0)
    assert data["logfoldchange"].dtype == np.float64
    # labels: the 3 most significant significant genes (FLAT is more significant but not changed enough)
    assert v.label_source.data["gene"] == ["HUGE", "UP1", "DOWN1"]
    assert fig.title.text == "Top vs bottom 30 cells"
    assert fig.xaxis.axis_label == "log2 fold change" and fig.yaxis.axis_label == "-log10 adj. p"
    assert fig.x_range.start < -3.0 and 10.0 < fig.x_range.end < 12.0  # the clipped extent, padded
    assert fig.y_range.start <= 0.0 and fig.y_range.end > 30.0
    assert (fig.x_range.reset_start, fig.y_range.reset_end) == (fig.x_range.start, fig.y_range.end)
    hover = [t for t in fig.tools if t.__class__.__name__ == "HoverTool"][0]
    assert [name for name, _ in hover.tooltips][:3] == ["gene", "log2 fold change (exact)", "-log10 adj. p"]
    colours = fig.renderers[0].glyph.fill_color.transform
    assert dict(zip(colours.factors, colours.palette)) == {"up in top": "#d62728", "up in bottom": "#1f77b4",
                                                           "not significant": "#b0b0b0"}
    assert fig.legend[0].items[0].label.field == "class"


def test_volcano_update_replaces_data_in_place_and_empties():
    from app import plots

    v = plots.Volcano()
    models = {m.id for m in v.figure.references()}
    v.update(_de_table())
    small = _de_table().iloc[:2].assign(logfoldchange=[0.5, 0.6])
    v.update(small, title="second")
    assert {m.id for m in v.figure.references()} == models  # the same models, new data
    assert v.source.data["gene"] == ["UP1", "UP2"] and v.source.data["class"] == ["not significant", "up in top"]
    assert v.label_source.data["gene"] == ["UP2"]  # UP1 (lfc 0.5) no longer passes |lfc| > 0.5
    assert v.figure.x_range.end < 1.0  # the range follows the new data
    for empty in (pd.DataFrame(), _de_table().iloc[:0]):
        v.update(empty, title="empty")
        assert all(len(c) == 0 for c in v.source.data.values()) and len(v.label_source.data["gene"]) == 0
        assert v.figure.x_range.start < v.figure.x_range.end and v.figure.y_range.start < v.figure.y_range.end


def test_volcano_function_and_class_share_the_frame():
    import holoviews as hv

    from app import plots

    points, labels = plots.volcano_frame(_de_table(), n_labels=2)
    overlay = plots.volcano(_de_table(), n_labels=2)
    scatter, text = overlay.values()
    assert list(scatter.dimension_values("gene")) == list(points["gene"])
    assert list(text.dimension_values("gene")) == list(labels["gene"]) == ["HUGE", "UP1"]
    hv.render(overlay)
    hv.render(plots.volcano(pd.DataFrame()))


def test_show_table_updates_the_shown_table_when_its_columns_stay():
    import panel as pn

    from app.views.common import show_table, table_widget

    holder = pn.Column(table_widget(height=400, page_size=2))
    first = show_table(holder, _de_table(), height=400, page_size=2)  # from an empty table: a new widget
    assert holder.objects == [first] and first.formatters and list(first.value["gene"]) == list(_de_table()["gene"])
    first.page = 2
    again = show_table(holder, _de_table().iloc[::-1], height=400, page_size=2)
    assert again is first and holder.objects == [first] and first.page == 1
    assert list(first.value["gene"]) == list(_de_table()["gene"])[::-1]
    other = show_table(holder, _de_table().assign(direction="up"), height=400, page_size=2)  # a new column
    assert other is not first and holder.objects == [other] and "direction" in other.value.columns
    ints = show_table(holder, _de_table().assign(direction=1), height=400, page_size=2)  # same name, other dtype
    assert ints is not other
    cleared = show_table(holder, pd.DataFrame(), height=400, page_size=2)
    assert cleared is not ints and len(cleared.value.columns) == 0
