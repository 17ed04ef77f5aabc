"""``python -m engine.distill``: a tiny CellWhisperer teacher in the real formats, distilled into a sparse rank tower.

The teacher is the golden test's Lightning-format checkpoint (``cw_lightning.py``) with a tiny Geneformer whose
dictionary holds the 60 genes of ``conftest.GENES``, converted with ``python -m engine.convert cellwhisperer``.
Its embeddings share a large common direction (every cell has cosine 0.99 to the mean), so the test also
checks what that cosine cannot see: the centred cosine and the Spearman of query scores.
"""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import engine
from conftest import GENES
from cw_lightning import tiny_cellwhisperer
from engine.errors import CancelledError, CheckpointError, ConfigError, GeneIdentifierError, MatrixKindError

GROUPS = {
    "B": ["MS4A1", "CD79A", "CD79B", "CD19", "CD74", "HLA-DRA"],
    "T": ["CD3D", "CD3E", "CD2", "IL7R", "CCR7", "LEF1"],
    "mono": ["LYZ", "CD14", "S100A8", "S100A9", "CST3", "FCGR3A"],
    "NK": ["GNLY", "NKG7", "GZMB", "PRF1", "KLRD1"],
    "prolif": ["MKI67", "TOP2A", "CDK1", "CCNB1", "PCNA"],
}
# Small batches and a student wider than the tiny teacher's 16-wide head (a fresh linear head then): the tiny
# data set has 270 training cells.
FAST = ["--hidden-size", "64", "--batch-size", "32", "--epochs", "20", "--lr", "3e-3", "--speed-budget", "1",
        "--no-progress"]


