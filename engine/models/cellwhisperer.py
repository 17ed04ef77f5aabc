"""CellWhisperer's released CLIP model (Schaefer et al., seed 000 §3.2) from its PyTorch-Lightning checkpoint.

Clean-room loader written from the published description of the checkpoint (CellWhisperer is GPL; none of
its code is used). The ``.ckpt`` holds, under ``state_dict``:

* ``model.discriminator.img_block.*`` / ``model.discriminator.text_block.*``: the two CLIP-Lite
  ``MILinearBlock`` projection heads (512 -> 2,048 and 768 -> 2,048);
* ``model.discriminator.temperature``: the learned log logit scale (logits = cosine x ``exp``);
* ``model.text_model.*``: the fine-tuned BioBERT (pooler output is the text feature).

Geneformer (12L-30M, frozen during training) is not in the file and is read from its local folder; the
BioBERT config and tokenizer come from the local BioBERT folder. Cells are tokenized as CellWhisperer's
Geneformer processor does: duplicate gene columns stay separate tokens, and a cell without any expressed
dictionary gene gets the placeholder token 9743 (see :func:`load_cellwhisperer`'s ``empty_cell_token``).
``hyper_parameters`` holds pickled objects of the ``cellwhisperer`` package; they are read as inert stubs by
:mod:`engine.models.safe_pickle` and only summarised in the model's metadata. The ``state_dict`` is the
``OrderedDict`` that ``nn.Module.state_dict()`` returns, with its ``_metadata`` attribute, which the restricted
unpickler accepts (and nothing else of the kind).

Convert once with ``python -m engine.convert cellwhisperer CKPT --geneformer DIR --text-model DIR --out DIR``;
afterwards :func:`engine.load_model` reads the native folder without any unpickling.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ConfigError, ModelMismatchError
from .geneformer import CELLWHISPERER_EMPTY_CELL_TOKEN, GeneformerTokenizer, load_geneformer
from .model import TranscriptomeTextModel, default_device
from .safe_pickle import PickledObjectStub, load_checkpoint, to_plain
from .towers import TextTower

__all__ = ["load_cellwhisperer", "map_cellwhisperer_state", "CW_KEY_MAP"]

log = logging.getLogger(__name__)

#: Published key prefix -> Lexicell key prefix.
CW_KEY_MAP = {
    "model.discriminator.img_block.": "transcriptome_projection.",
    "model.discriminator.text_block.": "text_projection.",
    "model.text_model.": "text_tower.model.",
}
TEMPERATURE_KEY = "model.discriminator.temperature"
TRANSCRIPTOME_PREFIX = "model.transcriptome_model."
# deterministic buffers that older transformers versions stored and newer ones do not (or vice versa)
_BENIGN = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")


def map_cellwhisperer_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Rename a CellWhisperer ``state_dict`` to Lexicell's :class:`~engine.models.model.TranscriptomeTextModel` keys.

    Returns
    -------
    tuple
        ``(mapped, geneformer, unknown)``: tensors for the heads, ``logit_scale`` and the text tower;
        Geneformer encoder tensors if the checkpoint carries them (keys after ``bert.``); keys that match no
        known prefix.
    """
    mapped: dict[str, torch.Tensor] = {}
    geneformer: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            unknown.append(k)
            continue
        if k == TEMPERATURE_KEY:
            mapped["logit_scale"] = v.reshape(())
            continue
        if k.startswith(TRANSCRIPTOME_PREFIX):
            rest = k[len(TRANSCRIPTOME_PREFIX):]
            if ".bert." in f".{rest}":
                geneformer[rest.split("bert.", 1)[1]] = v
            continue  # Geneformer's MLM head, if stored, is not used for embeddings
        for src, dst in CW_KEY_MAP.items():
            if k.startswith(src):
                mapped[dst + k[len(src):]] = v
                break
        else:
            unknown.append(k)
    return mapped, geneformer, unknown


