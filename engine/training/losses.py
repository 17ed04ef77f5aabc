"""Contrastive losses for transcriptome-text training.

CellWhisperer (seed 000 §3.3) trains with ``clip_weight x CLIP + jsd_weight x JSD``:

- **CLIP / InfoNCE** (Radford et al. 2021): symmetric cross-entropy of the ``(B, B)`` logit matrix, rows
  (transcriptome -> text) and columns (text -> transcriptome), targets on the diagonal.
- **JSD** (CLIP-Lite, Shrivastava et al. 2023): the Jensen-Shannon lower bound of the mutual information
  with the dot-product critic ``s_ij = <t_i, x_j> x scale``::

      I_JSD = E_pos[-softplus(-s)] - E_neg[softplus(s)]
      jsd_loss = -I_JSD = mean_pos softplus(-s_ij) + mean_neg softplus(s_ij)

  Positives are the matched pairs, negatives every other pair of the batch.

**Soft targets.** Knowledge-derived data has many pairs per text (one text per cell type or gene set). Two
pairs of a batch that share their text (or their group id) are then positives of each other: the CLIP target
of a row is spread uniformly over its positives, and JSD counts them as positives rather than negatives.
Masks are built with :func:`positive_mask`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

__all__ = ["positive_mask", "clip_loss", "jsd_loss", "jsd_loss_from_logits", "combined_loss"]


def positive_mask(*ids: torch.Tensor | Sequence[int] | None, n: int | None = None, device=None) -> torch.Tensor:
    """Positive-pair mask of a batch from one or more id vectors.

    Parameters
    ----------
    *ids
        ``(B,)`` integer ids (text index, group id); ``None`` entries are ignored. Pairs ``i, j`` are
        positives when any id vector has ``ids[i] == ids[j]`` (a negative id never matches another pair).
    n
        Batch size, needed only when every ``ids`` entry is None.

    Returns
    -------
    torch.Tensor
        ``(B, B)`` bool, always True on the diagonal.
    """
    vecs = [torch.as_tensor(v, device=device) for v in ids if v is not None]
    if not vecs:
        if n is None:
            raise ValueError("positive_mask needs ids or n")
        return torch.eye(n, dtype=torch.bool, device=device)
    b = vecs[0].shape[0]
    mask = torch.eye(b, dtype=torch.bool, device=vecs[0].device)
    for v in vecs:
        v = v.reshape(-1)
        mask |= (v[:, None] == v[None, :]) & (v[:, None] >= 0)
    return mask


def _targets(mask: torch.Tensor, dtype) -> torch.Tensor:
    t = mask.to(dtype)
    return t / t.sum(dim=1, keepdim=True)


def clip_loss(
    logits_per_transcriptome: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
    groups: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE loss of CLIP (Radford et al. 2021).

    Parameters
    ----------
    logits_per_transcriptome
        ``(B, B)`` float logits, row ``i`` = transcriptome ``i`` against every text of the batch
        (cosine x ``exp(logit_scale)``).
    weights
        Optional ``(B,)`` non-negative per-pair weights; each direction's per-row losses are averaged with
        them (``sum(w * l) / sum(w)``).
    positives
        Optional ``(B, B)`` bool mask of positive pairs (soft targets, see :func:`positive_mask`); the
        target distribution of each row/column is uniform over its positives.
    groups
        Shortcut for ``positives=positive_mask(groups)``.

    Returns
    -------
    torch.Tensor
        Scalar: ``(CE(rows) + CE(columns)) / 2``. With hard targets and ``B`` equal logits it is ``log B``.
    """
    logits = logits_per_transcriptome.float()
    b = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] != b:
        raise ValueError(f"clip_loss needs a square (B, B) logit matrix, got {tuple(logits.shape)}")
    if positives is None and groups is not None:
        positives = positive_mask(torch.as_tensor(groups, device=logits.device))
    if positives is None:
        target = torch.arange(b, device=logits.device)
        row = F.cross_entropy(logits, target, reduction="none")
        col = F.cross_entropy(logits.T, target, reduction="none")
    else:
        positives = positives.to(logits.device).bool() | torch.eye(b, dtype=torch.bool, device=logits.device)
        row = -(_targets(positives, logits.dtype) * F.log_softmax(logits, dim=1)).sum(1)
        col = -(_targets(positives.T, logits.dtype) * F.log_softmax(logits.T, dim=1)).sum(1)
    if weights is None:
        return (row.mean() + col.mean()) / 2
    w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device).reshape(-1)
    denom = w.sum().clamp_min(1e-12)
    return ((w * row).sum() / denom + (w * col).sum() / denom) / 2