def make_cells(n: int = 300, seed: int = 1) -> ad.AnnData:
    """Raw counts of five groups, each over-expressing its marker genes, with varying library sizes."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 1.0, size=len(GENES))
    group = rng.integers(0, len(GROUPS), n)
    mu = np.tile(base, (n, 1)) * rng.lognormal(0, 0.3, (n, 1))
    for k, markers in enumerate(GROUPS.values()):
        mu[np.ix_(group == k, np.isin(GENES, markers))] *= 10
    X = sp.csr_matrix(rng.poisson(mu).astype(np.float32))
    obs = pd.DataFrame({"group": pd.Categorical(np.array(list(GROUPS))[group])}, index=[f"cell{i}" for i in range(n)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from engine.io.data import expression_matrix

    _, var = expression_matrix(make_cells(4), kind="counts")
    medians = np.random.default_rng(0).lognormal(0, 0.5, len(GENES))
    genes = [(e, s, float(m)) for e, s, m in zip(var["ensembl_id"], var["gene_symbol"], medians)]
    return tiny_cellwhisperer(tmp_path_factory.mktemp("teacher"), genes=genes)


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    make_cells().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def distilled(teacher, cells_file, tmp_path_factory):
    from engine.training.distill import main

    out = tmp_path_factory.mktemp("student") / "cellwhisperer-fast"
    rc = main(["--teacher", str(teacher), "--data", str(cells_file), "--out", str(out), "--device", "auto", *FAST])
    assert rc == 0
    return out


def test_student_reproduces_the_teacher(distilled, teacher, capsys):
    report = json.loads((distilled / "distill_report.json").read_text())
    print(
        "tiny CellWhisperer teacher -> student (held-out cells): cosine {heldout_cosine_mean:.4f} (baseline "
        "{baseline_cosine_mean:.4f}), centred cosine {heldout_centred_cosine_mean:.4f}, query Spearman mean "
        "{query_spearman_mean:.4f} (min {query_spearman_min:.4f}), label agreement {label_agreement:.4f}, speed "
        "ratio {ratio:.1f}x (teacher {t:.0f} cells/s, student {s:.0f} cells/s)".format(
            **report, ratio=report["speed"]["ratio"], t=report["speed"]["teacher_cells_per_s"],
            s=report["speed"]["student_cells_per_s"],
        )
    )
    assert report["n_cells"] == {"train": 270, "held_out": 30}
    assert report["heldout_cosine_mean"] >= 0.9
    # the tiny teacher's cells differ little (baseline 0.99): the cell-to-cell differences must be learnt too
    assert report["heldout_cosine_mean"] > report["baseline_cosine_mean"]
    assert report["heldout_centred_cosine_mean"] >= 0.6
    assert report["query_spearman_mean"] >= 0.8 and set(report["query_spearman"]) == set(engine.training.distill.DEFAULT_QUERIES)
    assert report["label_agreement"] >= 0.9
    assert report["speed"]["teacher_cells_per_s"] > 0 and report["speed"]["student_cells_per_s"] > 0
    assert report["teacher_chunks"] == {**report["teacher_chunks"], "computed": 1, "reused": 0}
    assert report["student"]["head"] == "fresh linear" and report["reload_max_abs_diff"] < 1e-5
    card = (distilled / "MODEL_CARD.md").read_text()
    assert f"{report['heldout_cosine_mean']:.4f}" in card and "Speed" in card and "session" not in card.lower()


def test_student_is_a_normal_model_with_the_teachers_text_side(distilled, teacher, cells_file):
    import torch

    student = engine.load_model(distilled, device="cpu")
    teach = engine.load_model(teacher, device="cpu")
    cfg = json.loads((distilled / "config.json").read_text())
    assert cfg["transcriptome_tower"]["type"] == "sparse_rank"
    assert cfg["text_tower"]["weights"] == "checkpoint" and cfg["text_tower"]["source"] == "text_model"
    assert (distilled / "text_model" / "config.json").is_file()
    assert cfg["metadata"]["distillation"]["teacher"]["name"] == teach.name
    texts = ["B cells", "a sample of monocytes from a healthy individual"]
    np.testing.assert_allclose(student.embed_texts(texts), teach.embed_texts(texts), atol=1e-6)
    assert torch.equal(student.logit_scale, teach.logit_scale)
    adata = engine.read(cells_file)
    engine.embed_cells(adata, student, progress=False)
    scores = engine.score_text(adata, student, "B cells MINUS T cells")
    assert scores.shape == (adata.n_obs,) and np.isfinite(scores).all()
    probs = engine.zero_shot(adata, student, ["B cell", "T cell", "monocyte"])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    shift = engine.perturb(adata, student, ["MS4A1"], mode="delete", max_cells=20, progress=False)
    assert len(shift) > 0


def test_resume_skips_finished_chunks(teacher, cells_file, tmp_path):
    from engine.training.distill import distill

    out = tmp_path / "fast"
    calls = []

    def cancel_on_third_chunk():
        calls.append(1)
        return len(calls) > 2

    kw = dict(chunk_size=64, epochs=2, batch_size=64, speed_budget_s=0.5, progress=False, verbose=False)
    with pytest.raises(CancelledError):
        distill(teacher, [cells_file], out, cancel=cancel_on_third_chunk, **kw)
    chunks = sorted(out.glob("teacher_embeds/*/chunk_*.npy"))
    assert [c.name for c in chunks] == ["chunk_00000.npy", "chunk_00001.npy"]
    first = np.load(chunks[0])
    report = distill(teacher, [cells_file], out, **kw)  # same --out: the interrupted run resumes
    assert report["teacher_chunks"]["computed"] == 3 and report["teacher_chunks"]["reused"] == 2
    assert report["student"]["head"] == "teacher's mi_linear"  # default width = the teacher's: its head is copied
    np.testing.assert_array_equal(np.load(chunks[0]), first)
    # the cache holds exactly what engine.embed_cells gives with the teacher
    adata = engine.read(cells_file)
    ref = engine.embed_cells(adata, engine.load_model(teacher, device="cpu"), progress=False, use_cache=False)
    cached = np.concatenate([np.load(c) for c in sorted(out.glob("teacher_embeds/*/chunk_*.npy"))])
    np.testing.assert_allclose(cached, ref, atol=1e-5)
    with pytest.raises(ConfigError, match="already holds a model"):
        distill(teacher, [cells_file], out, **kw)
    again = distill(teacher, [cells_file], out, overwrite=True, **kw)
    assert again["teacher_chunks"]["computed"] == 0 and again["teacher_chunks"]["reused"] == 5


def test_bad_inputs_raise_typed_errors(teacher, cells_file, tmp_path, capsys):
    from engine.training.distill import distill, main

    kw = dict(epochs=1, progress=False, verbose=False)
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(CheckpointError):
        distill(tmp_path / "not_a_model", [cells_file], tmp_path / "o1", **kw)
    with pytest.raises(CheckpointError):
        distill(cells_file, [cells_file], tmp_path / "o2", **kw)
    logn = make_cells(40)
    logn.X = sp.csr_matrix(np.log1p(logn.X.toarray() / logn.X.sum(1).A * 1e4).astype(np.float32))
    logn.write_h5ad(tmp_path / "lognorm.h5ad")
    with pytest.raises(MatrixKindError):
        distill(teacher, [tmp_path / "lognorm.h5ad"], tmp_path / "o3", **kw)
    foreign = make_cells(40)
    foreign.var_names = [f"ENSMUSG{i:011d}" for i in range(len(GENES))]  # mouse IDs: none in the vocabulary
    foreign.write_h5ad(tmp_path / "mouse.h5ad")
    with pytest.raises(GeneIdentifierError):
        distill(teacher, [cells_file, tmp_path / "mouse.h5ad"], tmp_path / "o4", **kw)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        distill(teacher, [cells_file], busy, **kw)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError):
        distill(teacher, [cells_file], tmp_path / "o5", held_out=1.5, **kw)
    assert main(["--teacher", str(tmp_path / "not_a_model"), "--data", str(cells_file), "--out", str(tmp_path / "o6")]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--teacher", str(teacher), "--out", str(tmp_path / "o7")])  # --data is required


def test_device_choice(monkeypatch):
    import torch

    from engine.models.model import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu-ish")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