def _scalars(obj: Any, depth: int = 1) -> Any:
    """Small JSON summary of pickled hyper-parameters: scalar fields, one nested level."""
    plain = to_plain(obj, depth=depth + 1)
    if not isinstance(plain, dict):
        return plain if isinstance(plain, (str, int, float, bool)) or plain is None else str(plain)[:200]
    out = {}
    for k, v in plain.items():
        if k.startswith("_") and k != "__class__":
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v if not isinstance(v, str) else v[:200]
        elif isinstance(v, dict) and depth > 0:
            out[k] = {kk: vv for kk, vv in v.items() if (isinstance(vv, (str, int, float, bool)) or vv is None) and not kk.startswith("_")}
    return out


def _empty_cell_token(tower, requested: int | str | None) -> int | None:
    """Resolve ``load_cellwhisperer``'s ``empty_cell_token`` against the Geneformer model's vocabulary."""
    vocab = int(tower.bert.config.vocab_size)
    if requested is None:
        return None
    if requested == "auto":
        if CELLWHISPERER_EMPTY_CELL_TOKEN < vocab:
            return CELLWHISPERER_EMPTY_CELL_TOKEN
        fallback = int(tower.tokenizer.token_ids.max())
        log.warning(
            "the Geneformer vocabulary (%d tokens) has no token %d, CellWhisperer's empty-cell placeholder; "
            "using the highest gene token %d instead", vocab, CELLWHISPERER_EMPTY_CELL_TOKEN, fallback,
        )
        return fallback
    if isinstance(requested, bool) or not isinstance(requested, int) or not 0 <= requested < vocab:
        raise ConfigError(
            "The empty-cell token is not a token of the Geneformer model",
            found=repr(requested),
            expected=f"'auto', None or an id in [0, {vocab})",
        )
    return int(requested)


