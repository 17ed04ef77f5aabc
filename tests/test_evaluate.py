"""Zero-shot evaluation and paired retrieval (engine.training.evaluate)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from engine.errors import MissingKeyError, QueryError
from engine.training.evaluate import evaluate, main, retrieval

METRICS = {"roc_auc", "accuracy", "f1_macro", "recall@1", "recall@5", "recall@10"}


def test_evaluate_keys_and_values(tiny_adata, tiny_model):
    res = evaluate(tiny_adata, tiny_model, "group")
    assert {"n_cells", "n_classes", "template", "per_cell", "per_class", "confusion"} <= set(res)
    assert res["n_cells"] == 200 and res["n_classes"] == 2
    assert res["template"] == "A sample of {label} from a healthy individual"
    assert res["label_texts"] == ["A sample of B from a healthy individual", "A sample of T from a healthy individual"]
    for level in ("per_cell", "per_class"):
        m = res[level]
        assert METRICS <= set(m)
        assert 0.0 <= m["roc_auc"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["f1_macro"] <= 1.0
        assert m["recall@5"] == m["recall@10"] == 1.0  # only two classes
    assert res["per_class"]["n_items"] == 2
    conf = np.array(res["confusion"]["matrix"])
    assert res["confusion"]["labels"] == ["B", "T"] and conf.shape == (2, 2) and conf.sum() == 200
    assert conf.sum(1).tolist() == [100, 100]
    assert np.trace(conf) / 200 == pytest.approx(res["per_cell"]["accuracy"])
    json.dumps(res)  # JSON-serialisable
    # the user's AnnData is not modified
    assert "transcriptome_embeds" not in tiny_adata.obsm and list(tiny_adata.obs.columns) == ["group"]


def test_evaluate_reuses_embeddings_and_is_consistent(tiny_adata, tiny_model):
    from engine.tools.embed import embed_cells

    a = evaluate(tiny_adata, tiny_model, "group", template="plain")
    embed_cells(tiny_adata, tiny_model, progress=False)
    b = evaluate(tiny_adata, tiny_model, "group", template="plain")
    assert a["per_cell"]["roc_auc"] == pytest.approx(b["per_cell"]["roc_auc"], abs=1e-6)
    assert a["template"] == "{label}"


def test_evaluate_cap_candidates_and_missing_labels(tiny_adata, tiny_model):
    adata = tiny_adata.copy()
    adata.obs["group"] = adata.obs["group"].astype(object)
    adata.obs.iloc[0, 0] = None
    res = evaluate(adata, tiny_model, "group", labels=["B", "T", "NK"], max_cells_per_class=10, seed=1)
    assert res["n_cells"] == 20 and res["n_classes"] == 2 and res["n_labels"] == 3
    assert res["per_cell"]["n_classes_scored"] == 2 and "skipped 1 class" in res["per_cell"]["note"]
    assert any("without a label" in n for n in res["notes"])
    assert np.array(res["confusion"]["matrix"]).shape == (3, 3)
    res2 = evaluate(adata, tiny_model, "group", labels=["B", "T", "NK"], max_cells_per_class=10, seed=1)
    assert res2["per_cell"] == res["per_cell"]  # reproducible subsampling
    only_b = evaluate(adata, tiny_model, "group", labels=["B", "NK"])
    assert only_b["n_cells"] == 99 and any("outside the candidates" in n for n in only_b["notes"])


def test_evaluate_errors(tiny_adata, tiny_model):
    with pytest.raises(MissingKeyError, match="group"):  # lists the available columns
        evaluate(tiny_adata, tiny_model, "cell_type")
    with pytest.raises(QueryError):
        evaluate(tiny_adata, tiny_model, "group", labels=["B"])
    with pytest.raises(QueryError):
        evaluate(tiny_adata, tiny_model, "group", labels=["B", "B"])


def test_retrieval_on_paired_data(tiny_adata, tiny_model):
    from engine.training.pairs import from_anndata

    pairs = from_anndata(tiny_adata, template="{group} cells")
    res = retrieval(pairs, tiny_model)
    assert res["n_pairs"] == 200 and res["n_texts"] == 2
    for k in (1, 5, 10):
        for d in ("transcriptome_to_text", "text_to_transcriptome", "mean"):
            assert 0.0 <= res[f"{d}_R@{k}"] <= 1.0
    assert res["R@5"] == 1.0  # two unique texts: always within the top 5
    json.dumps(res)


def test_cli_json_and_confusion(tmp_path, tiny_adata, tiny_model, capsys):
    from engine.models.checkpoint import save_model

    model_dir = save_model(tiny_model, tmp_path / "model")
    f = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(f)
    csv = tmp_path / "conf.csv"
    rc = main([str(f), "--label-key", "group", "--model", str(model_dir), "--json", "--confusion", str(csv), "--device", "cpu"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_cells"] == 200 and set(res["per_cell"]) >= METRICS
    conf = pd.read_csv(csv, index_col=0)
    assert list(conf.columns) == ["B", "T"] and int(conf.to_numpy().sum()) == 200
    # readable table
    rc = main([str(f), "--label-key", "group", "--model", str(model_dir), "--max-cells-per-class", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "roc_auc" in out and "per class" in out and "10 cells" in out
    # missing column: error message with the available columns, exit status 2
    rc = main([str(f), "--label-key", "nope", "--model", str(model_dir), "--json", "--device", "cpu"])
    assert rc == 2 and "group" in capsys.readouterr().err


def test_cli_demo(tmp_path, tiny_model, capsys):
    from engine.models.checkpoint import save_model

    model_dir = save_model(tiny_model, tmp_path / "model")
    rc = main(["demo", "--model", str(model_dir), "--json", "--max-cells-per-class", "5", "--device", "cpu"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["label_key"] == "bulk_labels" and res["n_classes"] == 10 and res["n_cells"] == 50


def test_engine_evaluate_is_callable_whatever_the_import_order(tiny_adata, tiny_model):
    import engine
    import engine.training.evaluate  # noqa: F401 - binds the module as engine.training.evaluate

    res = engine.evaluate(tiny_adata, tiny_model, "group", max_cells_per_class=5)
    assert res["n_cells"] == 10
