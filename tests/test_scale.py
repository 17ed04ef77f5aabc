"""Atlas scale (issue 17): backed data read in row chunks, chunked and Dask embedding into a resumable zarr store,
sampled layouts, chunked scoring. Small data throughout; speed figures live in bench/bench_scale.py."""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import GENES, build_tiny_model, make_counts

import engine
from engine.errors import CancelledError, ConfigError, MissingEmbeddingError


@pytest.fixture(scope="module")
def model(tiny_text_dir):
    return build_tiny_model(tiny_text_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 300 cells as an in-memory AnnData, a backed-ready .h5ad and a .zarr store (raw = counts, X log)."""
    X = make_counts(300, seed=3)
    obs = pd.DataFrame({"group": pd.Categorical(["B"] * 150 + ["T"] * 150)}, index=[f"cell{i}" for i in range(300)])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))
    folder = tmp_path_factory.mktemp("scale")
    a.write_h5ad(folder / "cells.h5ad")
    with warnings.catch_warnings():  # anndata 0.12: zarr v2 is still its default format
        warnings.simplefilter("ignore", UserWarning)
        a.write_zarr(folder / "cells.zarr")
    return a, folder / "cells.h5ad", folder / "cells.zarr"


@pytest.fixture(params=["h5ad", "zarr"])
def backed(request, files):
    _, h5ad, zarr_path = files
    b = engine.read(h5ad if request.param == "h5ad" else zarr_path, backed=True)
    assert engine.is_backed(b)
    return b


def test_backed_expression_streams_and_matches(files, backed):
    a = files[0]
    full, var = engine.expression_matrix(a)
    parts = list(engine.iter_expression(backed, chunk_size=64))
    assert [s for s, _ in parts] == list(range(0, 300, 64))
    assert max(b.shape[0] for _, b in parts) == 64
    np.testing.assert_allclose(sp.vstack([b for _, b in parts]).toarray(), full.toarray(), rtol=1e-6)
    rows = np.array([250, 3, 17, 3])
    sel, _ = engine.selection_matrix(backed, rows)
    np.testing.assert_allclose(sel.toarray(), full[rows].toarray(), rtol=1e-6)


def test_backed_gene_colouring_equals_in_memory(files, backed):
    a = files[0]
    for gene in ("CD3D", "MS4A1"):
        expect = np.asarray(a[:, gene].X.toarray()).ravel()
        np.testing.assert_array_equal(engine.gene_values(backed, gene, chunk_size=70), expect)
        np.testing.assert_array_equal(engine.gene_values(a, gene), expect)


def test_backed_validate_and_de_on_selection_equal_in_memory(files, backed):
    a = files[0].copy()
    rep_mem = engine.validate(a)
    rep_backed = engine.validate(backed, scan="sample")
    assert rep_backed.source == rep_mem.source and rep_backed.n_mapped == rep_mem.n_mapped
    assert any("checked" in n for n in rep_backed.notes)
    a.obs["s"] = np.linspace(0, 1, 300)
    backed.obs["s"] = np.linspace(0, 1, 300)
    cells = np.arange(20, 260)
    de_mem = engine.de_top_vs_bottom(a, "s", within=cells, fraction=0.25)
    sel = engine.selection_adata(backed, cells)
    assert not sel.isbacked and sp.issparse(sel.X) and sel.n_obs == cells.size
    de_backed = engine.de_top_vs_bottom(sel, "s", fraction=0.25)
    pd.testing.assert_frame_equal(de_mem.reset_index(drop=True), de_backed.reset_index(drop=True))


def test_chunked_embeddings_equal_in_process(files, backed, model):
    a = files[0].copy()
    ref = engine.embed_cells(a, model, use_cache=False, progress=False)
    out = engine.embed_cells(backed, model, chunk_size=64, use_cache=False, progress=False)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert backed.uns["transcriptome_embeds"]["params"]["n_chunks"] == 5
    assert engine.get_embeds(backed, model).shape == (300, model.projection_dim)


def test_store_resumes_after_interruption(files, model, tmp_path):
    a = files[0].copy()
    ref = engine.embed_cells(a.copy(), model, use_cache=False, progress=False)
    store = tmp_path / "embeds.zarr"
    calls = {"n": 0}

    def cancel_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(CancelledError):
        engine.embed_cells(a, model, store=store, chunk_size=50, cancel=cancel_after_two, progress=False)
    with pytest.raises(MissingEmbeddingError, match="unfinished"):
        engine.read_embeddings(a, store)
    out = engine.embed_cells(a, model, store=store, chunk_size=50, progress=False)
    params = a.uns["transcriptome_embeds"]["params"]
    assert (params["chunks_skipped"], params["chunks_computed"]) == (2, 4)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    engine.embed_cells(a, model, store=store, progress=False)  # all done: nothing recomputed
    assert a.uns["transcriptome_embeds"]["params"]["chunks_computed"] == 0
    b = files[0].copy()
    np.testing.assert_allclose(engine.read_embeddings(b, store, model=model), ref, atol=1e-5)
    other = b[:100].copy()
    with pytest.raises(ConfigError, match="other data"):
        engine.embed_cells(other, model, store=store, progress=False)


def test_dask_local_cluster_two_workers(files, model, tmp_path):
    distributed = pytest.importorskip("distributed")
    a, h5ad, _ = files
    ref = engine.embed_cells(a.copy(), model, use_cache=False, progress=False)
    backed = engine.read(h5ad, backed=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        out = engine.embed_cells(backed, model, scheduler=client, store=tmp_path / "e.zarr", chunk_size=80,
                                 progress=False)
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert backed.uns["transcriptome_embeds"]["params"]["chunks_computed"] == 4


def test_embed_cli_writes_a_store(files, model, tmp_path):
    from engine.models.checkpoint import save_model
    from engine.tools.embed_cli import main

    _, h5ad, _ = files
    save_model(model, tmp_path / "m")
    out = tmp_path / "cli.zarr"
    assert main([str(h5ad), "--model", str(tmp_path / "m"), "--out", str(out), "--chunk-size", "100", "--in-process",
                 "--quiet"]) == 0
    b = engine.read(h5ad, backed=True)
    emb = engine.read_embeddings(b, out)
    assert emb.shape == (300, model.projection_dim) and np.isfinite(emb).all()
    assert main([str(h5ad), "--model", str(tmp_path / "m"), "--out", str(h5ad), "--in-process"]) == 2


def test_large_layout_fits_a_sample_and_records_it(model):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(600, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    a = ad.AnnData(X=sp.csr_matrix((600, 3), dtype=np.float32))
    a.obsm["transcriptome_embeds"] = emb
    xy = engine.umap(a, large_from=500, fit_cells=200, progress=False)
    assert xy.shape == (600, 2) and np.isfinite(xy).all()
    rec = a.uns["lexicell_layout"]["X_umap"]
    assert rec["method"] == "umap fit on a sample + transform" and rec["n_fit"] == 200
    engine.umap(a, keep_existing=True)
    assert a.uns["lexicell_layout"]["X_umap"]["method"] == "existing"


def test_chunked_scoring_equals_whole(files, model):
    from engine.tools import score

    a = files[0].copy()
    engine.embed_cells(a, model, use_cache=False, progress=False)
    whole = engine.score_text(a, model, "B cells MINUS T cells", write=False)
    zs = engine.zero_shot(a, model, ["B cell", "T cell", "monocyte"], write=False, csls=5, center=0.5)
    old = score.SCORE_CHUNK
    try:
        score.SCORE_CHUNK = 7
        np.testing.assert_allclose(engine.score_text(a, model, "B cells MINUS T cells", write=False), whole, rtol=1e-5)
        zs2 = engine.zero_shot(a, model, ["B cell", "T cell", "monocyte"], write=False, csls=5, center=0.5)
    finally:
        score.SCORE_CHUNK = old
    np.testing.assert_allclose(zs2.to_numpy(), zs.to_numpy(), atol=1e-6)


def test_backed_perturbation_of_selected_cells_equals_in_memory(files, model):
    a, h5ad, _ = files
    mem = a.copy()
    backed = engine.read(h5ad, backed=True)
    for d in (mem, backed):
        engine.embed_cells(d, model, use_cache=False, progress=False)
    cells = np.arange(140, 170)
    r_mem = engine.perturb(mem, model, ["CD3D", "MS4A1"], cells=cells, progress=False)
    r_backed = engine.perturb(backed, model, ["CD3D", "MS4A1"], cells=cells, progress=False)
    pd.testing.assert_frame_equal(r_mem, r_backed, atol=1e-5)