def _split_checkpoint(ckpt: Any, path: Path) -> tuple[dict, dict, dict]:
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), Mapping):
        info = {k: ckpt[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in ckpt}
        return dict(ckpt["state_dict"]), ckpt.get("hyper_parameters") or {}, info
    if isinstance(ckpt, Mapping) and any(str(k).startswith("model.discriminator.") for k in ckpt):
        return dict(ckpt), {}, {}
    raise CheckpointError(
        "The file is not a CellWhisperer checkpoint",
        found=f"{path}: {type(ckpt).__name__} with keys {list(ckpt)[:6] if isinstance(ckpt, Mapping) else 'n/a'}",
        expected="a PyTorch-Lightning checkpoint with a state_dict of 'model.discriminator.*' and 'model.text_model.*' tensors",
    )


def load_cellwhisperer(
    ckpt_path: str | os.PathLike,
    *,
    geneformer_dir: str | os.PathLike,
    text_model_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    geneformer_dictionaries: str | os.PathLike | Mapping | None = None,
    name: str | None = None,
    empty_cell_token: int | str | None = "auto",
) -> TranscriptomeTextModel:
    """Load CellWhisperer's CLIP model from its Lightning checkpoint and local tower folders.

    Parameters
    ----------
    ckpt_path
        ``cellwhisperer_clip_v1.ckpt``. Read with ``torch.load(weights_only=True)``; if torch refuses the
        pickled hyper-parameter objects, with :mod:`engine.models.safe_pickle` (stubs, allow-list; nothing runs).
    geneformer_dir
        Local Geneformer ``gf-12L-30M`` folder (``config.json`` + weights) with its gene dictionaries there
        or in the repository layout (see :func:`engine.models.geneformer.find_dictionaries`).
    text_model_dir
        Local BioBERT v1.1 folder (``config.json`` + tokenizer files); its weights are replaced by the
        fine-tuned ones in the checkpoint.
    device
        Torch device (default CUDA when available, else CPU).
    geneformer_dictionaries
        Folder or mapping of the Geneformer dictionaries when they are elsewhere.
    name
        Model name (default: the checkpoint's file stem).
    empty_cell_token
        The single token a cell without any expressed dictionary gene gets. ``"auto"`` (default): 9743, as
        CellWhisperer's processor, when the Geneformer vocabulary has that id (``gf-12L-30M``: 25,426 tokens);
        for a smaller vocabulary the highest gene token, with a warning. An int sets it; ``None`` leaves such
        cells empty (zero transcriptome features). Stored in the converted model's ``config.json``.

    Returns
    -------
    TranscriptomeTextModel
        Geneformer tower (``hidden_states[-2]`` mean) + BioBERT (pooler output) + ``mi_linear`` heads into
        the checkpoint's projection width (2,048), ``logit_scale`` = the checkpoint's ``temperature`` (a log);
        in ``eval()`` mode (BatchNorm running statistics). ``metadata["source"]`` describes towers, widths
        and source files (shown in the app's About pane).

    Raises
    ------
    CheckpointError
        Missing files; tensors missing from or unexpected in the checkpoint (listed); widths that do not
        match the tower folders.
    ConfigError
        If ``empty_cell_token`` is not a token id of the Geneformer model.
    UnsafeCheckpointError
        If a pickle holds anything outside the allow-list.
    """
    ckpt_path = Path(ckpt_path).expanduser()
    text_model_dir = Path(text_model_dir).expanduser()
    ckpt, method = load_checkpoint(ckpt_path)
    state, hparams, info = _split_checkpoint(ckpt, ckpt_path)
    mapped, gf_state, unknown = map_cellwhisperer_state(state)
    if unknown:
        raise CheckpointError(
            "The checkpoint holds tensors Lexicell does not know",
            found=f"{len(unknown)} unexpected keys: {unknown[:8]}",
            expected=f"keys starting with {sorted(CW_KEY_MAP)} or {TEMPERATURE_KEY!r}",
            fix="this is not a CellWhisperer CLIP (Geneformer + BioBERT) checkpoint, or a variant that needs its own loader",
        )
    for key in ("transcriptome_projection.feature_shortcut.weight", "text_projection.feature_shortcut.weight"):
        if key not in mapped:
            raise CheckpointError(
                "The checkpoint lacks a projection head",
                found=f"no {key.replace('transcriptome_projection.', 'model.discriminator.img_block.').replace('text_projection.', 'model.discriminator.text_block.')}",
                expected="model.discriminator.img_block.* and model.discriminator.text_block.* (MILinearBlock)",
            )
    proj_dim, t_in = mapped["transcriptome_projection.feature_shortcut.weight"].shape
    p2, x_in = mapped["text_projection.feature_shortcut.weight"].shape
    if p2 != proj_dim:
        raise CheckpointError("The two projection heads have different widths", found=f"{proj_dim} vs {p2}", expected="equal widths")

    tower = load_geneformer(geneformer_dir, dictionaries=geneformer_dictionaries)
    tower.tokenizer = GeneformerTokenizer.from_rank_tokenizer(
        tower.tokenizer, duplicates="separate", empty_cell_token_id=_empty_cell_token(tower, empty_cell_token)
    )
    if tower.hidden_size != t_in:
        raise ModelMismatchError(
            "The Geneformer folder does not match the checkpoint's transcriptome head",
            found=f"Geneformer hidden size {tower.hidden_size}, head input {t_in}",
            expected="Geneformer 12L-30M (hidden 512) for cellwhisperer_clip_v1",
        )
    if gf_state:
        from .geneformer import load_bert_weights

        load_bert_weights(tower, gf_state, source=f"{ckpt_path} (model.transcriptome_model.*)")
    has_text = any(k.startswith("text_tower.model.") for k in mapped)
    bert_max = 512
    try:
        import json

        bert_max = int(json.loads((text_model_dir / "config.json").read_text()).get("max_position_embeddings", 512))
    except (OSError, ValueError):
        pass  # TextTower reports a missing folder
    text = TextTower(text_model_dir, pooling="pooler", max_length=min(512, bert_max), load_weights=not has_text)
    if text.hidden_size != x_in:
        raise ModelMismatchError(
            "The text model folder does not match the checkpoint's text head",
            found=f"text hidden size {text.hidden_size}, head input {x_in}",
            expected="BioBERT v1.1 (hidden 768) for cellwhisperer_clip_v1",
        )
    temperature = float(mapped["logit_scale"]) if "logit_scale" in mapped else math.log(1 / 0.07)
    model = TranscriptomeTextModel(
        tower,
        text,
        projection_dim=int(proj_dim),
        transcriptome_head={"type": "mi_linear"},
        text_head={"type": "mi_linear"},
        logit_scale_init=temperature,
        name=name or ckpt_path.stem,
        text_weights="checkpoint" if has_text else "source",
    )
    own = model.state_dict()
    optional = {k for k in own if k.startswith("transcriptome_tower.")}
    if not has_text:
        optional |= {k for k in own if k.startswith("text_tower.")}
    missing = [k for k in own if k not in mapped and k not in optional and not _BENIGN.search(k)]
    unexpected = [k for k in mapped if k not in own and not _BENIGN.search(k)]
    bad = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if missing or unexpected or bad:
        back = {v: k for k, v in CW_KEY_MAP.items()}

        def orig(k: str) -> str:
            for dst, src in back.items():
                if k.startswith(dst):
                    return src + k[len(dst):]
            return TEMPERATURE_KEY if k == "logit_scale" else k

        raise CheckpointError(
            "The checkpoint's tensors do not fit CellWhisperer's architecture",
            found=f"{len(missing)} missing {[orig(k) for k in missing[:8]]}, {len(unexpected)} unexpected "
            f"{[orig(k) for k in unexpected[:8]]}, shape mismatches {bad[:4]}",
            expected="MILinearBlock heads, temperature and the BERT of the text model folder",
            fix="check that --text-model is BioBERT v1.1 (the checkpoint's text tower) and the file is complete",
        )
    model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    if "logit_scale" not in mapped:
        log.warning("%s has no temperature; using CLIP's initial log(1/0.07)", ckpt_path)

    mc = hparams.get("model_config") if isinstance(hparams, Mapping) else None
    cfg_proj = None
    if isinstance(mc, PickledObjectStub):
        cfg_proj = mc.__dict__.get("projection_dim")
    elif isinstance(mc, Mapping):
        cfg_proj = mc.get("projection_dim")
    if cfg_proj is not None and int(cfg_proj) != int(proj_dim):
        log.warning("model_config.projection_dim=%s but the heads are %d wide; using the tensors", cfg_proj, proj_dim)
    try:
        size = ckpt_path.stat().st_size
    except OSError:  # pragma: no cover
        size = None
    model.metadata["source"] = {
        "kind": "cellwhisperer",
        "summary": (
            f"CellWhisperer CLIP ({ckpt_path.name}): {tower.describe()} + BERT text tower "
            f"(hidden {text.hidden_size}, pooler output, fine-tuned weights from the checkpoint) -> "
            f"MILinearBlock heads -> {proj_dim}-d, logit scale {math.exp(temperature):.2f}"
        ),
        "checkpoint": {"path": str(ckpt_path.resolve()), "size_bytes": size, "read_with": method, **to_plain(info)},
        "transcriptome_tower": {
            "type": "geneformer",
            "description": tower.describe(),
            "hidden_size": tower.hidden_size,
            "weights": "checkpoint" if gf_state else "geneformer folder",
            "tokenization": tower.tokenizer.tokenization_config(),
            **(tower.source if isinstance(tower.source, dict) else {"folder": str(geneformer_dir)}),
        },
        "text_tower": {
            "folder": str(text_model_dir.resolve()),
            "hidden_size": text.hidden_size,
            "pooling": "pooler",
            "weights": "checkpoint (fine-tuned)" if has_text else "text model folder",
        },
        "projection": {"type": "mi_linear", "dim": int(proj_dim), "transcriptome_in": int(t_in), "text_in": int(x_in)},
        "logit_scale": math.exp(temperature),
        "hyper_parameters": {str(k): _scalars(v) for k, v in hparams.items()} if isinstance(hparams, Mapping) else {},
        "reference": "Schaefer et al., CellWhisperer (seed 000 §3.2); Theodoris et al. 2023 (Geneformer)",
    }
    model.eval()
    model.to(torch.device(device) if device is not None else default_device())
    model._source = str(ckpt_path)
    model.invalidate_caches()
    return model
