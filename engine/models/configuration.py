"""The native ``config.json``: file names, size limits and validation before anything is allocated.

Kept apart from the modelling code (as transformers keeps ``configuration_*`` apart from ``modeling_*``):
towers, the Geneformer loader and the checkpoint reader all check sizes here, and nothing here imports them.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .registry import get_transcriptome_tower, tower_names

__all__ = ["check_config", "check_hf_config", "read_config", "MAX_DIM", "MAX_VOCAB", "HF_LIMITS",
           "CONFIG_FILE", "WEIGHTS_FILE", "GENES_FILE", "TEXT_DIR", "DEFAULT_MODEL_NAME"]

DEFAULT_MODEL_NAME = "lexicell-default"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENES_FILE = "genes.tsv"
TEXT_DIR = "text_model"


def read_config(path: Path) -> dict:
    """Read and check ``config.json`` of the native model folder ``path``.

    Raises
    ------
    CheckpointError
        No ``config.json``, invalid JSON, another format, a missing entry, or a value out of type or range.
    """
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(
            "The model folder has no config.json",
            found=f"{path} containing {sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else 'nothing'}",
            expected="a Lexicell model folder (config.json, model.safetensors, genes.tsv)",
            fix="convert other checkpoints first: python -m engine.convert ...",
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError("config.json is not valid JSON", found=f"{cfg_file}: {err}", expected="a JSON object") from err
    if not isinstance(config, dict) or config.get("format") != "lexicell-clip":
        raise CheckpointError(
            "config.json is not a Lexicell model config",
            found=f"format={config.get('format') if isinstance(config, dict) else type(config).__name__!r}",
            expected="format='lexicell-clip'",
            fix="for CellWhisperer or Geneformer files, run python -m engine.convert first",
        )
    for key in ("transcriptome_tower", "text_tower", "projection_dim"):
        if key not in config:
            raise CheckpointError("config.json lacks a required entry", found=f"no {key!r}", expected=f"a {key!r} entry")
    check_config(config)
    return config


#: Largest width accepted for any dimension in ``config.json`` (projection, hidden sizes, head widths).
MAX_DIM = 16384
#: Largest gene vocabulary (embedding rows) accepted from ``genes.tsv``.
MAX_VOCAB = 1_000_000
_TOWER_INTS = {"hidden_size": (1, MAX_DIM), "n_layers": (0, 64), "emb_layer": (-64, 64),
               "max_tokens_per_batch": (1, 10_000_000)}
_TOWER_FLOATS = {"dropout": (0.0, 1.0), "token_dropout": (0.0, 1.0), "mlp_ratio": (0.0, 16.0)}
_TOKENIZER_INTS = {"max_length": (1, 65536), "pad_token_id": (0, 10_000_000), "mask_token_id": (0, 10_000_000),
                   "cls_token_id": (0, 10_000_000), "eos_token_id": (0, 10_000_000)}
#: Hugging Face config fields checked before a model is built from it (sizes that allocate memory).
HF_LIMITS = {"hidden_size": (1, MAX_DIM), "intermediate_size": (1, 4 * MAX_DIM), "num_hidden_layers": (1, 128),
             "num_attention_heads": (1, 1024), "vocab_size": (1, 1_000_000), "max_position_embeddings": (1, 65536),
             "type_vocab_size": (0, 1024)}


def _bad(key: str, value, expected: str) -> CheckpointError:
    return CheckpointError("config.json holds an invalid value", found=f"{key} = {value!r} ({type(value).__name__})",
                           expected=expected, fix="correct config.json, or re-save the model with engine.save_model")


def _check_int(key: str, value, lo: int, hi: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(key, value, f"an integer from {lo} to {hi}" + (" or null" if optional else ""))


def _check_float(key: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise _bad(key, value, f"a number from {lo:g} to {hi:g}")


def _check_section(key: str, value, *, optional: bool = False) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise _bad(key, value, "a JSON object ({...})" + (" or null" if optional else ""))
    return value


def check_hf_config(values: dict, where: str) -> None:
    """Check the sizes of a Hugging Face model config before anything is allocated from it.

    Parameters
    ----------
    values
        The config as a dict (``config.json`` of a text model, a Geneformer ``bert_config``).
    where
        Its name in messages (``"text_model/config.json"``).

    Raises
    ------
    CheckpointError
        A size in :data:`HF_LIMITS` that is not an integer in range (e.g. ``hidden_size`` 0 or 10^6).
    """
    if not isinstance(values, dict):
        raise _bad(where, values, "a JSON object")
    for k, (lo, hi) in HF_LIMITS.items():
        if k in values:
            _check_int(f"{where}: {k}", values[k], lo, hi)


def check_config(config: dict) -> None:
    """Check the types and ranges of a native ``config.json`` before any tensor is allocated.

    Every width is an integer from 1 to :data:`MAX_DIM` (16,384); sections are JSON objects; tower, head and
    pooling types are known names.

    Raises
    ------
    CheckpointError
        Naming the key, the value found and the type or range expected.
    """
    from .heads import HEAD_TYPES

    _check_int("projection_dim", config.get("projection_dim"), 1, MAX_DIM)
    if "name" in config and not isinstance(config["name"], str):
        raise _bad("name", config["name"], "a text")
    _check_section("metadata", config.get("metadata"), optional=True)
    t = _check_section("transcriptome_tower", config.get("transcriptome_tower"))
    ttype = t.get("type")
    if not isinstance(ttype, str):
        raise _bad("transcriptome_tower.type", ttype, f"a tower name such as {tower_names()}")
    if get_transcriptome_tower(ttype) is None:
        raise _bad("transcriptome_tower.type", ttype, f"one of {tower_names()}")
    for k, (lo, hi) in _TOWER_INTS.items():
        if k in t:
            _check_int(f"transcriptome_tower.{k}", t[k], lo, hi, optional=k == "max_tokens_per_batch")
    for k, (lo, hi) in _TOWER_FLOATS.items():
        if k in t:
            _check_float(f"transcriptome_tower.{k}", t[k], lo, hi)
    if "mlp_ratio" in t and float(t["mlp_ratio"]) * t.get("hidden_size", 256) > 4 * MAX_DIM:
        raise _bad("transcriptome_tower.mlp_ratio", t["mlp_ratio"], f"mlp_ratio x hidden_size at most {4 * MAX_DIM}")
    tok = _check_section("transcriptome_tower.tokenizer", t.get("tokenizer"), optional=True)
    for k, (lo, hi) in _TOKENIZER_INTS.items():
        if k in tok:
            _check_int(f"transcriptome_tower.tokenizer.{k}", tok[k], lo, hi, optional=k != "max_length")
    if "bert_config" in t:
        check_hf_config(t["bert_config"], "transcriptome_tower.bert_config")
    x = _check_section("text_tower", config.get("text_tower"))
    if x.get("type", "hf") != "hf":
        raise _bad("text_tower.type", x.get("type"), "'hf'")
    if not isinstance(x.get("source"), str) or not x.get("source"):
        raise _bad("text_tower.source", x.get("source"), "a folder path or package name (text)")
    if x.get("pooling") not in (None, "mean", "cls", "pooler"):
        raise _bad("text_tower.pooling", x.get("pooling"), "'mean', 'cls', 'pooler' or null")
    if "max_length" in x:
        _check_int("text_tower.max_length", x["max_length"], 1, 65536)
    if x.get("weights", "source") not in ("source", "checkpoint"):
        raise _bad("text_tower.weights", x.get("weights"), "'source' or 'checkpoint'")
    fin = x.get("finetuned", [])
    if not isinstance(fin, list) or not all(isinstance(f, str) for f in fin):
        raise _bad("text_tower.finetuned", fin, "a list of parameter-name prefixes (text)")
    for side in ("transcriptome_projection", "text_projection"):
        h = _check_section(side, config.get(side), optional=True)
        if h.get("type", "linear") not in HEAD_TYPES:
            raise _bad(f"{side}.type", h.get("type"), f"one of {list(HEAD_TYPES)}")
        if "hidden" in h:
            _check_int(f"{side}.hidden", h["hidden"], 1, MAX_DIM, optional=True)
        if "dropout" in h:
            _check_float(f"{side}.dropout", h["dropout"], 0.0, 1.0)
        if "bias" in h and not isinstance(h["bias"], bool):
            raise _bad(f"{side}.bias", h["bias"], "true or false")
