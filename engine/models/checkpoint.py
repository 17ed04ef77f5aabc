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
from .configuration import (
    CONFIG_FILE,
    DEFAULT_MODEL_NAME,
    GENES_FILE,
    HF_LIMITS,
    MAX_DIM,
    MAX_VOCAB,
    TEXT_DIR,
    WEIGHTS_FILE,
    check_config,
    check_hf_config,
    read_config,
)
from .registry import get_transcriptome_tower, tower_names
from .towers import TextTower, resolve_text_source

__all__ = ["load_model", "save_model", "default_model_path", "check_config", "check_hf_config", "read_config", "ASSETS_DIR",
           "MAX_DIM", "MAX_VOCAB", "HF_LIMITS"]

log = logging.getLogger(__name__)



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
    tower_cls = get_transcriptome_tower(ttype)
    if tower_cls is None:
        raise CheckpointError(
            "Unknown transcriptome tower type", found=repr(ttype), expected=f"one of {tower_names()}"
        )
    genes = (folder / GENES_FILE) if folder is not None else None
    if genes is None or not genes.is_file():
        raise CheckpointError("The model folder lacks its gene vocabulary", found=f"no {GENES_FILE} in {folder}", expected=GENES_FILE)
    tokenizer = RankTokenizer.load(genes, **(tcfg.get("tokenizer") or {}))
    if tokenizer.vocab_size > MAX_VOCAB:
        raise CheckpointError("The gene vocabulary asks for too many embedding rows",
                              found=f"largest token_id {tokenizer.vocab_size - 1:,} in {genes}",
                              expected=f"token ids below {MAX_VOCAB:,}", fix="check genes.tsv (token_id column)")
    ttower = tower_cls.from_config(tcfg, tokenizer, folder)
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
    """Import every lazily registered tower type (kept for callers that read ``TRANSCRIPTOME_TOWERS`` directly)."""
    for name in tower_names():
        get_transcriptome_tower(name)


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
    config = read_config(path)
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
