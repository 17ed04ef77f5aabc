"""Bad input, table-driven: careless and hostile files, models, queries, labels, templates, selections, CLI flags.

Every probe expects a typed error (``engine.errors``) whose message names what was found; where a file is
involved, the file's checksum is the same after the probe. The page-side probes check that every user or
dataset string reaches Markdown and Alert panes only escaped.
"""
from __future__ import annotations

import asyncio
import hashlib
import html
import json
import os
import pickle
import re
import shutil
import threading
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import engine
from conftest import GENES, make_counts
from engine.io.data import DataWarning
from engine.errors import (CheckpointError, ConfigError, DataError, EmptySelectionError, GeneIdentifierError,
                           LexicellError, MatrixKindError, QueryError, UnsafeCheckpointError)
from engine.tools.score import check_template, clean_labels, label_texts, split_contrast


def sha256(path: Path) -> str:
    """Checksum of a file, or of every file of a folder (names and contents)."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def embedded(tiny_adata, tiny_model):
    """The tiny dataset embedded, with a stand-in 2-D layout (so the app computes no UMAP)."""
    engine.embed_cells(tiny_adata, tiny_model, progress=False)
    tiny_adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(tiny_adata.n_obs, 2)).astype(np.float32)
    return tiny_adata, tiny_model


# ====================================================================== templates (issue 20 item 1)
BAD_TEMPLATES = [
    # (template, text the message must quote)
    ("{label:>3000000000}", "{label:>3000000000}"),  # 3 GB per label with str.format
    ("{label:>10}", "{label:>10}"),
    ("{definition:^99999}", "{definition:^99999}"),
    ("{label!r}", "{label!r}"),
    ("{label!s:>5}", "{label!s:>5}"),
    ("{label.__class__}", "{label.__class__}"),
    ("{label[0]}", "{label[0]}"),
    ("{0}", "{0}"),
    ("{cell_type}", "{cell_type}"),
    ("A sample of cells", "'A sample of cells'"),
    ("A sample of {label", "'A sample of {label'"),
    ("A sample of label}", "'A sample of label}'"),
    ("{label}" + "x" * 600, "607 characters"),
    ("A {label}\x00", "U+0000"),
]


@pytest.mark.parametrize("template,found", BAD_TEMPLATES, ids=[t[:24] for t, _ in BAD_TEMPLATES])
def test_bad_templates_are_refused_before_formatting(template, found):
    with pytest.raises(QueryError) as err:
        label_texts(["B cell", "T cell"], template)
    msg = str(err.value)
    assert found in msg
    if "characters" not in found and "U+" not in found:
        assert "{label}" in msg  # says what is allowed


def test_allowed_templates_and_literal_braces():
    assert label_texts(["B cell"], "A sample of {}") == ["A sample of B cell"]
    assert label_texts(["B cell"], "{{literal}} {label}") == ["{literal} B cell"]
    assert label_texts(["B cell"], "cell type: {label}. {definition}", definitions={"B cell": "makes antibodies"}) == [
        "cell type: B cell. makes antibodies"]
    assert check_template("cellwhisperer") == engine.TEMPLATES["cellwhisperer"]


def test_template_output_is_capped():
    with pytest.raises(QueryError, match="label text is too long"):
        label_texts(["B cell"], "{label} {definition}", definitions={"B cell": "x" * 5000})


def test_zero_shot_and_evaluate_refuse_a_bad_template(embedded):
    adata, model = embedded
    with pytest.raises(QueryError, match="not allowed"):
        engine.zero_shot(adata, model, ["B cell", "T cell"], template="{label:>3000000000}")
    from engine.training.evaluate import evaluate

    with pytest.raises(QueryError, match="not allowed"):
        evaluate(adata, model, "group", template="{label!r}")


def test_app_custom_template_error_is_shown_in_the_page(embedded):
    from app.state import AppState
    from app.views.zero_shot import ZeroShotView

    adata, model = embedded
    view = ZeroShotView(AppState(adata.copy(), model, dataset_name="t"))
    view.template.value = "custom"
    view.custom_template.value = "<b>{label:>3000000000}</b>"
    assert view.job.alert.visible and view.job.alert.alert_type == "danger"
    assert "not allowed" in view.job.alert.object and "<b>" not in view.job.alert.object
    view.custom_template.value = "A sample of {label}"
    assert not view.job.alert.visible
    view.labels.value = "B cell\nT cell"
    view.custom_template.value = "{label!r}"
    asyncio.run(view._run())  # the run itself also shows the engine's error, not a traceback
    assert view.job.alert.visible and "not allowed" in view.job.alert.object
    assert "Traceback" not in view.job.alert.object


# ====================================================================== queries (item 6a)
BAD_QUERIES = [
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("B cells\x00", "U+0000"),
    ("\x00", "U+0000"),
    ("T cells \ud800", "U+D800"),
    ("\udfff MINUS B cells", "U+DFFF"),
    ("ring \x07 bell", "U+0007"),
    ("x" * 10_000, "10000 characters"),
    ("MINUS B cells", "MINUS"),
    ("T cells MINUS", "MINUS"),
    ("A MINUS B MINUS C", "MINUS"),
    (12345, "int"),
    (None, "NoneType"),
]


@pytest.mark.parametrize("query,found", BAD_QUERIES, ids=[repr(q)[:20] for q, _ in BAD_QUERIES])
def test_bad_queries_are_refused_at_entry(query, found):
    with pytest.raises(QueryError) as err:
        split_contrast(query)
    assert found in str(err.value)


def test_a_nul_query_never_reaches_the_session(embedded):
    from app.state import AppState

    adata, model = embedded
    st = AppState(adata.copy(), model)
    for q in ("B cells\x00", "B \ud800 cells"):
        with pytest.raises(QueryError):
            st.run_query(q)
    assert st.history == [] and st.query == ""


# ====================================================================== label lists (item 7)
BAD_LABELS = [
    (["🙂", "B cell"], "no letters or digits"),
    (["B cell", "🧬🧫"], "no letters or digits"),
    (["!!!", "T cell"], "no letters or digits"),
    (["B cell", "..."], "no letters or digits"),
    (["", "T cell"], "empty"),
    (["B cell", "B  cell"], "distinct"),
    (["B cell"], "at least two"),
    (["B cell\x00", "T cell"], "U+0000"),
    (["B cell", "T \ud83d cell"], "U+D83D"),
    (["x" * 600, "T cell"], "600 characters"),
    ("B cell", "list of names"),
]


@pytest.mark.parametrize("labels,found", BAD_LABELS, ids=[repr(x)[:24] for x, _ in BAD_LABELS])
def test_bad_label_lists_are_refused(embedded, labels, found):
    adata, model = embedded
    before = set(adata.obs.columns)
    with pytest.raises(QueryError) as err:
        engine.zero_shot(adata, model, labels)
    assert found in str(err.value)
    assert set(adata.obs.columns) == before


def test_labels_with_letters_and_emoji_are_fine_and_data_labels_without_letters_are_left_out(embedded):
    adata, model = embedded
    assert clean_labels(["🙂 B cell", "T-cell (CD4+)"]) == ["🙂 B cell", "T-cell (CD4+)"]
    a = adata.copy()
    a.obs["truth"] = pd.Categorical(["B"] * 90 + ["?"] * 10 + ["T"] * 100)
    from engine.training.evaluate import evaluate

    res = evaluate(a, model, "truth")
    assert res["labels"] == ["B", "T"] and any("'?'" in n for n in res["notes"])
    with pytest.raises(QueryError, match="no letters or digits"):
        evaluate(a, model, "truth", labels=["B", "?"])


# ====================================================================== selections
def test_empty_and_out_of_range_selections(embedded):
    adata, model = embedded
    with pytest.raises(EmptySelectionError, match="No cells are selected"):
        engine.describe(adata, model, np.zeros(adata.n_obs, dtype=bool), libraries={"x": ["B cell", "T cell"]})
    with pytest.raises(EmptySelectionError, match="wrong length"):
        engine.describe(adata, model, np.ones(3, dtype=bool), libraries={"x": ["B cell", "T cell"]})
    with pytest.raises(EmptySelectionError, match="out of range"):
        engine.describe(adata, model, [adata.n_obs + 5], libraries={"x": ["B cell", "T cell"]})
    with pytest.raises(EmptySelectionError, match="not in the dataset"):
        engine.describe(adata, model, ["no_such_cell"], libraries={"x": ["B cell", "T cell"]})
    one = engine.describe(adata, model, [0], libraries={"x": ["B cell", "T cell"]})  # one cell is a valid selection
    assert len(one) >= 1


# ====================================================================== data files
def _write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


BAD_FILES = [
    # (file name, content, error type, text the message must contain)
    ("empty.h5ad", b"", DataError, "empty.h5ad"),
    ("truncated.h5ad", None, DataError, "truncated.h5ad"),  # a real h5ad cut in half (made in the test)
    ("text.h5ad", b"not an HDF5 file\n" * 20, DataError, "text.h5ad"),
    ("header_only.csv", ",CD3D,CD3E,MS4A1\n", DataError, "header_only.csv"),
    ("empty.csv", b"", DataError, "empty.csv"),
    ("letters.csv", ",CD3D,CD3E\nc1,1,x\n", DataError, "non-numeric"),
    ("table.xlsx", b"PK\x03\x04", DataError, "Unsupported file format"),
    ("cells.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64, DataError, "cells.h5"),
]


@pytest.mark.parametrize("name,content,etype,found", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_files(tmp_path, tiny_adata, name, content, etype, found):
    if content is None:
        full = tmp_path / "full.h5ad"
        tiny_adata.write_h5ad(full)
        content = full.read_bytes()[: full.stat().st_size // 2]
    f = _write(tmp_path, name, content)
    before = sha256(f)
    with pytest.raises(etype) as err:
        a = engine.read(f)
        engine.validate(a)  # a file that reads (header-only CSV) must still be refused
    assert found in str(err.value)
    assert sha256(f) == before


def test_missing_10x_files(tmp_path):
    d = tmp_path / "tenx"
    d.mkdir()
    (d / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n2 2 1\n1 1 3\n")
    before = sha256(d)
    with pytest.raises(DataError) as err:
        engine.read(d)
    assert "tenx" in str(err.value)
    assert sha256(d) == before


def _adata(X, genes=GENES):
    X = sp.csr_matrix(X) if not sp.issparse(X) else X
    return ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
                      var=pd.DataFrame(index=list(genes)))


def test_matrices_that_cannot_be_ranked(tmp_path):
    counts = make_counts(50)
    dense = counts.toarray()
    probes = []
    nan = dense.copy()
    nan[3, 4] = np.nan
    probes.append((nan, DataError, "NaN"))
    inf = dense.copy()
    inf[5, 1] = np.inf
    probes.append((inf, DataError, "inf"))
    scaled = (dense - dense.mean(0)) / (dense.std(0) + 1e-6)
    probes.append((scaled, MatrixKindError, "scaled"))
    probes.append((np.zeros_like(dense), DataError, "no non-zero values"))
    one_neg = dense.copy()
    one_neg[7, 2] = -1.0  # one stray negative count: not "scaled", and not silently ranked
    probes.append((one_neg, DataError, "negative"))
    few_neg = np.log1p(dense)
    few_neg[[1, 2], [3, 4]] = -0.5
    probes.append((few_neg, DataError, "negative"))
    for X, etype, found in probes:
        f = tmp_path / f"m{len(list(tmp_path.glob('*.h5ad')))}.h5ad"
        _adata(X).write_h5ad(f)
        before = sha256(f)
        with pytest.raises(etype) as err:
            engine.validate(engine.read(f))
        assert found in str(err.value), str(err.value)
        if found == "negative":  # a few negatives are a data error, not "scaled (z-scored)" data
            assert "scaled (z-scored) values" not in str(err.value)
        assert sha256(f) == before


def test_one_negative_value_is_not_called_scaled(tiny_adata):
    from engine.io.data import _matrix_stats

    X = tiny_adata.X.toarray()
    X[0, 0] = -1
    stats = _matrix_stats(X, X.shape[0])
    assert stats["kind"] == "counts" and stats["n_negative"] == 1
    scaled = (X - X.mean(0)) / (X.std(0) + 1e-6)
    assert _matrix_stats(scaled, X.shape[0])["kind"] == "scaled"
    with pytest.raises(DataError, match="negative") as err:
        engine.validate(_adata(X))
    assert "counts with 1 negative value" in str(err.value) or "1 negative value" in str(err.value)


def test_unmatched_and_empty_genes():
    X = make_counts(20)
    with pytest.raises(GeneIdentifierError) as err:
        engine.validate(_adata(X, [f"NOTAGENE{i}" for i in range(len(GENES))]))
    assert "NOTAGENE0" in str(err.value)
    with pytest.raises(DataError, match="empty"):
        engine.validate(_adata(sp.csr_matrix((0, len(GENES)), dtype=np.float32)))


def test_duplicate_gene_names_are_summed_with_a_warning(embedded):
    _, model = embedded
    genes = list(GENES) + ["CD74"] * 48  # CD74 49 times, as HES4 in the probe
    X = sp.hstack([make_counts(30), sp.csr_matrix(np.ones((30, 48), dtype=np.float32))]).tocsr()
    a = _adata(X, genes)
    with pytest.warns(DataWarning, match="49 x CD74"):
        rep = engine.validate(a)
    assert any("49 x CD74" in w for w in rep.warnings)
    assert any("49 x CD74" in w for w in a.uns["lexicell"]["validation"]["warnings"])
    with pytest.warns(DataWarning, match="summed"):
        engine.embed_cells(a, model, progress=False)
    assert any("49 x CD74" in w for w in a.uns["transcriptome_embeds"]["params"]["warnings"])


def test_mouse_genes_warn_in_the_engine_and_in_the_page(tiny_model):
    from app import cache
    from app.layout import Explorer

    mouse = [g.capitalize() for g in GENES]
    a = _adata(make_counts(40), mouse)
    with pytest.warns(DataWarning, match="ortholog"):
        engine.embed_cells(a, tiny_model, progress=False)
    assert any("ortholog" in w for w in a.uns["transcriptome_embeds"]["params"]["warnings"])
    a.obsm["X_umap"] = np.random.default_rng(0).normal(size=(a.n_obs, 2)).astype(np.float32)
    cache.clear()
    ex = Explorer(a, tiny_model, name="mouse")
    assert ex.message.visible and ex.message.alert_type == "warning" and "ortholog" in ex.message.object
    assert any("ortholog" in w for w in ex.state.data_warnings())


# ====================================================================== models
def _model_dir(tmp_path, tiny_model, name="m") -> Path:
    from engine.models.checkpoint import save_model

    return save_model(tiny_model, tmp_path / name)


CONFIG_PROBES = [
    # (path of keys, value, text the message must contain)
    (("projection_dim",), "abc", "projection_dim = 'abc'"),
    (("projection_dim",), -5, "projection_dim = -5"),
    (("projection_dim",), 0, "projection_dim = 0"),
    (("projection_dim",), 1e6, "projection_dim = 1000000.0"),
    (("projection_dim",), 10**6, "16384"),
    (("projection_dim",), True, "projection_dim = True"),
    (("projection_dim",), None, "projection_dim = None"),
    (("transcriptome_tower",), "x", "transcriptome_tower = 'x'"),
    (("transcriptome_tower",), [1, 2], "transcriptome_tower = [1, 2]"),
    (("transcriptome_tower", "type"), "x", "transcriptome_tower.type = 'x'"),
    (("transcriptome_tower", "type"), 5, "transcriptome_tower.type = 5"),
    (("transcriptome_tower", "hidden_size"), 0, "transcriptome_tower.hidden_size = 0"),
    (("transcriptome_tower", "hidden_size"), "abc", "transcriptome_tower.hidden_size = 'abc'"),
    (("transcriptome_tower", "hidden_size"), 10**6, "transcriptome_tower.hidden_size = 1000000"),
    (("transcriptome_tower", "n_layers"), -1, "transcriptome_tower.n_layers = -1"),
    (("transcriptome_tower", "dropout"), 2, "transcriptome_tower.dropout = 2"),
    (("transcriptome_tower", "mlp_ratio"), "big", "transcriptome_tower.mlp_ratio = 'big'"),
    (("transcriptome_tower", "tokenizer"), "x", "transcriptome_tower.tokenizer = 'x'"),
    (("transcriptome_tower", "tokenizer", "max_length"), -1, "transcriptome_tower.tokenizer.max_length = -1"),
    (("text_tower",), None, "text_tower = None"),
    (("text_tower", "source"), 3, "text_tower.source = 3"),
    (("text_tower", "pooling"), "max", "text_tower.pooling = 'max'"),
    (("text_tower", "max_length"), "128", "text_tower.max_length = '128'"),
    (("text_tower", "finetuned"), "encoder", "text_tower.finetuned = 'encoder'"),
    (("transcriptome_projection",), "linear", "transcriptome_projection = 'linear'"),
    (("text_projection", "type"), "bogus", "text_projection.type = 'bogus'"),
    (("text_projection", "hidden"), 0, "text_projection.hidden = 0"),
    (("metadata",), [1], "metadata = [1]"),
    (("name",), {"a": 1}, "name = {'a': 1}"),
]


@pytest.mark.parametrize("keys,value,found", CONFIG_PROBES, ids=[".".join(k) + "=" + repr(v)[:10] for k, v, _ in CONFIG_PROBES])
def test_wrong_types_in_config_json(tmp_path, tiny_model, keys, value, found):
    folder = _model_dir(tmp_path, tiny_model)
    cfg = json.loads((folder / "config.json").read_text())
    d = cfg
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    before = sha256(folder)
    with pytest.raises(CheckpointError) as err:
        engine.load_model(folder)
    assert "config.json holds an invalid value" in str(err.value)  # refused by check_config, before building
    assert found in str(err.value), str(err.value)
    assert sha256(folder) == before


def test_oversized_config_is_refused_before_allocating(tmp_path, tiny_model, monkeypatch):
    """projection_dim 1e6 used to allocate ~3.5 GB before the shape check; now nothing is built at all."""
    import torch

    folder = _model_dir(tmp_path, tiny_model)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["projection_dim"] = 1_000_000
    (folder / "config.json").write_text(json.dumps(cfg))
    built = []
    orig = torch.nn.Linear.__init__

    def spy(self, *a, **k):
        built.append(a)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    with pytest.raises(CheckpointError, match="from 1 to 16384"):
        engine.load_model(folder)
    assert built == []


def test_broken_model_folders(tmp_path, tiny_model):
    probes = []
    empty = tmp_path / "empty"
    empty.mkdir()
    probes.append((empty, "no config.json"))
    f = _model_dir(tmp_path, tiny_model, "corrupt")
    (f / "model.safetensors").write_bytes(b"\x00" * 100)
    probes.append((f, "corrupt"))
    f = _model_dir(tmp_path, tiny_model, "nogenes")
    (f / "genes.tsv").unlink()
    probes.append((f, "genes.tsv"))
    f = _model_dir(tmp_path, tiny_model, "notjson")
    (f / "config.json").write_text("{projection_dim: 8")
    probes.append((f, "not valid JSON"))
    f = _model_dir(tmp_path, tiny_model, "list")
    (f / "config.json").write_text("[1, 2]")
    probes.append((f, "list"))
    f = _model_dir(tmp_path, tiny_model, "hugevocab")
    g = pd.read_csv(f / "genes.tsv", sep="\t")
    g.loc[0, "token_id"] = 10**12
    g.to_csv(f / "genes.tsv", sep="\t", index=False)
    probes.append((f, "1,000,000,000,000"))
    f = _model_dir(tmp_path, tiny_model, "shape")
    cfg = json.loads((f / "config.json").read_text())
    cfg["projection_dim"] = 16
    (f / "config.json").write_text(json.dumps(cfg))
    probes.append((f, "shape mismatches"))
    probes.append((tmp_path / "missing", "does not exist"))
    for folder, found in probes:
        before = sha256(folder) if folder.exists() else None
        with pytest.raises(CheckpointError) as err:
            engine.load_model(folder)
        assert found in str(err.value), (folder, str(err.value))
        if before is not None:
            assert sha256(folder) == before


def _text_folder(tmp_path, tiny_text_dir, name):
    d = tmp_path / name
    shutil.copytree(tiny_text_dir, d)
    return d


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > " + str(Path(os.environ["LEXICELL_CACHE"]).parent / "owned.txt"),))


def test_hostile_pytorch_model_bin_in_a_text_model_folder(tmp_path, tiny_text_dir):
    from engine.models.towers import TextTower

    d = _text_folder(tmp_path, tiny_text_dir, "evil_text")
    for w in d.glob("*.safetensors"):
        w.unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Evil()}))
    before = sha256(d)
    with pytest.raises(UnsafeCheckpointError) as err:
        TextTower(d)
    assert "evil_text" in str(err.value) and "weights_only" in str(err.value)
    assert not (tmp_path / "owned.txt").exists()
    assert sha256(d) == before


@pytest.mark.parametrize("key,value", [("hidden_size", 0), ("hidden_size", 10**6), ("num_hidden_layers", "x"),
                                       ("vocab_size", 10**9), ("intermediate_size", -1)])
def test_oversized_text_model_config(tmp_path, tiny_text_dir, key, value):
    from engine.models.towers import TextTower

    d = _text_folder(tmp_path, tiny_text_dir, "big_text")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        TextTower(d, load_weights=False)
    assert f"{key} = {value!r}" in str(err.value)


# ====================================================================== CLI outputs (item 3)
@pytest.fixture
def cli_inputs(tmp_path, tiny_adata, tiny_model):
    model_dir = _model_dir(tmp_path, tiny_model, "model")
    data = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(data)
    return data, model_dir


def _evaluate(data, model_dir, *extra):
    from engine.training.evaluate import main

    return main([str(data), "--label-key", "group", "--model", str(model_dir), "--json", "--device", "cpu", *extra])


@pytest.mark.parametrize("target,overwrite", [("input", False), ("input", True), ("other", False),
                                              ("model_config", True), ("folder", True)])
def test_evaluate_confusion_never_overwrites(cli_inputs, tmp_path, capsys, target, overwrite):
    data, model_dir = cli_inputs
    other = tmp_path / "results.csv"
    other.write_text("precious results\n")
    path = {"input": data, "other": other, "model_config": model_dir / "config.json", "folder": tmp_path}[target]
    sums = {p: sha256(p) for p in (data, other, model_dir)}
    rc = _evaluate(data, model_dir, "--confusion", str(path), *(["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err
    assert {p: sha256(p) for p in sums} == sums


def test_evaluate_confusion_overwrite_replaces_only_a_non_input(cli_inputs, tmp_path, capsys):
    data, model_dir = cli_inputs
    other = tmp_path / "results.csv"
    other.write_text("old\n")
    assert _evaluate(data, model_dir, "--confusion", str(other), "--overwrite") == 0
    assert "true \\ predicted" in other.read_text()
    fresh = tmp_path / "new.csv"
    assert _evaluate(data, model_dir, "--confusion", str(fresh)) == 0 and fresh.is_file()


def test_convert_and_distill_refuse_an_input_as_out(tmp_path, tiny_model, tiny_adata, capsys):
    from engine.models import convert
    from engine.training import distill

    teacher = _model_dir(tmp_path, tiny_model, "teacher")
    data = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(data)
    before = sha256(teacher), sha256(data)
    rc = distill.main(["--teacher", str(teacher), "--data", str(data), "--out", str(teacher), "--overwrite"])
    assert rc == 2 and "input" in capsys.readouterr().err
    rc = distill.main(["--teacher", str(teacher), "--data", str(data), "--out", str(teacher)])
    assert rc == 2
    gf = tmp_path / "geneformer"
    gf.mkdir()
    (gf / "config.json").write_text("{}")
    gf_sum = sha256(gf)
    rc = convert.main(["geneformer", str(gf), "--out", str(gf), "--overwrite"])
    assert rc == 2 and "input" in capsys.readouterr().err
    assert (sha256(teacher), sha256(data)) == before and sha256(gf) == gf_sum


# ====================================================================== saving from the app (items 6b, 6e)
@pytest.fixture
def app_state(embedded):
    from app.state import AppState

    adata, model = embedded
    return AppState(adata.copy(), model, dataset_name="tiny")


@pytest.mark.parametrize("exc", [UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
                                 OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_no_partial_file(app_state, tmp_path, monkeypatch, exc):
    def boom(self, *a, **k):
        Path(a[0]).write_bytes(b"half a file")
        raise exc

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    folder = tmp_path / "exports"
    folder.mkdir()
    target = folder / "out.h5ad"
    if isinstance(exc, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            app_state.save_h5ad(target)
    else:
        with pytest.raises(DataError) as err:
            app_state.save_h5ad(target)
        assert type(exc).__name__ in str(err.value) and "out.h5ad" in str(err.value)
    assert list(folder.iterdir()) == []  # neither the file nor a *.partial


def test_two_saves_of_one_name_at_once(app_state, tmp_path, monkeypatch):
    """Both writes run at the same time (a barrier inside write_h5ad); one wins, the other gets a typed error."""
    barrier = threading.Barrier(2, timeout=60)
    orig = ad.AnnData.write_h5ad

    def slow(self, *a, **k):
        orig(self, *a, **k)
        barrier.wait()

    monkeypatch.setattr(ad.AnnData, "write_h5ad", slow)
    folder = tmp_path / "exports"
    folder.mkdir()
    target = folder / "same.h5ad"
    outcomes = []

    def save():
        try:
            outcomes.append(app_state.save_h5ad(target))
        except Exception as err:  # noqa: BLE001 - recorded and checked below
            outcomes.append(err)

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(outcomes) == 2 and len(errors) == 1
    assert isinstance(errors[0], DataError) and "already exists" in str(errors[0])
    assert sorted(p.name for p in folder.iterdir()) == ["same.h5ad"]
    assert ad.read_h5ad(target).n_obs == app_state.n_cells


# ====================================================================== HTML and Markdown in the page (item 5)
PAYLOADS = ["<img src=x onerror=alert(1)>", "**bold** [link](javascript:alert(1))", "<script>alert(1)</script>"]


def rendered(pane) -> str:
    """The HTML a Markdown/Alert pane puts into the page (Panel ships it HTML-escaped once)."""
    return html.unescape(pane._transform_object(pane.object)["object"])


def assert_inert(pane, payload):
    """No tag, link or emphasis made from ``payload`` reaches the page, and the page shows it literally."""
    out = rendered(pane)
    for tag in ("<img", "<script", "<a ", "<strong>bold"):
        assert tag not in out, (payload, out)
    visible = html.unescape(re.sub(r"<[^>]+>", "", out))
    assert payload in visible, (payload, visible)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_user_and_dataset_strings_reach_panes_escaped(embedded, payload, tmp_path):
    from app import cache
    from app.layout import Explorer
    from app.views.common import Job
    from app.views.export import AboutView
    from app.views.perturb import PerturbView
    from app.views.zero_shot import ZeroShotView

    adata, model = embedded
    cache.clear()
    ex = Explorer(adata.copy(), model, name=payload)
    st = ex.state
    assert_inert(ex.info, payload)
    # an error quoting a query
    job = Job()
    job.show(str(QueryError("Bad", found=payload)))
    assert_inert(job.alert, payload)
    # a state message quoting a query and a column name
    st.run_query(payload + " cells")
    st.keep_query(payload)
    assert_inert(ex.message, payload)
    perturb = PerturbView(st)
    perturb._update_scope()
    assert_inert(perturb.scope, payload)
    zs = ZeroShotView(st)
    zs.template.value = "custom"
    zs.custom_template.value = payload + " {label}"
    assert_inert(zs.template_text, payload)
    zs._show_metrics({"label_key": payload, "template": payload, "per_cell": {}, "per_class": {},
                      "notes": [payload]})
    assert_inert(zs.eval_info, payload)
    st.dataset_name = payload
    st.input_path = str(tmp_path / "x.h5ad")
    about = AboutView(st)
    assert_inert(about.summary, payload)
    table = pd.DataFrame({"gene": ["A"], "direction": ["up"], "pval_adj": [0.01], "logfoldchange": [1.0],
                          "score": [2.0], "pval": [0.001]})
    table.attrs.update(n_used=5, method=payload, messages=[payload])
    st.apply_de(table)  # engine messages quoting dataset strings
    assert_inert(ex.message, payload)


def test_error_alerts_of_queries_are_escaped(embedded):
    from app.state import AppState
    from app.views.query import QueryView

    adata, model = embedded
    view = QueryView(AppState(adata.copy(), model))
    view.text.value_input = '<img src="/x.png" onerror=alert(1)> MINUS'
    asyncio.run(view._search())
    assert view.job.alert.visible and "MINUS" in view.job.alert.object
    assert_inert(view.job.alert, "<img src=")
