"""Geneformer as a transcriptome tower (Theodoris et al., *Nature* 2023, doi:10.1038/s41586-023-06139-9).

:func:`load_geneformer` reads a local Geneformer model folder (``config.json`` + ``pytorch_model.bin`` or
``model.safetensors``; V1 ``gf-12L-30M`` as used by CellWhisperer, or V2) and its gene dictionaries, and
returns a :class:`GeneformerTower` registered as tower type ``"geneformer"``, so it plugs into
:class:`~engine.models.model.TranscriptomeTextModel` and round-trips through the native checkpoint format
(weights under ``transcriptome_tower.*`` in ``model.safetensors``, the BERT config in ``config.json``).

Tokenization: :mod:`engine.models.geneformer_tokenizer`.

The cell embedding is CellWhisperer's and Geneformer's ``EmbExtractor`` default: the mean over the cell's
gene tokens of the hidden states of the second-to-last layer (``emb_layer=-1``, ``hidden_states[-2]``).
With V2 the ``<cls>``/``<eos>`` positions are excluded from the mean, as in ``EmbExtractor``;
``emb_mode="cls"`` takes the ``<cls>`` position instead.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from ..errors import CheckpointError, ConfigError, UnsafeCheckpointError
from .geneformer_tokenizer import (  # re-exported: the public Geneformer names live here too
    ALIASES_SUFFIX,
    CELLWHISPERER_EMPTY_CELL_TOKEN,
    DUPLICATE_MODES,
    MODEL_INPUT_SIZE,
    GeneformerTokenizer,
    build_geneformer_tokenizer,
    find_dictionaries,
)
from .registry import register_transcriptome_tower
from .tokenizer import RankTokenizer
from .towers import TranscriptomeTower

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BertConfig

__all__ = [
    "GeneformerTokenizer",
    "GeneformerTower",
    "load_geneformer",
    "find_dictionaries",
    "MODEL_INPUT_SIZE",
    "CELLWHISPERER_EMPTY_CELL_TOKEN",
    "DUPLICATE_MODES",
]

log = logging.getLogger(__name__)

_IGNORED_BERT_KEYS = re.compile(r"^(pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")


# --------------------------------------------------------------------------- tower
class _EarlyExit(Exception):
    """Raised by a forward hook to stop BERT after the layer whose output is the cell embedding."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _bert_config(config) -> "BertConfig":
    from transformers import BertConfig

    if isinstance(config, BertConfig):
        return config
    if not isinstance(config, Mapping):
        raise ConfigError("The Geneformer BERT config must be a dict", found=type(config).__name__, expected="a BertConfig dict")
    cfg = dict(config)
    if cfg.get("model_type", "bert") != "bert":
        raise CheckpointError(
            "The Geneformer folder is not a BERT model", found=f"model_type={cfg.get('model_type')!r}", expected="model_type='bert'"
        )
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    return BertConfig.from_dict(cfg)


