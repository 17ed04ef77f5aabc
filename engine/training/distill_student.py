"""The distillation student: a sparse rank tower trained to reproduce the teacher's cell embeddings.

The student ranks the teacher's genes that are expressed in the data with the teacher's gene medians, so it
orders genes as the teacher does; its transcriptome head is a copy of the teacher's where the widths allow.
It keeps the teacher's text tower, text head and ``logit_scale``, so every query means what it meant with
the teacher. Training is AdamW on 1 - cosine (or the squared distance) plus a centred-cosine term
(Hinton et al. 2015; TinyCLIP, Wu et al. 2023), with the best held-out epoch kept.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CancelledError, GeneIdentifierError
from .distill_teacher import _autocast, _Dataset
from .schedule import token_batch

if TYPE_CHECKING:  # pragma: no cover
    from ..models.tokenizer import RankTokenizer

__all__: list[str] = []

log = logging.getLogger(__name__)


def _student_tokenizer(teacher, datasets: list[_Dataset], max_length: int) -> "RankTokenizer":
    """The teacher's genes that are expressed in the data, with the teacher's medians (same gene ranking)."""
    from ..models.tokenizer import RankTokenizer

    tt = teacher.tokenizer
    used = set()
    for ds in datasets:
        col = tt.match_genes(ds.var)
        expressed = np.asarray((ds.X > 0).sum(axis=0)).ravel() > 0
        used.update(col[(col >= 0) & expressed].tolist())
    frame = tt.to_frame()
    frame = frame[frame["token_id"].isin(used)]
    if frame.empty:
        raise GeneIdentifierError(
            "No gene of the teacher's vocabulary is expressed in the data",
            found=f"{sum(ds.X.shape[0] for ds in datasets)} cells", expected="cells with expressed vocabulary genes",
        )
    return RankTokenizer(
        frame["ensembl_id"].tolist(), gene_medians=frame["median"].to_numpy(),
        symbols=frame["symbol"].fillna("").astype(str).tolist(), max_length=max_length,
    )


def _encode_all(tok, datasets: list[_Dataset], block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Student token ids ``(n_cells, width)`` int32 (width = longest cell) and lengths ``(n_cells,)`` int64."""
    ids, lengths = [], []
    for ds in datasets:
        for s in range(0, ds.X.shape[0], block):
            enc = tok.encode_matrix(ds.X[s : s + block], ds.var).trimmed()
            ids.append(enc.input_ids.astype(np.int32))
            lengths.append(enc.lengths)
    width = max(a.shape[1] for a in ids)
    full = np.full((sum(a.shape[0] for a in ids), width), tok.pad_token_id, dtype=np.int32)
    r = 0
    for a in ids:
        full[r : r + a.shape[0], : a.shape[1]] = a
        r += a.shape[0]
    return full, np.concatenate(lengths).astype(np.int64)


def _build_student(teacher, tok, *, hidden_size, n_layers, mlp_ratio, dropout, token_dropout, name):
    import torch

    from ..models.model import TranscriptomeTextModel
    from ..models.towers import PACKAGE_SOURCE, SparseRankTower

    t_hidden = int(teacher.transcriptome_tower.hidden_size)
    hidden = int(hidden_size or t_hidden)
    tower = SparseRankTower(tok, hidden_size=hidden, n_layers=n_layers, dropout=dropout, token_dropout=token_dropout,
                            mlp_ratio=mlp_ratio)
    copy_head = hidden == t_hidden
    head_cfg = dict(teacher.transcriptome_head_config) if copy_head else {"type": "linear"}
    text = teacher.text_tower
    if teacher.text_weights != "checkpoint" and text.source != PACKAGE_SOURCE and not Path(text.source).is_absolute():
        text.source = str(Path(text.path).resolve())  # the teacher's folder-relative reference, made absolute
    student = TranscriptomeTextModel(
        tower, text, projection_dim=teacher.projection_dim, transcriptome_head=head_cfg,
        text_head=dict(teacher.text_head_config), name=name, text_weights=teacher.text_weights,
        text_finetuned=list(teacher.text_finetuned),
    )
    with torch.no_grad():
        student.text_projection.load_state_dict(teacher.text_projection.state_dict())
        student.logit_scale.copy_(teacher.logit_scale.detach())
        if copy_head:
            student.transcriptome_projection.load_state_dict(teacher.transcriptome_projection.state_dict())
    return student.to(teacher.device), ("teacher's " + head_cfg.get("type", "linear")) if copy_head else "fresh linear"


