"""GenePT-style initialisation: a training-free, knowledge-derived zero-shot model to start from.

Each vocabulary gene is described by the text-tower features of the names of the shipped gene sets that
contain it (GenePT, Chen & Zou 2024, uses gene summaries, which do not install offline). :func:`init_model`
(the ``init`` hook of a training config) puts those vectors into a sparse rank tower's gene embeddings and
makes the heads and residual blocks start as identities, so that before any training a cell's embedding is
the rank-weighted mean of its genes' text vectors and lives in the text space.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .genes import CELLTYPE_GMT, GENESET_DIR, _pretty, _read_gmt, first_positions, geneset_files, strip_tissue, symbol_positions

__all__ = ["gene_knowledge_vectors", "init_model"]

log = logging.getLogger(__name__)


def _text_features(text_tower, texts: list[str], batch_size: int = 128) -> np.ndarray:
    """Text-tower features ``(n, hidden)`` of ``texts``, cached on disk by tower source and text content."""
    import hashlib
    import os

    import torch

    from ...tools.embed import cache_dir

    h = hashlib.blake2b((text_tower.source + text_tower.pooling + "\x1f".join(texts)).encode(), digest_size=16).hexdigest()
    f = Path(cache_dir()) / "text_features" / f"knowledge_{h}.npy"
    if f.is_file():
        arr = np.load(f, allow_pickle=False)
        if arr.shape[0] == len(texts):
            return arr
    out = []
    was = text_tower.training
    text_tower.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = text_tower.tokenize(texts[i : i + batch_size])
            out.append(text_tower(**enc).float().cpu().numpy())
    text_tower.train(was)
    arr = np.concatenate(out).astype(np.float32)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f.with_suffix(".tmp.npy"), arr)
    os.replace(f.with_suffix(".tmp.npy"), f)
    return arr


def gene_knowledge_vectors(tokenizer, text_tower, *, celltype_weight: float = 3.0, include_go: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Describe each vocabulary gene by the texts of the gene sets it belongs to (GenePT-style).

    A gene's vector is the weighted mean of the text-tower features of the readable names of every shipped
    gene set containing it (cell-type marker sets weigh ``celltype_weight``; GenePT, Chen & Zou 2024, uses
    gene summaries instead, which are not installable offline).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(n_vocab_genes, text_hidden)`` float32 vectors (zero where a gene is in no set) and a bool mask of
        the genes that have one.
    """
    sym_pos = first_positions(pd.Index([str(s).upper() for s in tokenizer.symbols]))
    names, members, weights = [], [], []
    for f in geneset_files(include_go=include_go):
        for name, (_, gs) in _read_gmt(GENESET_DIR / f).items():
            pos = symbol_positions(sym_pos, gs)
            if 0 < pos.size <= 500:
                names.append(strip_tissue(name) if f == CELLTYPE_GMT else _pretty(name))
                members.append(pos)
                weights.append(celltype_weight if f == CELLTYPE_GMT else 1.0)
    feats = _text_features(text_tower, names)
    rows = np.concatenate(members)
    cols = np.concatenate([np.full(m.size, i) for i, m in enumerate(members)])
    vals = np.concatenate([np.full(m.size, w) for m, w in zip(members, weights)])
    A = sp.csr_matrix((vals, (rows, cols)), shape=(len(tokenizer.gene_ids), len(names)))
    tot = np.asarray(A.sum(axis=1)).ravel()
    V = np.asarray(A @ feats) / np.maximum(tot, 1e-9)[:, None]
    return V.astype(np.float32), tot > 0


def init_model(model, data=None, *, include_go: bool = True, identity_heads: bool = True) -> None:
    """Start the model at a training-free, knowledge-derived zero-shot model (GenePT-style).

    Gene token embeddings of a :class:`~engine.models.towers.SparseRankTower` are set to the gene knowledge vectors
    of :func:`gene_knowledge_vectors` (PCA-reduced when the tower is narrower than the text tower); genes in
    no set get small random vectors. When the tower is as wide as the text tower and the heads are square
    bias-free linear maps (or :class:`~engine.models.heads.MLPHead` with a square shortcut), the heads start as
    identities (MLP heads: identity shortcut, zero MLP branch) and the residual blocks as no-ops, so before any
    training a cell's embedding is the rank-weighted mean of its genes' text vectors and lives in the text
    space. Used as the ``init`` hook of ``engine.training.train``.
    """
    import torch
    from torch import nn

    tower = model.transcriptome_tower
    V, has = gene_knowledge_vectors(tower.tokenizer, model.text_tower, include_go=include_go)
    d = tower.hidden_size
    P = V[has]
    if P.shape[1] > d:
        Pc = P - P.mean(0)
        _, _, vt = np.linalg.svd(Pc, full_matrices=False)
        P = Pc @ vt[:d].T
    elif P.shape[1] < d:
        P = np.pad(P, ((0, 0), (0, d - P.shape[1])))
    with torch.no_grad():
        W = tower.gene_embeddings.weight
        scale = float(np.linalg.norm(P, axis=1).mean())
        W.mul_(0.1 * scale / (W.norm(dim=1).mean() + 1e-9))
        W[torch.as_tensor(tower.tokenizer.token_ids[has])] = torch.as_tensor(P, dtype=W.dtype)
        W[tower.tokenizer.pad_token_id].zero_()
        if identity_heads:
            for block in tower.blocks:
                last = block[-1]
                last.weight.zero_()
                last.bias.zero_()
            from ...models.heads import MLPHead

            for head in (model.transcriptome_projection, model.text_projection):
                if isinstance(head, nn.Linear) and head.weight.shape[0] == head.weight.shape[1]:
                    head.weight.copy_(torch.eye(head.weight.shape[0]))
                    if head.bias is not None:
                        head.bias.zero_()
                elif isinstance(head, MLPHead) and head.shortcut.weight.shape[0] == head.shortcut.weight.shape[1]:
                    # identity shortcut, silent MLP branch: the head starts as a LayerNorm of its input
                    head.shortcut.weight.copy_(torch.eye(head.shortcut.weight.shape[0]))
                    head.mlp[-1].weight.zero_()
                    head.mlp[-1].bias.zero_()
    model.invalidate_caches()
    log.info("initialised %d of %d gene embeddings from gene-set texts", int(has.sum()), has.size)
