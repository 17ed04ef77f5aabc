"""Lexicell's native checkpoint format: ``config.json`` + ``model.safetensors`` + ``genes.tsv``.

Nothing in a native checkpoint is pickled: tensors are safetensors, settings are
JSON, the gene vocabulary (Ensembl ID, symbol, token id, median) is a TSV. A text
tower whose weights come from an installed package or a local folder is stored by
reference (``text_tower.source``); a fine-tuned one (CellWhisperer's BioBERT) is
stored in full, with its Hugging Face config and tokenizer in ``text_model/``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..paths import ASSETS_DIR
from ..errors import CheckpointError
from .model import TranscriptomeTextModel, default_device
from .tokenizer import RankTokenizer
from .towers import TRANSCRIPTOME_TOWERS, TextTower, resolve_text_source

__all__ = ["load_model", "save_model", "default_model_path", "check_config", "check_hf_config", "ASSETS_DIR", "MAX_DIM"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "lexicell-default"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENES_FILE = "genes.tsv"
TEXT_DIR = "text_model"


def default_model_path() -> Path:
    """Folder of the bundled default model (``assets/models/lexicell-default``)."""
    return ASSETS_DIR / "models" / DEFAULT_MODEL_NAME


def _text_state_keys(model: TranscriptomeTextModel, state: dict) -> list[str]:
    keys = [k for k in state if k.startswith("text_tower.")]
    if model.text_weights == "checkpoint":
        return []
    keep = tuple(f"text_tower.model.{p}" for p in model.text_finetuned)
    return [k for k in keys if not (keep and k.startswith(keep))]


def save_model(model: TranscriptomeTextModel, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``model`` in the native format.

    Parameters
    ----------
    model
        The model to save.
    path
        Output folder (created; existing files of the format are replaced).
    metadata
        Extra JSON-serialisable information merged into ``config.json["metadata"]``.

    Returns
    -------
    pathlib.Path
        The folder written: ``config.json``, ``model.safetensors``, ``genes.tsv`` and, for a text tower stored
        in full, ``text_model/`` (Hugging Face config and tokenizer files).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if metadata:
        model.metadata.update(metadata)
    config = model.config_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k in _text_state_keys(model, state):
        state.pop(k)
    if model.text_weights == "checkpoint":
        text_dir = path / TEXT_DIR
        text_dir.mkdir(exist_ok=True)
        model.text_tower.model.config.save_pretrained(text_dir)
        model.text_tower.tokenizer.save_pretrained(text_dir)
        config["text_tower"]["source"] = TEXT_DIR
    save_weights(state, path / WEIGHTS_FILE, metadata={"format": "lexicell-clip"})
    model.tokenizer.save(path / GENES_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    log.info("saved model %s to %s (%d tensors)", model.name, path, len(state))
    return path


def save_weights(state: dict, file: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write tensors with safetensors, with the permissions of any other file the user writes.

    ``safetensors`` creates its files with mode 0600 whatever the umask, so a model trained by one lab member
    could not be served by another; here the mode becomes ``0666 & ~umask`` (0644 with the usual umask 022).

    Parameters
    ----------
    state
        Name -> contiguous CPU tensor.
    file
        Output ``.safetensors`` path.
    metadata
        String -> string header metadata.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    from safetensors.torch import save_file

    file = Path(file)
    save_file(state, str(file), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)
    return file


def _read_config(path: Path) -> dict:
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
        raise _bad("transcriptome_tower.type", ttype, f"a tower name such as {sorted(TRANSCRIPTOME_TOWERS)}")
    if ttype not in TRANSCRIPTOME_TOWERS:
        _import_optional_towers()
    if ttype not in TRANSCRIPTOME_TOWERS:
        raise _bad("transcriptome_tower.type", ttype, f"one of {sorted(TRANSCRIPTOME_TOWERS)}")
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


def build_model(config: dict, folder: Path | None = None, *, load_text_weights: bool | None = None) -> TranscriptomeTextModel:
    """Build the architecture described by a native ``config.json`` (weights not loaded).

    Raises
    ------
    CheckpointError
        Invalid types or sizes in ``config`` (:func:`check_config`, checked before anything is allocated),
        unknown tower types, a missing gene vocabulary.
    """
    check_config(config)
    tcfg = config["transcriptome_tower"]
    ttype = tcfg.get("type")
    if ttype not in TRANSCRIPTOME_TOWERS:
        _import_optional_towers()
    if ttype not in TRANSCRIPTOME_TOWERS:
        raise CheckpointError(
            "Unknown transcriptome tower type", found=repr(ttype), expected=f"one of {sorted(TRANSCRIPTOME_TOWERS)}"
        )
    genes = (folder / GENES_FILE) if folder is not None else None
    if genes is None or not genes.is_file():
        raise CheckpointError("The model folder lacks its gene vocabulary", found=f"no {GENES_FILE} in {folder}", expected=GENES_FILE)
    tokenizer = RankTokenizer.load(genes, **(tcfg.get("tokenizer") or {}))
    if tokenizer.vocab_size > MAX_VOCAB:
        raise CheckpointError("The gene vocabulary asks for too many embedding rows",
                              found=f"largest token_id {tokenizer.vocab_size - 1:,} in {genes}",
                              expected=f"token ids below {MAX_VOCAB:,}", fix="check genes.tsv (token_id column)")
    ttower = TRANSCRIPTOME_TOWERS[ttype].from_config(tcfg, tokenizer, folder)
    xcfg = config["text_tower"]
    if xcfg.get("type", "hf") != "hf":
        raise CheckpointError("Unknown text tower type", found=repr(xcfg.get("type")), expected="'hf'")
    weights = xcfg.get("weights", "source")
    text_path = resolve_text_source(str(xcfg["source"]), folder)
    if load_text_weights is None:
        load_text_weights = weights != "checkpoint"
    text = TextTower(
        text_path,
        pooling=xcfg.get("pooling"),
        max_length=int(xcfg.get("max_length", 128)),
        load_weights=load_text_weights,
        source=str(xcfg["source"]),
    )
    return TranscriptomeTextModel(
        ttower,
        text,
        projection_dim=int(config["projection_dim"]),
        transcriptome_head=config.get("transcriptome_projection"),
        text_head=config.get("text_projection"),
        name=str(config.get("name", "lexicell")),
        text_weights=weights,
        text_finetuned=xcfg.get("finetuned", []),
        metadata=config.get("metadata", {}),
    )


def _import_optional_towers() -> None:
    """Import modules that register extra tower types (Geneformer)."""
    try:
        from . import geneformer  # noqa: F401
    except ImportError:  # pragma: no cover - optional module
        pass


def load_model(
    path_or_name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
) -> TranscriptomeTextModel:
    """Load a transcriptome-text model.

    Parameters
    ----------
    path_or_name
        ``None`` or ``"default"``: the bundled default model in ``assets/``. A folder in the native format
        (``config.json`` + ``model.safetensors`` + ``genes.tsv``).
    device
        Torch device; default CUDA when available, else CPU.

    Returns
    -------
    TranscriptomeTextModel
        In ``eval()`` mode (BatchNorm heads use their running statistics).

    Raises
    ------
    CheckpointError
        Missing, corrupt or foreign files; values of the wrong type or size in ``config.json`` (named, before
        any tensor is allocated; every width at most :data:`MAX_DIM`); tensors missing, unexpected or of the
        wrong shape.
    UnsafeCheckpointError
        A pickled text-model weight file that tries to load something outside torch's safe types.
    """
    if path_or_name is None or str(path_or_name) == "default":
        path = default_model_path()
        if not path.is_dir():
            raise CheckpointError(
                "The bundled default model is missing",
                found=f"no folder {path}",
                expected="assets/models/lexicell-default (shipped with the repository)",
                fix="reinstall Lexicell from a full checkout, or train it: python -m engine.train --config assets/train_default.json",
            )
    else:
        path = Path(path_or_name).expanduser()
        if not path.exists() and (ASSETS_DIR / "models" / str(path_or_name)).is_dir():
            path = ASSETS_DIR / "models" / str(path_or_name)
        if not path.exists():
            raise CheckpointError("The model path does not exist", found=str(path), expected="a model folder or 'default'")
        if path.is_file():
            raise CheckpointError(
                "A single checkpoint file cannot be loaded directly",
                found=str(path),
                expected="a Lexicell model folder",
                fix="convert it first: python -m engine.convert cellwhisperer CKPT --geneformer DIR --text-model DIR --out DIR",
            )
    config = _read_config(path)
    model = build_model(config, path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError("The model folder lacks its weights", found=f"no {WEIGHTS_FILE} in {path}", expected=WEIGHTS_FILE)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError("model.safetensors is corrupt", found=f"{weights}: {err}", expected="a safetensors file") from err
    load_state(model, state, source=str(weights))
    model.eval()
    model.to(torch.device(device) if device is not None else default_device())
    model._source = str(path)
    return model


def load_state(model: TranscriptomeTextModel, state: dict, *, source: str = "state dict") -> None:
    """Load tensors into ``model``, allowing only the text-tower keys that are stored by reference to be absent.

    Raises
    ------
    CheckpointError
        If tensors are missing, unexpected, or have the wrong shape.
    """
    own = model.state_dict()
    optional = set(_text_state_keys(model, own))
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            "The weights do not fit the architecture in config.json",
            found=f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"shape mismatches {bad_shape[:3]} in {source}",
            expected="exactly the tensors of the configured model",
        )
    model.load_state_dict(state, strict=False)
    model.invalidate_caches()
