"""Geneformer as a transcriptome tower (Theodoris et al., *Nature* 2023, doi:10.1038/s41586-023-06139-9).

:func:`load_geneformer` reads a local Geneformer model folder (``config.json`` + ``pytorch_model.bin`` or
``model.safetensors``; V1 ``gf-12L-30M`` as used by CellWhisperer, or V2) and its gene dictionaries, and
returns a :class:`GeneformerTower` registered as tower type ``"geneformer"``, so it plugs into
:class:`~engine.models.model.TranscriptomeTextModel` and round-trips through the native checkpoint format
(weights under ``transcriptome_tower.*`` in ``model.safetensors``, the BERT config in ``config.json``).

Tokenization follows Geneformer's ``TranscriptomeTokenizer``:

1. genes are mapped to Ensembl IDs (version suffix dropped, upper-cased) through ``ensembl_mapping_dict``
   (V2) and symbols through ``gene_name_id_dict``; columns that map to the same ID are summed (the current
   ``TranscriptomeTokenizer``'s ``collapse_gene_ids``; ``duplicates="sum"``, the default) or stay separate
   tokens, so the gene can appear twice (Geneformer's original V1 tokenizer, which CellWhisperer uses;
   ``duplicates="separate"``);
2. only genes in both the token and the median dictionary are kept;
3. counts / total counts x 10,000 / the gene's non-zero median in the pretraining corpus;
4. the non-zero genes are ranked by that value, highest first;
5. V1: truncated to 2,048 tokens, no special tokens. V2: truncated to 4,094 genes, ``<cls>`` prepended and
   ``<eos>`` appended (4,096 in all).

A cell with no expressed vocabulary gene has no gene token. By default it stays empty and the tower gives it a
zero vector; with ``empty_cell_token_id`` it gets that one token instead (CellWhisperer's processor inserts
token 9743 of the ``gf-12L-30M`` dictionary, an arbitrary gene, so that Geneformer never sees an empty input;
:data:`CELLWHISPERER_EMPTY_CELL_TOKEN`).

Steps 3-4 are what :class:`~engine.models.tokenizer.RankTokenizer` computes: the per-cell factor
``10,000 / total counts`` does not change the order of a cell's genes, so it is not applied. It could only
matter for exact ties, which Geneformer leaves to ``np.argsort``'s unspecified order and Lexicell breaks
deterministically (data gene order). Raw counts are still required (``requires_counts``): the medians refer
to normalised counts, and log or scaled values would rank differently.

The cell embedding is CellWhisperer's and Geneformer's ``EmbExtractor`` default: the mean over the cell's
gene tokens of the hidden states of the second-to-last layer (``emb_layer=-1``, ``hidden_states[-2]``).
With V2 the ``<cls>``/``<eos>`` positions are excluded from the mean, as in ``EmbExtractor``;
``emb_mode="cls"`` takes the ``<cls>`` position instead.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import CheckpointError, ConfigError, UnsafeCheckpointError
from .safe_pickle import load_pickle
from .tokenizer import RankTokenizer
from .registry import register_transcriptome_tower
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

#: Geneformer's input size per model version (special tokens included).
MODEL_INPUT_SIZE = {"V1": 2048, "V2": 4096}
ALIASES_SUFFIX = ".aliases.tsv"
#: The token CellWhisperer's Geneformer processor gives a cell without any expressed dictionary gene (an id of
#: the ``gf-12L-30M`` token dictionary, chosen arbitrarily by its authors).
CELLWHISPERER_EMPTY_CELL_TOKEN = 9743
#: How columns that map to the same gene are encoded: summed into one token, or kept as separate tokens.
DUPLICATE_MODES = ("sum", "separate")
DICTIONARY_PATTERNS = {
    "token": "token_dictionary*.pkl",
    "median": "gene_median_dictionary*.pkl",
    "gene_name": "gene_name_id_dict*.pkl",
    "ensembl_mapping": "ensembl_mapping_dict*.pkl",
}
_IGNORED_BERT_KEYS = re.compile(r"^(pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")


def _norm_key(g: str) -> str:
    g = str(g).strip().upper()
    return g.split(".")[0] if g.startswith("ENS") else g


# --------------------------------------------------------------------------- tokenizer
class GeneformerTokenizer(RankTokenizer):
    """A :class:`~engine.models.tokenizer.RankTokenizer` with Geneformer's gene-name tables.

    Parameters
    ----------
    *args, **kwargs
        As :class:`~engine.models.tokenizer.RankTokenizer`.
    aliases
        ``{alias: ensembl_id}``: extra symbols (``gene_name_id_dict``) and alternative Ensembl IDs
        (``ensembl_mapping_dict``) that map onto vocabulary genes. Keys are matched case-insensitively, Ensembl
        versions ignored; an alias is applied before the direct look-up, as Geneformer maps IDs first.
    duplicates
        ``"sum"`` (default): data columns that map to the same gene are summed into one token, as the current
        Geneformer ``TranscriptomeTokenizer`` (``collapse_gene_ids``). ``"separate"``: each column is ranked on
        its own, so a gene can appear twice, as Geneformer's original V1 tokenizer and CellWhisperer's processor.
    empty_cell_token_id
        ``None`` (default): a cell without any expressed vocabulary gene gets no gene token (the tower returns a
        zero vector for it). An int: such a cell gets this one token (between ``<cls>`` and ``<eos>`` for V2);
        CellWhisperer uses :data:`CELLWHISPERER_EMPTY_CELL_TOKEN` (9743).

    Raises
    ------
    ConfigError
        If ``duplicates`` is not one of :data:`DUPLICATE_MODES` or ``empty_cell_token_id`` is negative, not an
        integer, or a special token.

    Notes
    -----
    :meth:`save` writes the aliases next to the vocabulary (``genes.tsv`` -> ``genes.aliases.tsv``);
    ``duplicates`` and ``empty_cell_token_id`` are part of the tower's ``config.json`` entry
    (:meth:`tokenization_config`).
    """

    def __init__(
        self,
        *args,
        aliases: Mapping[str, str] | None = None,
        duplicates: str = "sum",
        empty_cell_token_id: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        known = set(self.gene_ids.tolist())
        self.aliases = {_norm_key(k): str(v) for k, v in (aliases or {}).items() if str(v) in known and _norm_key(k) != str(v)}
        if duplicates not in DUPLICATE_MODES:
            raise ConfigError("Unknown handling of duplicate gene columns", found=repr(duplicates), expected=f"one of {DUPLICATE_MODES}")
        self.duplicates = duplicates
        if empty_cell_token_id is not None:
            specials = {t for t in (self.pad_token_id, self.cls_token_id, self.eos_token_id) if t is not None}
            if isinstance(empty_cell_token_id, bool) or not isinstance(empty_cell_token_id, (int, np.integer)) or int(empty_cell_token_id) < 0:
                raise ConfigError(
                    "The empty-cell token must be a token id", found=repr(empty_cell_token_id), expected="a non-negative integer or None"
                )
            if int(empty_cell_token_id) in specials:
                raise ConfigError(
                    "The empty-cell token cannot be a special token",
                    found=int(empty_cell_token_id),
                    expected=f"a gene token id (not <pad>/<cls>/<eos>: {sorted(specials)})",
                )
            if self.max_length < self.n_special + 1:
                raise ConfigError("max_length leaves no room for the empty-cell token", found=self.max_length, expected=f">= {self.n_special + 1}")
        self.empty_cell_token_id = None if empty_cell_token_id is None else int(empty_cell_token_id)

    def tokenization_config(self) -> dict:
        """``{"duplicates": ..., "empty_cell_token_id": ...}`` for ``config.json``."""
        return {"duplicates": self.duplicates, "empty_cell_token_id": self.empty_cell_token_id}

    @classmethod
    def from_rank_tokenizer(
        cls, tok: RankTokenizer, aliases: Mapping[str, str] | None = None, **tokenization
    ) -> "GeneformerTokenizer":
        """Wrap a plain :class:`RankTokenizer` (e.g. read from ``genes.tsv``), or copy a GeneformerTokenizer.

        ``tokenization`` (``duplicates``, ``empty_cell_token_id``) overrides the source's settings; without
        overrides a GeneformerTokenizer is returned unchanged.
        """
        if isinstance(tok, GeneformerTokenizer) and aliases is None and not tokenization:
            return tok
        settings = tok.tokenization_config() if isinstance(tok, GeneformerTokenizer) else {}
        settings.update(tokenization)
        return cls(
            tok.gene_ids.tolist(),
            tok.token_ids,
            tok.gene_medians,
            symbols=None if tok.symbols is None else tok.symbols.tolist(),
            aliases=aliases if aliases is not None else getattr(tok, "aliases", None),
            **settings,
            **tok.special_config(),
        )

    def _collapse_duplicates(self, X, col_token):  # overrides RankTokenizer's staticmethod
        if self.duplicates == "separate":
            return col_token, X
        return RankTokenizer._collapse_duplicates(X, col_token)

    def encode_matrix(self, X, var, *, progress: bool = False):
        """Encode a cells x genes matrix (see :meth:`RankTokenizer.encode_matrix`).

        With ``duplicates="separate"`` a gene measured in two columns gives two tokens; with
        ``empty_cell_token_id`` a cell without any expressed vocabulary gene gets that token (its length counts
        it). Raises as :meth:`RankTokenizer.encode_matrix`.
        """
        enc = super().encode_matrix(X, var, progress=progress)
        if self.empty_cell_token_id is not None:
            rows = np.flatnonzero(enc.lengths <= self.n_special)
            if rows.size:
                pos = int(self.cls_token_id is not None)
                enc.input_ids[rows, pos] = self.empty_cell_token_id
                if self.eos_token_id is not None:
                    enc.input_ids[rows, pos + 1] = self.eos_token_id
                enc.lengths[rows] += 1
                log.info("%d cell(s) without an expressed vocabulary gene get the placeholder token %d", rows.size, self.empty_cell_token_id)
        return enc

    def gene_to_token(self, genes: Sequence[str]) -> np.ndarray:
        """Token id of each gene (Ensembl ID, alias or symbol); -1 where unknown."""
        genes = [str(g) for g in genes]
        if self.aliases:
            genes = [self.aliases.get(_norm_key(g), g) for g in genes]
        genes = [g.strip().upper() if g.strip().upper().startswith("ENS") else g for g in genes]
        return super().gene_to_token(genes)

    def save(self, path) -> None:
        """Write the vocabulary TSV and, if there are aliases, ``<stem>.aliases.tsv`` beside it."""
        super().save(path)
        if self.aliases:
            path = Path(path)
            pd.DataFrame({"alias": list(self.aliases), "ensembl_id": list(self.aliases.values())}).to_csv(
                path.with_name(path.stem + ALIASES_SUFFIX), sep="\t", index=False
            )

    @staticmethod
    def read_aliases(path) -> dict[str, str]:
        """Read an aliases TSV written by :meth:`save` (empty dict if absent)."""
        path = Path(path)
        if not path.is_file():
            return {}
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        return dict(zip(df["alias"], df["ensembl_id"]))


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


# --------------------------------------------------------------------------- loading
def _read_dict(path: Path, what: str) -> dict:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"The Geneformer {what} is not a dict", found=f"{path}: {type(obj).__name__}", expected="a pickled dict")
    return obj


def _suffix(path: Path, kind: str) -> str:
    base = DICTIONARY_PATTERNS[kind].split("*")[0]
    return path.stem[len(base):]


def _search_dirs(folder: Path, dictionaries) -> list[Path]:
    if dictionaries is not None:
        dirs = [Path(dictionaries)]
    else:
        dirs = [folder, folder / "geneformer", folder.parent, folder.parent / "geneformer"]
        dirs += [d / "gene_dictionaries_30m" for d in list(dirs)]
    out: list[Path] = []
    for d in dirs:
        d = d.expanduser()
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_dictionaries(
    folder: str | os.PathLike,
    *,
    version: str | None = None,
    dictionaries: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    vocab_size: int | None = None,
) -> dict[str, Path | None]:
    """Locate Geneformer's gene dictionaries for a model folder.

    Parameters
    ----------
    folder
        The model folder (``config.json`` + weights).
    version
        ``"V1"``/``"V2"`` to choose among several token dictionaries; ``None`` decides by content (``<cls>``
        present means V2) and by the model's ``vocab_size``.
    dictionaries
        A folder holding the ``.pkl`` files, or a mapping with keys ``token``, ``median``, ``gene_name``,
        ``ensembl_mapping`` (the last two optional). Default: the model folder, ``geneformer/`` and
        ``gene_dictionaries_30m/`` next to it or its parent (the layout of the Geneformer repository).
    vocab_size
        The model's vocabulary size (prefers the token dictionary of exactly that size).

    Returns
    -------
    dict
        ``{"token": Path, "median": Path, "gene_name": Path | None, "ensembl_mapping": Path | None}``.

    Raises
    ------
    CheckpointError
        If no token or median dictionary is found.
    """
    folder = Path(folder)
    if isinstance(dictionaries, Mapping):
        found = {k: (Path(dictionaries[k]) if dictionaries.get(k) else None) for k in DICTIONARY_PATTERNS}
        for k in ("token", "median"):
            if found[k] is None or not found[k].is_file():
                raise CheckpointError(f"The Geneformer {k} dictionary is missing", found=str(found[k]), expected=f"a {DICTIONARY_PATTERNS[k]} file")
        return found
    dirs = _search_dirs(folder, dictionaries)
    cands = [p for d in dirs for p in sorted(d.glob(DICTIONARY_PATTERNS["token"]))]
    if not cands:
        raise CheckpointError(
            "No Geneformer token dictionary found",
            found=f"no token_dictionary*.pkl in {[str(d) for d in dirs]}",
            expected="token_dictionary*.pkl and gene_median_dictionary*.pkl (from the Geneformer repository's geneformer/ folder)",
            fix="copy the dictionaries into the model folder or pass dictionaries=<folder> / --dictionaries",
        )
    scored = []
    for rank, p in enumerate(cands):
        try:
            d = _read_dict(p, "token dictionary")
        except UnsafeCheckpointError:
            raise
        except CheckpointError:
            continue
        v = "V2" if ("<cls>" in d and "<eos>" in d) else "V1"
        if version is not None and v != version:
            continue
        ids = [x for x in d.values() if isinstance(x, (int, np.integer))]
        fits = vocab_size is None or (ids and max(ids) < vocab_size)
        exact = vocab_size is not None and len(d) == vocab_size
        scored.append((not fits, not exact, rank, p))
    if not scored:
        raise CheckpointError(
            "No Geneformer token dictionary matches the requested version",
            found=f"{[p.name for p in cands]} for version {version}",
            expected="a token dictionary with <cls>/<eos> for V2, without for V1",
        )
    token = sorted(scored)[0][3]
    suffix = _suffix(token, "token")
    found: dict[str, Path | None] = {"token": token}
    for kind in ("median", "gene_name", "ensembl_mapping"):
        ps = [p for d in [token.parent, *dirs] for p in sorted(d.glob(DICTIONARY_PATTERNS[kind]))]
        same = [p for p in ps if _suffix(p, kind) == suffix]
        pick = same[0] if same else None
        if pick is None:
            local = [p for p in ps if p.parent == token.parent]
            pick = local[0] if len(local) == 1 else None
        found[kind] = pick
    if found["median"] is None:
        raise CheckpointError(
            "No Geneformer gene median dictionary found",
            found=f"token dictionary {token}, no matching gene_median_dictionary*.pkl",
            expected=f"gene_median_dictionary{suffix}.pkl next to it",
            fix="copy it from the Geneformer repository or pass dictionaries=",
        )
    return found


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


def build_geneformer_tokenizer(
    paths: Mapping[str, Path | None], *, version: str | None = None, max_positions: int | None = None
) -> tuple[GeneformerTokenizer, str]:
    """Build the tokenizer from Geneformer's dictionaries (see :func:`find_dictionaries`).

    ``max_length`` is Geneformer's input size for the detected version (2,048 or 4,096), capped at
    ``max_positions`` (the model's ``max_position_embeddings``) when given.

    Returns
    -------
    tuple
        ``(tokenizer, version)``; the version is detected from the token dictionary (``<cls>`` and ``<eos>``
        present: V2).

    Raises
    ------
    CheckpointError
        If the dictionaries are malformed or contradict ``version``.
    """
    tokens = _read_dict(paths["token"], "token dictionary")
    medians = _read_dict(paths["median"], "gene median dictionary")
    detected = "V2" if ("<cls>" in tokens and "<eos>" in tokens) else "V1"
    if version is not None and str(version).upper() != detected:
        raise CheckpointError(
            "The token dictionary does not belong to the requested Geneformer version",
            found=f"{paths['token'].name} looks like {detected}",
            expected=f"a {version} dictionary",
            fix="pass the matching dictionaries or leave version=None to detect it",
        )
    genes, token_ids, meds, bad = [], [], [], []
    for g, t in tokens.items():
        if not isinstance(g, str) or (g.startswith("<") and g.endswith(">")):
            continue
        if g not in medians:
            continue
        try:
            m = float(medians[g])
            t = int(t)
        except (TypeError, ValueError):
            bad.append(g)
            continue
        if not (math.isfinite(m) and m > 0):
            bad.append(g)
            continue
        genes.append(_norm_key(g))
        token_ids.append(t)
        meds.append(m)
    if bad:
        raise CheckpointError(
            "The Geneformer dictionaries hold invalid entries", found=f"{len(bad)} genes such as {bad[:3]}", expected="int tokens and positive medians"
        )
    if not genes:
        raise CheckpointError(
            "The token and median dictionaries share no gene",
            found=f"{paths['token'].name}, {paths['median'].name}",
            expected="dictionaries of the same Geneformer version",
        )
    in_vocab = set(genes)
    # symbols: one per gene (first in the table), the others become aliases; unique upper-case symbols
    symbols: dict[str, str] = {}
    aliases: dict[str, str] = {}
    used: set[str] = set()
    if paths.get("gene_name") is not None:
        for sym, eid in _read_dict(paths["gene_name"], "gene name dictionary").items():
            if not isinstance(sym, str) or not isinstance(eid, str):
                continue
            eid = _norm_key(eid)
            if eid not in in_vocab:
                continue
            if eid not in symbols and sym.upper() not in used:
                symbols[eid] = sym
                used.add(sym.upper())
            else:
                aliases[sym] = eid
    if paths.get("ensembl_mapping") is not None:
        for src, dst in _read_dict(paths["ensembl_mapping"], "Ensembl mapping dictionary").items():
            if isinstance(src, str) and isinstance(dst, str) and _norm_key(dst) in in_vocab and _norm_key(src) != _norm_key(dst):
                aliases[src] = _norm_key(dst)
    sym_list = []
    for g in genes:  # genes without a symbol get their ID, so symbols stay unique
        s = symbols.get(g)
        sym_list.append(s if s else g)
    specials = {
        "pad_token_id": int(tokens.get("<pad>", 0)),
        "mask_token_id": int(tokens["<mask>"]) if "<mask>" in tokens else None,
        "cls_token_id": int(tokens["<cls>"]) if detected == "V2" else None,
        "eos_token_id": int(tokens["<eos>"]) if detected == "V2" else None,
    }
    length = MODEL_INPUT_SIZE[detected] if max_positions is None else min(MODEL_INPUT_SIZE[detected], int(max_positions))
    tok = GeneformerTokenizer(genes, token_ids, meds, symbols=sym_list, aliases=aliases, max_length=length, **specials)
    return tok, detected


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