@register_transcriptome_tower("geneformer")
class GeneformerTower(TranscriptomeTower):
    """Geneformer's BERT encoder as a transcriptome tower.

    Parameters
    ----------
    tokenizer
        The Geneformer vocabulary as a :class:`GeneformerTokenizer` (a plain ``RankTokenizer`` is wrapped).
    bert_config
        Geneformer's ``config.json`` as a dict or ``transformers.BertConfig``. Only the architecture is built
        here (random weights); :func:`load_geneformer` or a native checkpoint provides the weights.
    version
        ``"V1"`` (no special tokens, input 2,048) or ``"V2"`` (``<cls>``/``<eos>``, input 4,096).
    emb_layer
        Geneformer's ``emb_layer``: ``-1`` (default, CellWhisperer's choice) uses the second-to-last layer's
        hidden states, ``0`` the last layer.
    emb_mode
        ``"cell"`` (mean over gene tokens, excluding ``<cls>``/``<eos>``) or ``"cls"`` (the ``<cls>`` position;
        V2 only).
    max_tokens_per_batch
        Token budget of one forward pass (cells x padded length); larger batches are split. ``None``: 16,384
        on CPU, 65,536 on CUDA.
    source
        Where the weights came from (informational; written to ``config.json``).

    Notes
    -----
    ``forward`` takes ``(batch, length)`` token ids and attention mask (left-aligned, as
    :class:`~engine.models.tokenizer.RankEncoding` makes them) and returns ``(batch, hidden_size)`` float32
    ``transcriptome_features``. Cells without any gene token get a zero vector; a tokenizer with
    ``empty_cell_token_id`` (CellWhisperer's setting) never produces such cells. Only the BERT encoder is kept: Geneformer's masked-LM head is not used for
    embeddings and is dropped when loading.
    """

    requires_counts = True
    #: Cells per outer batch that :meth:`TranscriptomeTextModel.embed_encoding` should use (progress/cancel).
    max_batch_size = 64

    def __init__(
        self,
        tokenizer: RankTokenizer,
        bert_config,
        *,
        version: str = "V1",
        emb_layer: int = -1,
        emb_mode: str = "cell",
        max_tokens_per_batch: int | None = None,
        source: dict | str | None = None,
    ) -> None:
        super().__init__()
        from transformers import BertModel

        cfg = _bert_config(bert_config)
        self.tokenizer = GeneformerTokenizer.from_rank_tokenizer(tokenizer)
        self.version = str(version).upper()
        if self.version not in MODEL_INPUT_SIZE:
            raise ConfigError("Unknown Geneformer version", found=repr(version), expected="'V1' or 'V2'")
        emb_mode = {"mean": "cell", "mean_pool": "cell"}.get(emb_mode, emb_mode)
        if emb_mode not in ("cell", "cls"):
            raise ConfigError("Unknown Geneformer embedding mode", found=repr(emb_mode), expected="'cell' (mean) or 'cls'")
        if emb_mode == "cls" and self.tokenizer.cls_token_id is None:
            raise ConfigError(
                "emb_mode='cls' needs a <cls> token", found="a vocabulary without <cls> (Geneformer V1)", expected="Geneformer V2"
            )
        n_layers = int(cfg.num_hidden_layers)
        if not -n_layers <= int(emb_layer) <= 0:
            raise ConfigError("emb_layer out of range", found=emb_layer, expected=f"between {-n_layers} and 0")
        placeholder = self.tokenizer.empty_cell_token_id
        if placeholder is not None and placeholder >= int(cfg.vocab_size):
            raise ConfigError(
                "The empty-cell token is outside the Geneformer model's vocabulary",
                found=placeholder,
                expected=f"an id below vocab_size {cfg.vocab_size}",
            )
        if self.tokenizer.vocab_size > int(cfg.vocab_size):
            raise CheckpointError(
                "The token dictionary does not fit the Geneformer model",
                found=f"token ids up to {self.tokenizer.vocab_size - 1}",
                expected=f"ids below the model's vocab_size {cfg.vocab_size}",
                fix="use the dictionaries that belong to this model version (V1: *_gc30M or the old package files, V2: *_gc104M)",
            )
        if self.tokenizer.max_length > int(cfg.max_position_embeddings):
            raise ConfigError(
                "The tokenizer's max_length exceeds the model's positions",
                found=self.tokenizer.max_length,
                expected=f"<= {cfg.max_position_embeddings}",
            )
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.hidden_size = int(cfg.hidden_size)
        self.n_layers = n_layers
        self.emb_layer = int(emb_layer)
        self.emb_mode = emb_mode
        self.max_tokens_per_batch = None if max_tokens_per_batch is None else int(max_tokens_per_batch)
        self.source = source

    # ------------------------------------------------------------------ forward
    def _token_budget(self, device: torch.device) -> int:
        if self.max_tokens_per_batch:
            return self.max_tokens_per_batch
        return 65536 if device.type == "cuda" else 16384

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, length, hidden)`` hidden states of layer ``n_layers + emb_layer`` (Geneformer's indexing).

        BERT stops after that layer: the last layer is not computed when ``emb_layer=-1``.
        """
        target = self.n_layers + self.emb_layer
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
        if target == self.n_layers:
            return self.bert(**kwargs).last_hidden_state
        module = self.bert.embeddings if target == 0 else self.bert.encoder.layer[target - 1]

        def hook(_mod, _inp, out):
            raise _EarlyExit(out[0] if isinstance(out, tuple) else out)

        handle = module.register_forward_hook(hook)
        try:
            self.bert(**kwargs)
        except _EarlyExit as stop:
            return stop.hidden
        finally:
            handle.remove()
        raise RuntimeError("BERT finished without reaching the embedding layer")  # pragma: no cover

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed ``(batch, length)`` rank encodings into ``(batch, hidden_size)`` ``transcriptome_features``."""
        attention_mask = attention_mask.bool()
        n, width = input_ids.shape
        lengths = attention_mask.sum(1)
        has_cls = int(self.tokenizer.cls_token_id is not None)
        has_eos = int(self.tokenizer.eos_token_id is not None)
        n_pool = lengths - has_cls - has_eos if self.emb_mode == "cell" else lengths
        param = next(self.bert.parameters())
        out = torch.zeros(n, self.hidden_size, dtype=torch.float32, device=input_ids.device)
        todo = torch.nonzero(n_pool > 0).flatten()
        if todo.numel() == 0:
            return out
        todo = todo[torch.argsort(lengths[todo], descending=True, stable=True)]
        budget = self._token_budget(param.device)
        lens = lengths[todo].tolist()
        pooled = []
        i = 0
        while i < len(lens):
            w = max(int(lens[i]), 1)
            bs = max(1, budget // w)
            idx = todo[i : i + bs]
            ids = input_ids[idx, :w].to(param.device)
            mask = attention_mask[idx, :w].to(param.device)
            h = self.hidden_states(ids, mask)
            if self.emb_mode == "cls":
                pooled.append(h[:, 0].float())
            else:
                pos = torch.arange(w, device=h.device)[None, :]
                pm = (pos >= has_cls) & (pos < lengths[idx].to(h.device)[:, None] - has_eos)
                s = h.float().masked_fill(~pm[..., None], 0.0).sum(1)
                pooled.append(s / pm.sum(1, keepdim=True).clamp_min(1).float())
            i += bs
        out = out.index_copy(0, todo.to(out.device), torch.cat(pooled).to(out.device))
        return out

    # ------------------------------------------------------------------ persistence
    def bert_config_dict(self) -> dict:
        """The BERT architecture as a JSON-serialisable dict."""
        d = json.loads(self.bert.config.to_json_string(use_diff=False))
        for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            d.pop(k, None)
        return d

    def config(self) -> dict:
        """Settings for ``config.json`` (architecture, version, pooling; weights live in the safetensors)."""
        return {
            "type": self.tower_type,
            "version": self.version,
            "hidden_size": self.hidden_size,
            "emb_layer": self.emb_layer,
            "emb_mode": self.emb_mode,
            "max_tokens_per_batch": self.max_tokens_per_batch,
            "bert_config": self.bert_config_dict(),
            "source": self.source,
            "tokenizer": self.tokenizer.special_config(),
            "tokenization": self.tokenizer.tokenization_config(),
        }

    @classmethod
    def from_config(cls, config: dict, tokenizer: RankTokenizer, folder: Path | None = None) -> "GeneformerTower":
        """Rebuild the architecture (no weights) from :meth:`config` output and the folder's ``genes.tsv``."""
        if "bert_config" not in config:
            raise CheckpointError("The Geneformer tower config lacks its BERT config", found=sorted(config), expected="a 'bert_config' entry")
        aliases = None
        if folder is not None:
            from .configuration import GENES_FILE

            aliases = GeneformerTokenizer.read_aliases(Path(folder) / (Path(GENES_FILE).stem + ALIASES_SUFFIX))
        tok = GeneformerTokenizer.from_rank_tokenizer(tokenizer, aliases=aliases or {}, **dict(config.get("tokenization") or {}))
        return cls(
            tok,
            config["bert_config"],
            version=config.get("version", "V1"),
            emb_layer=int(config.get("emb_layer", -1)),
            emb_mode=config.get("emb_mode", "cell"),
            max_tokens_per_batch=config.get("max_tokens_per_batch"),
            source=config.get("source"),
        )

    def describe(self) -> str:
        """One line for the About pane, e.g. ``Geneformer V1, 12 layers x 512, 25,424 genes, layer -1 mean``."""
        return (
            f"Geneformer {self.version}, {self.n_layers} layers x {self.hidden_size}, "
            f"{len(self.tokenizer.gene_ids):,} genes, input {self.tokenizer.max_length:,} tokens, "
            f"emb_layer {self.emb_layer} {'mean' if self.emb_mode == 'cell' else 'cls'}"
        )


def _read_weights(folder: Path) -> tuple[dict, Path]:
    st = folder / "model.safetensors"
    binf = folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError("model.safetensors is corrupt", found=f"{st}: {err}", expected="a safetensors file") from err
    if binf.is_file():
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                "pytorch_model.bin holds more than tensors; it was not loaded and nothing was executed",
                found=str(err).splitlines()[0][:300],
                expected="a state dict of tensors (torch.save(model.state_dict()))",
                fix="use the model.safetensors version of the model, or re-save the state dict from a trusted source",
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError("pytorch_model.bin is corrupt", found=f"{binf}: {err}", expected="a torch state dict") from err
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError("pytorch_model.bin is not a state dict", found=type(state).__name__, expected="a dict of tensors")
        return state, binf
    raise CheckpointError(
        "The Geneformer folder has no weights",
        found=f"{folder} containing {sorted(p.name for p in folder.iterdir())[:10]}",
        expected="model.safetensors or pytorch_model.bin",
    )


def load_bert_weights(tower: GeneformerTower, state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Load a Geneformer / ``BertForMaskedLM`` state dict into ``tower.bert``.

    Keys may carry the ``bert.`` prefix of ``BertForMaskedLM``; MLM or classifier heads (``cls.*``,
    ``classifier.*``), the pooler and the ``position_ids`` buffer are ignored. Old ``LayerNorm.gamma/beta``
    names are accepted.

    Raises
    ------
    CheckpointError
        If encoder tensors are missing, unexpected or of the wrong shape.
    """
    prefixed = any(k.startswith("bert.") for k in state)
    mapped: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if prefixed:
            if not k.startswith("bert."):
                continue
            k = k[len("bert.") :]
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        mapped[k] = v
    own = tower.bert.state_dict()
    missing = [k for k in own if k not in mapped and not _IGNORED_BERT_KEYS.match(k)]
    unexpected = [k for k in mapped if k not in own and not _IGNORED_BERT_KEYS.match(k)]
    bad = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            "The Geneformer weights do not fit its config.json",
            found=f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, shape mismatches {bad[:3]} in {source}",
            expected="the tensors of a BERT encoder with this config",
        )
    tower.bert.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)


def load_geneformer(
    folder: str | os.PathLike,
    *,
    version: str | None = None,
    dictionaries: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    emb_layer: int = -1,
    emb_mode: str = "cell",
    device: str | torch.device | None = None,
    duplicates: str = "sum",
    empty_cell_token_id: int | None = None,
) -> GeneformerTower:
    """Load a local Geneformer model as a transcriptome tower.

    Parameters
    ----------
    folder
        Geneformer model folder: ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (read with
        ``torch.load(weights_only=True)``), e.g. ``Geneformer/gf-12L-30M-i2048`` (V1, CellWhisperer's tower) or
        ``Geneformer/Geneformer-V2-104M``.
    version
        ``None`` (detect: ``<cls>``/``<eos>`` in the token dictionary means V2), ``"V1"`` or ``"V2"``.
    dictionaries
        Folder or mapping of the gene dictionaries (see :func:`find_dictionaries`). The ``.pkl`` files are read
        only through :mod:`engine.models.safe_pickle`.
    emb_layer, emb_mode
        See :class:`GeneformerTower` (defaults: second-to-last layer, mean over gene tokens).
    device
        Torch device (default CPU).
    duplicates, empty_cell_token_id
        Tokenization of duplicate gene columns and of cells without any expressed vocabulary gene (see
        :class:`GeneformerTokenizer`; defaults: summed, no placeholder).

    Returns
    -------
    GeneformerTower
        In ``eval()`` mode. Input size: 2,048 (V1) or 4,096 (V2), capped at the model's
        ``max_position_embeddings``.

    Raises
    ------
    CheckpointError
        Missing or malformed files, weights that do not fit the config, dictionaries of another version.
    ConfigError
        Unknown ``version``/``emb_mode``/``duplicates``, or an ``empty_cell_token_id`` outside the vocabulary.
    UnsafeCheckpointError
        If a pickle (dictionary or ``pytorch_model.bin``) holds anything outside the allow-list.
    """
    folder = Path(folder).expanduser()
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            "The Geneformer folder has no config.json",
            found=str(folder),
            expected="a Geneformer model folder (config.json + pytorch_model.bin or model.safetensors)",
            fix="download it once (Hugging Face ctheodoris/Geneformer, e.g. gf-12L-30M-i2048) and pass the local folder",
        )
    try:
        cfg_dict = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError("The Geneformer config.json is not valid JSON", found=f"{cfg_file}: {err}") from err
    cfg = _bert_config(cfg_dict)
    if version is not None:
        version = str(version).upper()
        if version not in MODEL_INPUT_SIZE:
            raise ConfigError("Unknown Geneformer version", found=repr(version), expected="'V1' or 'V2'")
    paths = find_dictionaries(folder, version=version, dictionaries=dictionaries, vocab_size=int(cfg.vocab_size))
    tokenizer, detected = build_geneformer_tokenizer(paths, version=version, max_positions=int(cfg.max_position_embeddings))
    if duplicates != "sum" or empty_cell_token_id is not None:
        tokenizer = GeneformerTokenizer.from_rank_tokenizer(tokenizer, duplicates=duplicates, empty_cell_token_id=empty_cell_token_id)
    state, wfile = _read_weights(folder)
    source = {
        "folder": str(folder.resolve()),
        "weights": wfile.name,
        "dictionaries": {k: (str(v.resolve()) if v is not None else None) for k, v in paths.items()},
    }
    tower = GeneformerTower(tokenizer, cfg, version=detected, emb_layer=emb_layer, emb_mode=emb_mode, source=source)
    load_bert_weights(tower, state, source=str(wfile))
    tower.eval()
    if device is not None:
        tower.to(torch.device(device))
    log.info("loaded %s from %s", tower.describe(), folder)
    return tower
