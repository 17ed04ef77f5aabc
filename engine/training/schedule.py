"""Seeding, the learning-rate schedule and batches of the training loops.

Epoch batches are a permutation seeded by ``(seed, epoch)``, so a resumed run sees the same batches; the
schedule is a linear warm-up then a cosine decay to ``min_lr_ratio x lr``. Rank-encoded profiles are held
as int32 token ids of the width of the longest one and cut to the longest of each batch
(:func:`token_batch`), for :mod:`engine.training.trainer` and the distillation student alike.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch

from .pairs import PairedData

__all__ = ["token_batch"]


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


def token_batch(ids: np.ndarray, lengths: np.ndarray, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` of padded token ids, cut to their longest row.

    Parameters
    ----------
    ids
        ``(n, width)`` int32 (or int64) token ids, padded.
    lengths
        ``(n,)`` int64 number of real tokens per row.
    idx
        Row indices of the batch.
    device
        Torch device of the outputs.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(len(idx), w)`` int64 ids and the bool attention mask of the same shape, ``w`` the longest row
        (at least 1).
    """
    width = max(int(lengths[idx].max(initial=1)), 1)
    batch_ids = torch.from_numpy(ids[idx, :width].astype(np.int64)).to(device)
    mask = torch.arange(width, device=device)[None, :] < torch.from_numpy(lengths[idx]).to(device)[:, None]
    return batch_ids, mask


class _Encoded:
    """Rank-encoded pairs held as int32 (the width of the longest pair)."""

    def __init__(self, model, data: PairedData) -> None:
        enc = model.tokenizer.encode_matrix(data.X, data.var).trimmed()
        self.ids = enc.input_ids.astype(np.int32)
        self.lengths = enc.lengths.astype(np.int64)

    def batch(self, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        return token_batch(self.ids, self.lengths, idx, device)
