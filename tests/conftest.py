"""Shared fixtures: tiny AnnData objects and tiny random models in the real formats."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# 60 HGNC symbols with known Ensembl IDs (a PBMC-flavoured set).
GENES = [
    "CD3D", "CD3E", "CD2", "IL7R", "CCR7", "CD8A", "CD8B", "GZMB", "GZMK", "NKG7",
    "GNLY", "PRF1", "KLRD1", "MS4A1", "CD79A", "CD79B", "CD19", "CD74", "HLA-DRA", "HLA-DRB1",
    "LYZ", "CD14", "FCGR3A", "S100A8", "S100A9", "CST3", "FCER1A", "ITGAX", "CD34", "KIT",
    "MKI67", "TOP2A", "CDK1", "CCNB1", "PCNA", "MCM2", "ACTB", "GAPDH", "B2M", "MALAT1",
    "FOXP3", "IL2RA", "CTLA4", "PTPRC", "SELL", "LEF1", "TCF7", "PPBP", "PF4", "HBB",
    "JCHAIN", "MZB1", "IRF4", "XBP1", "CD1C", "CLEC10A", "IFIT1", "ISG15", "MX1", "STAT1",
]


def make_counts(n_cells: int = 200, genes=GENES, seed: int = 0) -> sp.csr_matrix:
    """Two groups of cells: group B over-expresses the B-cell genes, group T the T-cell genes."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 2.0, size=len(genes))
    mu = np.tile(base, (n_cells, 1))
    b = np.isin(genes, ["MS4A1", "CD79A", "CD79B", "CD19", "CD74"])
    t = np.isin(genes, ["CD3D", "CD3E", "CD2", "IL7R", "CCR7"])
    half = n_cells // 2
    mu[:half, b] *= 15
    mu[half:, t] *= 15
    counts = rng.poisson(mu).astype(np.float32)
    return sp.csr_matrix(counts)


@pytest.fixture
def tiny_adata():
    """200 cells x 60 genes of raw counts, symbols as var_names, ``obs['group']`` in {B, T}."""
    import anndata as ad

    X = make_counts()
    obs = pd.DataFrame({"group": pd.Categorical(["B"] * 100 + ["T"] * 100)}, index=[f"cell{i}" for i in range(200)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A tiny random BERT (2 layers, width 32) with a real WordPiece tokenizer, saved as a HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from engine.models.towers import default_text_model_path

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(default_text_model_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_model(text_dir, *, seed: int = 0, head: str = "linear", max_length: int = 32):
    """A random tiny :class:`TranscriptomeTextModel` over :data:`GENES`."""
    import torch

    from engine.models.model import TranscriptomeTextModel
    from engine.models.tokenizer import RankTokenizer
    from engine.models.towers import SparseRankTower, TextTower

    torch.manual_seed(seed)
    medians = np.linspace(0.5, 3.0, len(GENES))
    tok = RankTokenizer(GENES, gene_medians=medians, symbols=GENES, max_length=max_length)
    tower = SparseRankTower(tok, hidden_size=16, n_layers=1, dropout=0.0)
    text = TextTower(text_dir, pooling="mean", max_length=32)
    model = TranscriptomeTextModel(
        tower, text, projection_dim=8, transcriptome_head={"type": head}, text_head={"type": head}, name="tiny"
    )
    return model.eval()


@pytest.fixture
def tiny_model(tiny_text_dir):
    """A random tiny model (sparse rank tower width 16, tiny BERT, 8-d shared space)."""
    return build_tiny_model(tiny_text_dir)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own embedding cache folder."""
    monkeypatch.setenv("LEXICELL_CACHE", str(tmp_path / "cache"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for test servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_text_dir):
    """The demo dataset embedded once with a tiny random model (module scope: embedding is the slow part).

    Yields ``(adata, model)``; the embedding cache lives in a temporary folder. Test modules that need the
    bundled model define their own ``demo``.
    """
    import engine

    mp = pytest.MonkeyPatch()
    mp.setenv("LEXICELL_CACHE", str(tmp_path_factory.mktemp("demo_cache")))
    model = build_tiny_model(tiny_text_dir)
    base = engine.demo_dataset()
    engine.embed_cells(base, model, progress=False)
    yield base, model
    mp.undo()