def jsd_loss_from_logits(
    scores: torch.Tensor,
    *,
    positives: torch.Tensor | None = None,
    groups: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """CLIP-Lite JSD loss from a ``(B, B)`` critic matrix ``scores[i, j] = T(transcriptome_i, text_j)``.

    ``loss = mean_{pos} softplus(-s) + mean_{neg} softplus(s)``, i.e. minus the Jensen-Shannon MI lower bound
    ``E_pos[-softplus(-s)] - E_neg[softplus(s)]`` (Shrivastava et al. 2023; Hjelm et al. 2019). Without
    negatives (a batch of one pair or one group) the negative term is 0.
    """
    s = scores.float()
    b = s.shape[0]
    if positives is None and groups is not None:
        positives = positive_mask(torch.as_tensor(groups, device=s.device))
    if positives is None:
        positives = torch.eye(b, dtype=torch.bool, device=s.device)
    positives = positives.to(s.device).bool() | torch.eye(b, dtype=torch.bool, device=s.device)
    negatives = ~positives
    pos_term = F.softplus(-s[positives]).mean()
    neg_term = F.softplus(s[negatives]).mean() if negatives.any() else s.new_zeros(())
    return pos_term + neg_term


def jsd_loss(
    transcriptome_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    scale: float | torch.Tensor = 1.0,
    positives: torch.Tensor | None = None,
    groups: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """CLIP-Lite Jensen-Shannon MI loss with the dot-product critic.

    Parameters
    ----------
    transcriptome_embeds, text_embeds
        ``(B, D)`` float, row ``i`` of each is a matched pair (normally L2-normalised).
    scale
        Critic scale (``exp(logit_scale)``, as CellWhisperer's discriminator multiplies the dot product by
        ``temperature.exp()``).
    positives, groups
        Soft positives as in :func:`clip_loss`.

    Returns
    -------
    torch.Tensor
        Scalar ``mean_pos softplus(-s) + mean_neg softplus(s)`` with ``s = (T @ X.T) * scale``.
    """
    s = transcriptome_embeds.float() @ text_embeds.float().T * scale
    return jsd_loss_from_logits(s, positives=positives, groups=groups)


def combined_loss(
    out: dict,
    *,
    clip_weight: float = 1.0,
    jsd_weight: float = 0.0,
    positives: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    return_parts: bool = False,
):
    """``clip_weight x CLIP + jsd_weight x JSD`` on a model output (seed 000 §3.3).

    Parameters
    ----------
    out
        Output of :meth:`engine.models.model.TranscriptomeTextModel.forward` (needs ``logits_per_transcriptome``);
        the JSD critic is the same logit matrix (cosine x ``exp(logit_scale)``).
    positives
        Optional ``(B, B)`` bool soft-target mask (see :func:`positive_mask`).
    weights
        Optional ``(B,)`` per-pair weights of the CLIP term.
    return_parts
        Also return ``{"clip": float, "jsd": float}``.

    Returns
    -------
    torch.Tensor or (torch.Tensor, dict)
        The scalar loss (and its parts).
    """
    logits = out["logits_per_transcriptome"]
    total = logits.new_zeros((), dtype=torch.float32)
    parts = {}
    if clip_weight:
        c = clip_loss(logits, weights=weights, positives=positives)
        total = total + clip_weight * c
        parts["clip"] = float(c.detach())
    if jsd_weight:
        j = jsd_loss_from_logits(logits, positives=positives)
        total = total + jsd_weight * j
        parts["jsd"] = float(j.detach())
    return (total, parts) if return_parts else total