def _embed_ids(model, ids: np.ndarray, lengths: np.ndarray, *, batch_size: int = 2048, amp: bool = False) -> np.ndarray:
    from ..models.tokenizer import RankEncoding

    with _autocast(model.device, amp):
        return model.embed_encoding(RankEncoding(ids.astype(np.int64), lengths, model.tokenizer.pad_token_id), batch_size=batch_size)


def _objective(z, t, mu, loss: str, centred_weight: float):
    """Per-cell distillation loss of unit vectors ``z`` (student) and ``t`` (teacher), ``mu`` the teacher's mean."""
    from torch.nn import functional as F

    main = ((z - t) ** 2).sum(-1) if loss == "mse" else 1.0 - (z * t).sum(-1)
    if not centred_weight:
        return main
    zc, tc = F.normalize(z - mu, dim=-1), F.normalize(t - mu, dim=-1)
    return main + float(centred_weight) * (1.0 - (zc * tc).sum(-1))


def _train_student(student, ids, lengths, target, train_idx, val_idx, *, epochs, batch_size, lr, weight_decay, loss,
                   centred_weight, seed, amp, progress, cancel) -> tuple[list[dict], int]:
    """AdamW on the cosine (or MSE) plus the centred cosine between student and teacher embeddings.

    The best epoch (lowest held-out loss) is loaded into ``student``; returns the history and that epoch.
    """
    import torch
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    dev = student.device
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    params = [*student.transcriptome_tower.parameters(), *student.transcriptome_projection.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    total = steps_per_epoch * epochs
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total))))
    )
    tgt = torch.from_numpy(target).to(dev)
    mu_np = target[train_idx].mean(0)
    mu = torch.from_numpy(mu_np).to(dev)
    val_target = torch.from_numpy(target[val_idx])
    history, best_state, best_epoch, best_loss = [], None, -1, np.inf
    for epoch in tqdm(range(epochs), desc="Distilling", unit="epoch", disable=not progress):
        student.eval()  # heads (BatchNorm of mi_linear) keep the teacher's running statistics
        student.transcriptome_tower.train()
        order = rng.permutation(train_idx)
        total_loss = 0.0
        for s in range(0, len(order), batch_size):
            if cancel is not None and cancel():
                raise CancelledError("Distillation was cancelled", found=f"epoch {epoch + 1} of {epochs}",
                                     fix="run again: the teacher embeddings are cached, training restarts")
            idx = order[s : s + batch_size]
            bids, mask = token_batch(ids, lengths, idx, dev)
            with _autocast(dev, amp):
                z = student.transcriptome_projection(student.transcriptome_tower(bids, mask))
            z = F.normalize(z.float(), dim=-1)
            t = tgt[torch.from_numpy(idx).to(dev)]
            batch_loss = _objective(z, t, mu, loss, centred_weight).mean()
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            sched.step()
            total_loss += float(batch_loss.detach()) * len(idx)
        student.eval()
        zv = torch.from_numpy(_embed_ids(student, ids[val_idx], lengths[val_idx], amp=amp))
        val_loss = float(_objective(zv, val_target, mu.cpu(), loss, centred_weight).mean())
        val_cos = float((zv * val_target).sum(-1).mean())
        history.append({"epoch": epoch + 1, "train_loss": total_loss / max(1, len(order)), "heldout_loss": val_loss,
                        "heldout_cosine": val_cos})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch + 1
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items() if k.startswith("transcriptome_")}
        log.info("epoch %d: loss %.4f, held-out loss %.4f, cosine %.4f", epoch + 1, history[-1]["train_loss"], val_loss, val_cos)
    for p in student.parameters():
        p.requires_grad_(False)
    student.load_state_dict(best_state, strict=False)
    student.invalidate_caches()
    student.eval()
    return history, best_epoch
