"""The two-tower transcriptome-text CLIP model (CellWhisperer, seed 000 §3.2).

``transcriptome_features`` (tower output) and ``text_features`` are projected into a
shared space, L2-normalised into ``transcriptome_embeds`` / ``text_embeds``, and
compared by cosine similarity times ``logit_scale.exp()`` (Radford et al. 2021).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QueryError
from .heads import build_head
from .towers import TextTower, TranscriptomeTower

__all__ = ["TranscriptomeTextModel", "default_device", "resolve_device"]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """Turn a ``--device`` choice into a torch device.

    Parameters
    ----------
    device
        ``"auto"`` or ``None``: CUDA when ``torch.cuda.is_available()``, else CPU; ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or a :class:`torch.device`: that device.

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        CUDA was asked for but is not available, or the name is not a torch device.
    """
    from ..errors import ConfigError

    if device is None or str(device) == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError("Unknown device", found=repr(device), expected="'auto', 'cpu' or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "CUDA was requested but is not available", found=str(device), expected="'cpu' or 'auto' on this machine",
            fix="pass --device auto (or cpu)",
        )
    return dev


class TranscriptomeTextModel(nn.Module):
    """Transcriptome tower + text tower + projection heads + learned ``logit_scale``.

    Parameters
    ----------
    transcriptome_tower
        Any registered :class:`~engine.models.towers.TranscriptomeTower`.
    text_tower
        A :class:`~engine.models.towers.TextTower`.
    projection_dim
        Width of the shared space (``embed_dim``).
    transcriptome_head, text_head
        Head configs for :func:`engine.models.heads.build_head`.
    logit_scale_init
        Initial *log* of the logit scale; CLIP's default is ``log(1/0.07)``.
    name
        Human-readable model name (shown in the app's About pane).
    text_weights
        ``"source"``: text tower weights come from its source folder and are not stored in checkpoints
        (except parameters listed in ``text_finetuned``); ``"checkpoint"``: stored in full.
    """

    def __init__(
        self,
        transcriptome_tower: TranscriptomeTower,
        text_tower: TextTower,
        *,
        projection_dim: int = 256,
        transcriptome_head: dict | None = None,
        text_head: dict | None = None,
        logit_scale_init: float = math.log(1 / 0.07),
        name: str = "lexicell",
        text_weights: str = "source",
        text_finetuned: Sequence[str] = (),
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        self.transcriptome_tower = transcriptome_tower
        self.text_tower = text_tower
        self.projection_dim = int(projection_dim)
        self.transcriptome_head_config = dict(transcriptome_head or {"type": "linear"})
        self.text_head_config = dict(text_head or {"type": "linear"})
        self.transcriptome_projection = build_head(
            self.transcriptome_head_config, transcriptome_tower.hidden_size, self.projection_dim
        )
        self.text_projection = build_head(self.text_head_config, text_tower.hidden_size, self.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.name = name
        self.text_weights = text_weights
        self.text_finetuned = list(text_finetuned)
        self.metadata = dict(metadata or {})
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        """The transcriptome tower's :class:`~engine.models.tokenizer.RankTokenizer`."""
        return self.transcriptome_tower.tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.logit_scale.device

    def fingerprint(self) -> str:
        """Content hash of config and weights (hex sha256, first 16 chars); keys embedding caches."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(repr(sorted(self.config_dict().items())).encode())
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def invalidate_caches(self) -> None:
        """Forget cached text embeddings and the fingerprint (call after changing weights)."""
        self._text_cache.clear()
        self._fingerprint = None

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module API
        if mode:
            self.invalidate_caches()
        return super().train(mode)

    def config_dict(self) -> dict:
        """Everything needed to rebuild the architecture (written to ``config.json``)."""
        return {
            "format": "lexicell-clip",
            "format_version": 1,
            "name": self.name,
            "projection_dim": self.projection_dim,
            "transcriptome_tower": self.transcriptome_tower.config(),
            "text_tower": {**self.text_tower.config(), "weights": self.text_weights, "finetuned": self.text_finetuned},
            "transcriptome_projection": self.transcriptome_head_config,
            "text_projection": self.text_head_config,
            "metadata": self.metadata,
        }

    # ------------------------------------------------------------------ towers
    def get_transcriptome_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, hidden)`` transcriptome tower output."""
        return self.transcriptome_tower(input_ids, attention_mask)

    def get_transcriptome_embeds(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True
    ) -> torch.Tensor:
        """``(batch, projection_dim)`` projected (and L2-normalised) ``transcriptome_embeds``."""
        z = self.transcriptome_projection(self.get_transcriptome_features(input_ids, attention_mask))
        return F.normalize(z, dim=-1) if normalize else z

    def get_text_embeds(self, text_inputs: dict, *, normalize: bool = True) -> torch.Tensor:
        """``(batch, projection_dim)`` ``text_embeds`` from tokenized inputs (see :meth:`TextTower.tokenize`)."""
        z = self.text_projection(self.text_tower(**text_inputs))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_inputs: dict) -> dict:
        """Return ``logits_per_transcriptome`` ``(B, B)``, ``logits_per_text`` and both embeds."""
        t = self.get_transcriptome_embeds(input_ids, attention_mask)
        x = self.get_text_embeds(text_inputs)
        logits = t @ x.T * self.logit_scale.exp()
        return {
            "logits_per_transcriptome": logits,
            "logits_per_text": logits.T,
            "transcriptome_embeds": t,
            "text_embeds": x,
        }

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64, cache: bool = True) -> np.ndarray:
        """Embed texts for inference.

        Parameters
        ----------
        texts
            Strings; each must contain some non-whitespace text.

        Returns
        -------
        numpy.ndarray
            ``(n_texts, projection_dim)`` float32 ``text_embeds``, L2-normalised.

        Raises
        ------
        QueryError
            If ``texts`` is empty or holds an empty string.
        """
        texts = [str(t) for t in texts]
        if not texts:
            raise QueryError("No text to embed", found="an empty list", expected="at least one text")
        bad = [t for t in texts if not t.strip()]
        if bad:
            raise QueryError("A text is empty", found=repr(bad[0]), expected="a description such as 'B cells'")
        was_training = self.training
        self.eval()
        todo = [t for t in dict.fromkeys(texts) if not (cache and t in self._text_cache)]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            enc = self.text_tower.tokenize(chunk, device=self.device)
            emb = self.get_text_embeds(enc).float().cpu().numpy()
            for t, e in zip(chunk, emb):
                self._text_cache[t] = e
        out = np.stack([self._text_cache[t] for t in texts]).astype(np.float32)
        while len(self._text_cache) > 50_000:
            self._text_cache.popitem(last=False)
        if not cache:
            for t in todo:
                self._text_cache.pop(t, None)
        if was_training:
            super().train(True)
        return out

    @torch.no_grad()
    def embed_encoding(self, encoding, *, batch_size: int = 1024, progress: bool = False, cancel=None, desc="Embedding cells") -> np.ndarray:
        """Embed a :class:`~engine.models.tokenizer.RankEncoding` batch-wise.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, projection_dim)`` float32 ``transcriptome_embeds``, L2-normalised.

        Raises
        ------
        engine.errors.CancelledError
            When ``cancel()`` returns True between batches.
        """
        from tqdm.auto import tqdm

        from ..errors import CancelledError

        was_training = self.training
        self.eval()
        n = len(encoding)
        out = np.empty((n, self.projection_dim), dtype=np.float32)
        order = np.argsort(-encoding.lengths, kind="stable")  # similar lengths per batch: less padding
        cap = getattr(self.transcriptome_tower, "max_batch_size", None)  # heavy towers (Geneformer): finer progress/cancel
        batch_size = min(batch_size, int(cap)) if cap else batch_size
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
            if cancel is not None and cancel():
                raise CancelledError("Embedding was cancelled", found=f"{start} of {n} cells done")
            idx = order[start : start + batch_size]
            width = max(int(encoding.lengths[idx].max(initial=1)), 1)
            ids = torch.from_numpy(encoding.input_ids[idx, :width]).to(self.device)
            mask = torch.arange(width, device=self.device)[None, :] < torch.from_numpy(encoding.lengths[idx]).to(self.device)[:, None]
            out[idx] = self.get_transcriptome_embeds(ids, mask).float().cpu().numpy()
        if was_training:
            super().train(True)
        return out
