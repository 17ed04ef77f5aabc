"""Label-free zero-shot refinements: neighbour smoothing and distribution normalisation (the 2026-12-01 smoothing rule)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from engine.tools.embed import SMOOTH_KEY, embed_cells, get_embeds, smooth_embeds, smoothed, umap
from engine.errors import AnalysisError, MissingEmbeddingError, ModelMismatchError, QueryError
from engine.training.evaluate import evaluate, format_report, main
from engine.tools.score import centered, zero_shot


def test_smoothed_hand_computed():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    A = sp.csr_matrix(np.array([[0, 1, 1], [2, 0, 0], [0, 0, 0]], dtype=float))  # cell 2 has no neighbours
    out = smoothed(e, A, 0.5)
    # cell 0: 0.5 * e0 + 0.5 * mean(e1, e2) = (0.65, 0.45); cell 1: 0.5 * e1 + 0.5 * e0 = (0.5, 0.5)
    exp0 = np.array([0.65, 0.45]) / np.hypot(0.65, 0.45)
    np.testing.assert_allclose(out[0], exp0, rtol=1e-6)
    np.testing.assert_allclose(out[1], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(out[2], [0.6, 0.8], rtol=1e-6)  # isolated: unchanged
    assert out.dtype == np.float32
    np.testing.assert_allclose(smoothed(e, A, 1.0), e / np.linalg.norm(e, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(AnalysisError, match="self weight"):
        smoothed(e, A, 1.5)
    with pytest.raises(AnalysisError, match="does not match"):
        smoothed(e, sp.eye(4), 0.5)


def test_centered_is_dn_and_validated():
    e = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(centered(e, 0.5), [[0.75, -0.25], [-0.25, 0.75]])
    assert centered(e, 0.0) is not None and np.array_equal(centered(e, 0.0), e)
    with pytest.raises(QueryError, match="centring weight"):
        centered(e, -0.1)


def test_smooth_embeds_keys_graph_reuse_and_model_check(tiny_adata, tiny_model, tiny_text_dir):
    from tests.conftest import build_tiny_model

    with pytest.raises(MissingEmbeddingError):
        smooth_embeds(tiny_adata)
    raw = embed_cells(tiny_adata, tiny_model, progress=False).copy()
    umap(tiny_adata)
    graph = tiny_adata.obsp["lexicell_neighbors_connectivities"].copy()
    out = smooth_embeds(tiny_adata)
    # the UMAP's graph is reused, the input embeddings and X are untouched
    assert (tiny_adata.obsp["lexicell_neighbors_connectivities"] != graph).nnz == 0
    np.testing.assert_array_equal(tiny_adata.obsm["transcriptome_embeds"], raw)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out, smoothed(raw, graph, 0.5), rtol=1e-6)
    assert tiny_adata.uns[SMOOTH_KEY]["params"]["smoothed_from"] == "transcriptome_embeds"
    # smoothing pulls each cell towards its group: the two groups separate better
    grp = tiny_adata.obs["group"].to_numpy() == "B"
    def gap(e):
        c = e @ (e[grp].mean(0) - e[~grp].mean(0))
        return (c[grp].mean() - c[~grp].mean()) / c.std()
    assert gap(out) > gap(raw)
    # the smoothed embeddings keep the model's fingerprint, so another model is refused
    assert get_embeds(tiny_adata, tiny_model, key=SMOOTH_KEY).shape == raw.shape
    other = build_tiny_model(tiny_text_dir, seed=3)
    with pytest.raises(ModelMismatchError):
        zero_shot(tiny_adata, other, ["B cell", "T cell"], obsm_key=SMOOTH_KEY)


def test_zero_shot_on_smoothed_and_centred(tiny_adata, tiny_model):
    embed_cells(tiny_adata, tiny_model, progress=False)
    smooth_embeds(tiny_adata)
    base = zero_shot(tiny_adata, tiny_model, ["B cell", "T cell", "NK cell"], write=False)
    dn = zero_shot(tiny_adata, tiny_model, ["B cell", "T cell", "NK cell"], center=0.5, key_added="zs")
    np.testing.assert_allclose(dn.sum(1), 1.0, rtol=1e-5)
    # DN is a per-label offset of the logits: log-odds between two labels shift by the same amount in every cell
    d_base = np.log(base["B cell"] / base["T cell"])
    d_dn = np.log(dn["B cell"] / dn["T cell"])
    np.testing.assert_allclose(d_dn - d_base, (d_dn - d_base).mean(), atol=1e-3)
    assert tiny_adata.uns["zs"]["center"] == 0.5 and tiny_adata.uns["zs"]["obsm_key"] == "transcriptome_embeds"
    sm = zero_shot(tiny_adata, tiny_model, ["B cell", "T cell"], obsm_key=SMOOTH_KEY, key_added="zs_s")
    assert tiny_adata.uns["zs_s"]["obsm_key"] == SMOOTH_KEY and sm.shape == (200, 2)


def test_evaluate_reports_refined_beside_the_protocol(tiny_adata, tiny_model, capsys):
    plain = evaluate(tiny_adata, tiny_model, "group")
    assert "refined" not in plain
    res = evaluate(tiny_adata, tiny_model, "group", smooth=True, center=0.5)
    assert res["per_cell"] == plain["per_cell"] and res["per_class"] == plain["per_class"]  # headline unchanged
    r = res["refined"]
    assert r["smooth"] is True and r["center"] == 0.5 and 0.0 <= r["roc_auc"] <= 1.0 and r["n_items"] == 200
    # the refined scores equal zero-shot on smoothed embeddings of the same graph
    from engine.training.evaluate import _knn_graph

    emb = embed_cells(tiny_adata.copy(), tiny_model, progress=False)
    e = centered(smoothed(emb, _knn_graph(emb), 0.5), 0.5)
    from engine.training.metrics import roc_auc_ovr

    t = tiny_model.embed_texts(res["label_texts"])
    y = (tiny_adata.obs["group"].to_numpy() == "T").astype(int)
    auc, _ = roc_auc_ovr(e.astype(np.float64) @ t.T * float(tiny_model.logit_scale.detach().exp()), y)
    assert r["roc_auc"] == pytest.approx(auc, abs=1e-9)
    assert "per cell, refined" in format_report(res) and "not the seed's protocol" in format_report(res)
    assert "transcriptome_embeds" not in tiny_adata.obsm  # the user's AnnData is not modified


def test_evaluate_cli_smooth_flag(tmp_path, tiny_adata, tiny_model, capsys):
    import json

    from engine.models.checkpoint import save_model

    path = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(path)
    save_model(tiny_model, tmp_path / "m")
    assert main([str(path), "--label-key", "group", "--model", str(tmp_path / "m"), "--smooth", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["refined"]["smooth"] is True and out["refined"]["center"] == 0.0



def test_csls_offsets_and_label_logits_hand_computed():
    from engine.tools.score import csls_offsets, label_logits

    cells = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    # label 0: cosines 1, 0, 0.6 -> top-2 mean 0.8; label 1: 0, 1, 0.8 -> 0.9
    np.testing.assert_allclose(csls_offsets(cells, texts, 2), [0.8, 0.9], rtol=1e-6)
    np.testing.assert_allclose(csls_offsets(cells, texts, 99), [1.6 / 3, 1.8 / 3], rtol=1e-6)  # capped at n_cells
    plain = label_logits(cells, texts, 10.0)
    np.testing.assert_allclose(plain, cells @ texts.T * 10.0)
    np.testing.assert_allclose(label_logits(cells, texts, 10.0, csls=2), (cells @ texts.T - 0.5 * np.array([0.8, 0.9])) * 10.0)
    np.testing.assert_allclose(label_logits(cells, texts, 1.0, center=0.5), centered(cells, 0.5) @ texts.T, rtol=1e-6)
    with pytest.raises(QueryError, match="at least one cell"):
        csls_offsets(cells, texts, 0)


def test_neighbour_graph_on_a_large_dataset():
    """From 8,192 cells on scanpy uses pynndescent, whose csr_array scanpy 1.11 cannot read with scipy >= 1.17
    (``getnnz``); the engine's graph (UMAP, smoothing) must work there too."""
    import anndata as ad

    from engine.tools.embed import APPROXIMATE_KNN_FROM

    rng = np.random.default_rng(0)
    n = APPROXIMATE_KNN_FROM + 8
    lab = rng.integers(0, 10, n)
    e = (rng.standard_normal((10, 16))[lab] + 0.2 * rng.standard_normal((n, 16))).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    a = ad.AnnData(obsm={"transcriptome_embeds": e}, shape=(n, 0))
    out = smooth_embeds(a)
    assert out.shape == e.shape and np.isfinite(out).all()
    A = a.obsp["lexicell_neighbors_distances"].tocoo()
    assert A.nnz >= n * 10 and np.mean(lab[A.row] == lab[A.col]) > 0.95  # neighbours come from the same cluster


def test_smoothing_never_reuses_a_graph_of_other_embeddings(tiny_adata, tiny_model, tiny_text_dir):
    from tests.conftest import build_tiny_model

    embed_cells(tiny_adata, tiny_model, progress=False)
    umap(tiny_adata)
    first = tiny_adata.obsp["lexicell_neighbors_connectivities"].copy()
    other = build_tiny_model(tiny_text_dir, seed=5)
    new = embed_cells(tiny_adata, other, progress=False)  # a model switch: same key, new embeddings
    out = smooth_embeds(tiny_adata)
    graph = tiny_adata.obsp["lexicell_neighbors_connectivities"]
    assert (graph != first).nnz > 0  # rebuilt on the new embeddings
    np.testing.assert_allclose(out, smoothed(new, graph, 0.5), rtol=1e-6)
    assert get_embeds(tiny_adata, other, key=SMOOTH_KEY).shape == new.shape
