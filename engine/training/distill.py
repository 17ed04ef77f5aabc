"""Distil a slow transcriptome tower (CellWhisperer's Geneformer) into Lexicell's fast sparse rank tower.

Usage::

    python -m engine.distill --teacher models/cellwhisperer --data cells.h5ad [--data more.h5ad ...] \\
        --out models/cellwhisperer-fast [--device auto|cpu|cuda] [--epochs 40] [--overwrite]

Knowledge distillation of embeddings (Hinton et al. 2015, "Distilling the knowledge in a neural network";
for CLIP towers: Wu et al. 2023, "TinyCLIP", and Sun et al. 2023, "DIME-FM", which match a student's image
embeddings to a frozen teacher's with a cosine loss). Here:

1. The teacher (a native model folder, e.g. a converted CellWhisperer checkpoint) embeds every cell once with
   its transcriptome tower and head: projected, L2-normalised ``transcriptome_embeds``. They are cached on disk
   in chunks (``<cache>/<data-name>-<key>/chunk_00000.npy`` ...), so an interrupted run resumes where it
   stopped and a rerun (e.g. with other training settings) skips the teacher entirely.
2. A :class:`~engine.models.towers.SparseRankTower` over the teacher's genes (those expressed in the data; the
   teacher's gene medians, so the student ranks genes as the teacher does) plus a transcriptome head (a copy
   of the teacher's where the widths allow, else a fresh linear head) is trained to reproduce those
   embeddings (cosine loss), with held-out cells for validation and best-epoch selection.
3. The student keeps the teacher's text tower, text head and ``logit_scale`` unchanged, so every query and
   label set means what it meant with the teacher. It is saved as a normal native model folder
   (:func:`engine.models.checkpoint.save_model`) with a ``MODEL_CARD.md`` and ``distill_report.json``.

The report compares student and teacher on the held-out cells: the cosine between their cell embeddings,
the Spearman correlation of query scores over a fixed query list, zero-shot label agreement over a label
list, and the speed of both towers measured in the same run on the same cells.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..errors import (
    CancelledError,
    CheckpointError,
    ConfigError,
    EmptySelectionError,
    GeneIdentifierError,
    LexicellError,
)

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse as sp
    import torch

    from ..models.model import TranscriptomeTextModel
    from ..models.tokenizer import RankEncoding, RankTokenizer

__all__ = ["distill", "throughput", "DEFAULT_QUERIES", "DEFAULT_LABELS", "main"]

log = logging.getLogger(__name__)

DEFAULT_QUERIES = [
    "B cells",
    "T cells",
    "monocytes",
    "NK cells",
    "proliferating cells",
    "dendritic cells",
    "erythrocytes",
    "cells responding to interferon",
]
"""Queries whose scores the report compares between student and teacher (Spearman over held-out cells)."""

DEFAULT_LABELS = [
    "B cell",
    "T cell",
    "monocyte",
    "natural killer cell",
    "dendritic cell",
    "plasma cell",
    "erythrocyte",
    "platelet",
]
"""Zero-shot labels (through the ``cellwhisperer`` template) whose argmax the report compares."""

CACHE_DIR = "teacher_embeds"
REPORT_FILE = "distill_report.json"
CARD_FILE = "MODEL_CARD.md"
_OWN_FILES = {CACHE_DIR, REPORT_FILE, CARD_FILE, "config.json", "model.safetensors", "genes.tsv", "text_model"}


# --------------------------------------------------------------------------- inputs
@dataclass
class _Dataset:
    """One ``--data`` file: expression for rank encoding, its genes and cell names."""

    path: Path
    name: str
    X: "sp.csr_matrix"  # (n_cells, n_genes) float32, counts (or normalised values for a teacher without counts)
    var: object  # pandas.DataFrame with ensembl_id / gene_symbol
    obs_names: list
    kind: str


def _check_not_input(out: Path, cache: Path, inputs=()) -> None:
    """Refuse ``out`` when it is an input folder (the teacher) or would replace an input file, whatever
    ``--overwrite`` says."""
    target = out.expanduser().resolve()
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if src == target or (src.parent == target and src.name in _OWN_FILES) or (cache.resolve() in src.parents):
            raise ConfigError(
                "--out would write over an input", found=f"{out} (input {inp})",
                expected="a new folder apart from the teacher model and the data files",
                fix="choose another --out; inputs are never overwritten, not even with --overwrite",
            )


def _check_out(out: Path, overwrite: bool, cache: Path, inputs=()) -> None:
    """Refuse to write into a file, over a model, or into a folder with foreign files, unless ``overwrite``;
    refuse always when ``out`` is an input (:func:`_check_not_input`)."""
    _check_not_input(out, cache, inputs)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out is a file", found=str(out), expected="a folder (created if missing)")
    if not out.is_dir() or overwrite:
        return
    if (out / "config.json").exists():
        raise ConfigError(
            "The output folder already holds a model",
            found=str(out),
            expected="a new folder, or the folder of an interrupted distillation (it resumes)",
            fix="pass --overwrite to replace the model (the cached teacher embeddings are reused), or choose another --out",
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES and p != cache)
    if foreign:
        raise ConfigError(
            "The output folder is not empty",
            found=f"{out} holding {foreign[:5]}",
            expected="a new or empty folder, or the folder of an interrupted distillation",
            fix="pass --overwrite to write there anyway, or choose another --out",
        )


def _load_teacher(teacher, device) -> "TranscriptomeTextModel":
    from ..models.checkpoint import load_model

    path = Path(teacher).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            "The teacher is not a model folder",
            found=str(path) + (" (a file)" if path.is_file() else " (missing)"),
            expected="a native model folder (config.json, model.safetensors, genes.tsv)",
            fix="convert the checkpoint first: python -m engine.convert cellwhisperer CKPT --geneformer DIR --text-model DIR --out DIR",
        )
    return load_model(path, device=device)


def _read_data(paths: Sequence, teacher: "TranscriptomeTextModel") -> list[_Dataset]:
    """Read every data file and check that the teacher can embed it (counts, shared genes)."""
    from ..io.data import expression_matrix, read

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ConfigError("No data to distil on", found="no --data", expected="one or more .h5ad files (or other engine.read formats)")
    kind = "counts" if getattr(teacher.transcriptome_tower, "requires_counts", False) else "normalized"
    out, seen = [], set()
    for p in paths:
        adata = p if not isinstance(p, (str, os.PathLike)) else read(p)
        path = Path(p) if isinstance(p, (str, os.PathLike)) else Path(f"adata{len(out)}")
        X, var = expression_matrix(adata, kind=kind)  # MatrixKindError when the teacher needs counts and there are none
        if X.shape[0] == 0:
            raise EmptySelectionError("A data file has no cells", found=str(path), expected="at least one cell")
        matched = int((teacher.tokenizer.match_genes(var) >= 0).sum())
        if matched == 0:
            raise GeneIdentifierError(
                "None of the data's genes is in the teacher's vocabulary",
                found=f"{path}: {X.shape[1]} genes such as {list(var.index[:4])}",
                expected=f"Ensembl IDs or symbols such as {list(teacher.tokenizer.gene_ids[:3])}",
                fix="check the species and the gene identifiers: engine.validate(adata) maps symbols to Ensembl IDs",
            )
        name = path.stem.replace(" ", "_") or "data"
        while name in seen:
            name += "_"
        seen.add(name)
        log.info("%s: %d cells, %d of %d genes in the teacher's vocabulary", path, X.shape[0], matched, X.shape[1])
        out.append(_Dataset(path, name, X.tocsr(), var, [str(o) for o in adata.obs_names], kind))
    return out


# --------------------------------------------------------------------------- teacher embeddings (cached)
def _autocast(device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU (CPU results stay bit-identical)."""
    import torch

    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _teacher_key(ds: _Dataset, teacher_fp: str, chunk_size: int, amp: bool) -> str:
    from ..tools.embed import data_fingerprint

    ids = ds.var["ensembl_id"].astype(str).tolist() if "ensembl_id" in ds.var.columns else list(map(str, ds.var.index))
    h = hashlib.blake2b(digest_size=8)
    for part in (data_fingerprint(ds.X, ids, ds.obs_names), teacher_fp, ds.kind, str(chunk_size), "bf16" if amp else "fp32"):
        h.update(part.encode())
    return h.hexdigest()


def _read_chunk(file: Path, rows: int, dim: int) -> np.ndarray | None:
    try:
        arr = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        log.warning("recomputing unreadable teacher chunk %s: %s", file, err)
        return None
    if arr.shape != (rows, dim) or not np.isfinite(arr).all():
        log.warning("recomputing teacher chunk %s: shape %s, expected %s", file, arr.shape, (rows, dim))
        return None
    return arr.astype(np.float32, copy=False)


def _teacher_embeds(
    teacher, datasets: list[_Dataset], cache: Path, *, chunk_size: int, amp: bool, batch_size: int,
    progress: bool, cancel: Callable[[], bool] | None,
) -> tuple[list[np.ndarray], dict]:
    """Teacher ``transcriptome_embeds`` of every cell, chunk by chunk, reusing finished chunks on disk."""
    from tqdm.auto import tqdm

    fp = teacher.fingerprint()
    dim = teacher.projection_dim
    plan = []
    for ds in datasets:
        folder = cache / f"{ds.name}-{_teacher_key(ds, fp, chunk_size, amp and teacher.device.type == 'cuda')}"
        n = ds.X.shape[0]
        for c, start in enumerate(range(0, n, chunk_size)):
            plan.append((ds, folder, c, start, min(start + chunk_size, n)))
    out: dict[str, list] = {ds.name: [] for ds in datasets}
    computed = reused = 0
    bar = tqdm(plan, desc="Teacher embeddings (chunks)", unit="chunk", disable=not progress)
    for ds, folder, c, start, stop in bar:
        file = folder / f"chunk_{c:05d}.npy"
        arr = _read_chunk(file, stop - start, dim) if file.is_file() else None
        if arr is None:
            if cancel is not None and cancel():
                raise CancelledError(
                    "Teacher embedding was cancelled",
                    found=f"{computed + reused} of {len(plan)} chunks done (kept in {cache})",
                    fix="run the same command again: finished chunks are reused",
                )
            folder.mkdir(parents=True, exist_ok=True)
            meta = folder / "meta.json"
            if not meta.is_file():
                meta.write_text(json.dumps({"data": str(ds.path), "n_cells": ds.X.shape[0], "chunk_size": chunk_size,
                                            "teacher": teacher.name, "teacher_fingerprint": fp, "dim": dim}, indent=2))
            enc = teacher.tokenizer.encode_matrix(ds.X[start:stop], ds.var)
            with _autocast(teacher.device, amp):
                arr = teacher.embed_encoding(enc, batch_size=batch_size)
            tmp = file.with_name(file.stem + ".tmp.npy")
            np.save(tmp, arr.astype(np.float32))
            os.replace(tmp, file)
            computed += 1
        else:
            reused += 1
        out[ds.name].append(arr)
    stats = {"chunks": len(plan), "computed": computed, "reused": reused, "chunk_size": chunk_size, "cache": str(cache)}
    return [np.concatenate(out[ds.name]) if out[ds.name] else np.zeros((0, dim), np.float32) for ds in datasets], stats


# --------------------------------------------------------------------------- student
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
            width = max(int(lengths[idx].max(initial=1)), 1)
            bids = torch.from_numpy(ids[idx, :width].astype(np.int64)).to(dev)
            mask = torch.arange(width, device=dev)[None, :] < torch.from_numpy(lengths[idx]).to(dev)[:, None]
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


# --------------------------------------------------------------------------- report
def throughput(model, X, var, *, batch_size: int | None = None, budget_s: float | None = None, min_s: float = 0.0,
               amp: bool = False) -> dict:
    """Cells per second of ``model``'s transcriptome path: rank encoding + tower + head, batch by batch.

    Parameters
    ----------
    model
        A :class:`~engine.models.model.TranscriptomeTextModel` (in ``eval`` mode, on its device).
    X, var
        ``(n_cells, n_genes)`` expression (as :func:`engine.io.data.expression_matrix` returns it) and its genes.
    batch_size
        Cells per batch (default: the tower's ``max_batch_size`` or 2,048).
    budget_s
        Stop after the batch that passes this many seconds (slow teachers).
    min_s
        Repeat the cells until at least this many seconds have passed (fast students).

    Returns
    -------
    dict
        ``cells`` (embedded, repeats included), ``seconds`` (wall), ``cells_per_s``, ``cpu_seconds``.
    """
    import torch

    n = X.shape[0]
    bs = int(batch_size or getattr(model.transcriptome_tower, "max_batch_size", None) or 2048)
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    while True:
        for s in range(0, n, bs):
            enc = model.tokenizer.encode_matrix(X[s : s + bs], var)
            with _autocast(model.device, amp):
                model.embed_encoding(enc, batch_size=bs)
            done += enc.input_ids.shape[0]
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        if time.perf_counter() - t0 >= min_s:
            break
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"cells": done, "seconds": wall, "cells_per_s": done / max(wall, 1e-9), "cpu_seconds": time.process_time() - c0}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _agreement(student_emb, teacher_emb, model, queries, labels) -> dict:
    from ..tools.score import label_texts

    q = model.embed_texts(list(queries))
    rho = {text: _spearman(student_emb @ v, teacher_emb @ v) for text, v in zip(queries, q)}
    finite = [r for r in rho.values() if np.isfinite(r)]
    lab = model.embed_texts(label_texts(list(labels), "cellwhisperer"))
    s_lab, t_lab = (student_emb @ lab.T).argmax(1), (teacher_emb @ lab.T).argmax(1)
    return {
        "query_spearman": rho,
        "query_spearman_mean": float(np.mean(finite)) if finite else float("nan"),
        "query_spearman_min": float(np.min(finite)) if finite else float("nan"),
        "label_agreement": float(np.mean(s_lab == t_lab)) if len(s_lab) else float("nan"),
        "teacher_label_counts": {labels[i]: int(c) for i, c in zip(*np.unique(t_lab, return_counts=True))},
    }


def _format_report(r: dict) -> str:
    sp_ = r["speed"]
    lines = [
        f"Distilled {r['student']['name']} from {r['teacher']['name']} ({r['teacher']['path']})",
        f"  cells: {r['n_cells']['train']:,} training, {r['n_cells']['held_out']:,} held out; "
        f"{r['student']['n_genes']:,} genes; best epoch {r['best_epoch']} of {r['epochs']}; device {r['device']}",
        f"  teacher chunks: {r['teacher_chunks']['computed']} computed, {r['teacher_chunks']['reused']} reused "
        f"(cache {r['teacher_chunks']['cache']})",
        f"  held-out cosine student vs teacher: mean {r['heldout_cosine_mean']:.4f} (min {r['heldout_cosine_min']:.4f}; "
        f"baseline, every cell as the mean teacher embedding: {r['baseline_cosine_mean']:.4f})",
        f"  held-out centred cosine (both minus the teacher's mean embedding): {r['heldout_centred_cosine_mean']:.4f}",
        f"  query-score Spearman over held-out cells: mean {r['query_spearman_mean']:.4f}, min {r['query_spearman_min']:.4f}",
    ]
    lines += [f"    {q!r}: {v:.4f}" for q, v in r["query_spearman"].items()]
    lines += [
        f"  zero-shot label agreement (argmax over {len(r['labels'])} labels): {r['label_agreement']:.4f}",
        f"  speed ({sp_['cells']} held-out cells, same run, {r['device']}): teacher {sp_['teacher_cells_per_s']:,.1f} cells/s, "
        f"student {sp_['student_cells_per_s']:,.1f} cells/s, ratio {sp_['ratio']:,.1f}x",
    ]
    return "\n".join(lines)


def _model_card(r: dict) -> str:
    rows = "\n".join(f"| {q} | {v:.4f} |" for q, v in r["query_spearman"].items())
    sp_ = r["speed"]
    return f"""# {r['student']['name']}

A fast transcriptome tower distilled from **{r['teacher']['name']}** (`{r['teacher']['path']}`) with
`python -m engine.distill` on {r['date']} (Lexicell {r['lexicell_version']}).

- Student: `SparseRankTower` (hidden {r['student']['hidden_size']}, {r['student']['n_layers']} blocks,
  max length {r['student']['max_length']}) over {r['student']['n_genes']:,} genes of the teacher's vocabulary that
  are expressed in the distillation data (the teacher's gene medians), head: {r['student']['head']}.
- Text tower, text head and `logit_scale`: the teacher's, unchanged (every query means what it meant).
- Distillation data: {', '.join(f'`{d}`' for d in r['data'])}; {r['n_cells']['train']:,} training cells,
  {r['n_cells']['held_out']:,} held out (fraction {r['held_out_fraction']}, seed {r['seed']}).
- Training: {r['loss']} loss + {r['centred_weight']} x centred cosine loss, {r['epochs']} epochs (best held-out epoch {r['best_epoch']}), batch {r['batch_size']},
  learning rate {r['lr']}, device {r['device']}{' (bf16 autocast)' if r['amp_used'] else ''}.

## Agreement with the teacher (held-out cells)

| measure | value |
|---|---|
| cosine between student and teacher cell embeddings, mean | {r['heldout_cosine_mean']:.4f} |
| cosine, minimum over cells | {r['heldout_cosine_min']:.4f} |
| baseline: cosine of each cell to the teacher's mean embedding | {r['baseline_cosine_mean']:.4f} |
| centred cosine (both minus the teacher's mean training embedding), mean | {r['heldout_centred_cosine_mean']:.4f} |
| query-score Spearman, mean over {len(r['query_spearman'])} queries | {r['query_spearman_mean']:.4f} |
| zero-shot label agreement (argmax over {len(r['labels'])} labels) | {r['label_agreement']:.4f} |

| query | Spearman of scores (student vs teacher) |
|---|---|
{rows}

Labels: {', '.join(r['labels'])} (template "A sample of {{label}} from a healthy individual").

## Speed (same run, same {sp_['cells']} held-out cells, {r['device']})

Teacher {sp_['teacher_cells_per_s']:,.2f} cells/s, student {sp_['student_cells_per_s']:,.1f} cells/s:
**{sp_['ratio']:,.1f}x**. Both include rank encoding, tower and head.

These figures describe agreement with the teacher on the distillation data's own held-out cells; they say
nothing about cells unlike them. Use the teacher to check a new kind of data, or distil again on it.
"""


# --------------------------------------------------------------------------- public API
def distill(
    teacher: str | os.PathLike,
    data: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    device: str | None = "auto",
    amp: bool = True,
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int = 1024,
    teacher_batch_size: int = 64,
    hidden_size: int | None = None,
    n_layers: int = 2,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
    token_dropout: float = 0.0,
    max_length: int | None = None,
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    loss: str = "cosine",
    centred_weight: float = 1.0,
    held_out: float = 0.1,
    seed: int = 0,
    queries: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    speed_cells: int = 64,
    speed_budget_s: float = 60.0,
    name: str | None = None,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    verbose: bool = True,
) -> dict:
    """Distil the teacher's transcriptome tower into a sparse rank tower and save the student model.

    Knowledge distillation of embeddings (Hinton et al. 2015; for CLIP towers, TinyCLIP, Wu et al. 2023):
    the student's projected, L2-normalised ``transcriptome_embeds`` are trained to match the teacher's. The
    teacher is CellWhisperer (Schaefer et al., seed 000) converted with ``python -m engine.convert``, or any
    native model.

    Parameters
    ----------
    teacher
        Native model folder (``config.json`` + ``model.safetensors`` + ``genes.tsv``).
    data
        One or more files :func:`engine.read` reads (``.h5ad`` ...), cells x genes with raw counts when the
        teacher needs them (Geneformer does).
    out
        Folder of the student model (created). Also holds the teacher-embedding cache unless ``cache_dir``.
    overwrite
        Replace a model already in ``out`` (cached teacher chunks are reused when data and teacher match).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; teacher embedding, training and the
        speed figures run there.
    amp
        bf16 autocast for the teacher's forward pass and the student's training **on CUDA only**; CPU runs are
        full float32 whatever this says.
    cache_dir
        Folder of the teacher-embedding chunks (default ``out/teacher_embeds``).
    chunk_size
        Cells per cached chunk: ``(chunk_size, projection_dim)`` float32 ``.npy`` files, written atomically.
    teacher_batch_size
        Cells per teacher forward pass (the tower may split further by tokens).
    hidden_size, n_layers, mlp_ratio, dropout, token_dropout
        Student :class:`~engine.models.towers.SparseRankTower` settings; ``hidden_size`` defaults to the teacher
        tower's width, which lets the student start from a copy of the teacher's transcriptome head.
    max_length
        Student input genes per cell (default: the teacher's gene budget, ``max_length`` minus special tokens).
    epochs, batch_size, lr, weight_decay
        AdamW with a 5 % linear warm-up and a cosine decay.
    loss
        ``"cosine"`` (1 - cos) or ``"mse"`` (squared distance of the unit vectors, 2 - 2 cos).
    centred_weight
        Weight of a second term, 1 - cos between student and teacher embeddings after subtracting the
        teacher's mean training embedding from both. Cell embeddings share a large common direction, so the
        plain cosine is high for any student that finds it; the centred term makes the cell-to-cell
        differences (what query scores rank) count. 0 turns it off.
    held_out
        Fraction of cells held out for validation (best epoch) and for the report.
    seed
        Split, initialisation and batch order.
    queries, labels
        Report's query list (default :data:`DEFAULT_QUERIES`) and zero-shot label list
        (default :data:`DEFAULT_LABELS`).
    speed_cells, speed_budget_s
        Held-out cells timed through both models; the teacher stops after ``speed_budget_s`` seconds.
    name
        Student name (default ``<teacher name>-fast``).
    progress
        tqdm progress bars.
    cancel
        Callable polled between teacher chunks and training batches; True raises
        :class:`~engine.errors.CancelledError` (finished chunks stay on disk).
    verbose
        Print the report.

    Returns
    -------
    dict
        The report (also ``out/distill_report.json``, ``out/MODEL_CARD.md`` and the student's
        ``config.json["metadata"]["distillation"]``): ``heldout_cosine_mean`` / ``_min`` (student vs teacher
        ``transcriptome_embeds``), ``baseline_cosine_mean`` (every cell predicted as the teacher's mean
        training embedding), ``query_spearman`` ({query: rho over held-out cells}), ``query_spearman_mean``,
        ``label_agreement`` (share of held-out cells with the same zero-shot argmax), ``speed``
        (``teacher_cells_per_s``, ``student_cells_per_s``, ``ratio``, ``cells``), ``teacher_chunks``
        (``computed``, ``reused``), ``history`` (per-epoch loss and held-out cosine), ``best_epoch``, ``out``.

    Raises
    ------
    CheckpointError
        ``teacher`` is not a model folder (or its files are broken).
    MatrixKindError
        The teacher needs raw counts and a data file has none.
    GeneIdentifierError
        No gene of a data file is in the teacher's vocabulary.
    EmptySelectionError
        A data file without cells, or fewer than two cells in all.
    ConfigError
        ``out`` is a file, holds a model or foreign files (without ``overwrite``); bad settings; CUDA asked
        for but absent.
    CancelledError
        When ``cancel()`` returns True.
    """
    import datetime

    import torch

    from .. import __version__
    from ..models.checkpoint import load_model, save_model
    from ..models.model import resolve_device

    out = Path(out).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else out / CACHE_DIR
    _check_out(out, overwrite, cache, [teacher, *([data] if isinstance(data, (str, os.PathLike)) else data)])
    if loss not in ("cosine", "mse"):
        raise ConfigError("Unknown distillation loss", found=repr(loss), expected="'cosine' or 'mse'")
    if not 0 < held_out < 1:
        raise ConfigError("The held-out fraction must be between 0 and 1", found=held_out, expected="e.g. 0.1")
    for label, v in (("epochs", epochs), ("batch_size", batch_size), ("chunk_size", chunk_size), ("speed_cells", speed_cells)):
        if int(v) < 1:
            raise ConfigError(f"{label} must be positive", found=v, expected=">= 1")
    dev = resolve_device(device)
    use_amp = bool(amp) and dev.type == "cuda"
    t_start = time.perf_counter()
    teacher_model = _load_teacher(teacher, dev)
    datasets = _read_data(data, teacher_model)
    n_total = sum(ds.X.shape[0] for ds in datasets)
    if n_total < 2:
        raise EmptySelectionError("Distillation needs at least two cells", found=f"{n_total} cell", expected="training and held-out cells")

    # 1. teacher embeddings, cached in chunks
    embeds, chunk_stats = _teacher_embeds(
        teacher_model, datasets, cache, chunk_size=int(chunk_size), amp=use_amp, batch_size=int(teacher_batch_size),
        progress=progress, cancel=cancel,
    )
    target = np.concatenate(embeds).astype(np.float32)

    # 2. student vocabulary, encodings, split
    tt = teacher_model.tokenizer
    length = int(max_length or max(1, tt.max_length - tt.n_special))
    tok = _student_tokenizer(teacher_model, datasets, length)
    ids, lengths = _encode_all(tok, datasets)
    rng = np.random.default_rng(int(seed))
    perm = rng.permutation(n_total)
    n_val = min(n_total - 1, max(1, int(round(held_out * n_total))))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    # 3. train
    student_name = name or f"{teacher_model.name}-fast"
    torch.manual_seed(int(seed))
    student, head_desc = _build_student(
        teacher_model, tok, hidden_size=hidden_size, n_layers=int(n_layers), mlp_ratio=float(mlp_ratio),
        dropout=float(dropout), token_dropout=float(token_dropout), name=student_name,
    )
    history, best_epoch = _train_student(
        student, ids, lengths, target, train_idx, val_idx, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
        weight_decay=float(weight_decay), loss=loss, centred_weight=float(centred_weight), seed=int(seed), amp=use_amp,
        progress=progress, cancel=cancel,
    )

    # 4. report on held-out cells
    s_val = _embed_ids(student, ids[val_idx], lengths[val_idx])
    t_val = target[val_idx]
    cos = np.sum(s_val * t_val, axis=1)
    mu = target[train_idx].mean(0)
    mean_t = mu / max(float(np.linalg.norm(mu)), 1e-12)

    def _unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    centred = np.sum(_unit(s_val - mu) * _unit(t_val - mu), axis=1)
    queries = list(queries or DEFAULT_QUERIES)
    labels = list(labels or DEFAULT_LABELS)
    agree = _agreement(s_val, t_val, student, queries, labels)
    starts = np.cumsum([0] + [ds.X.shape[0] for ds in datasets])
    first = next(i for i in range(len(datasets)) if ((val_idx >= starts[i]) & (val_idx < starts[i + 1])).any())
    rows = val_idx[(val_idx >= starts[first]) & (val_idx < starts[first + 1])][: int(speed_cells)] - starts[first]
    Xs, var_s = datasets[first].X[rows], datasets[first].var
    t_speed = throughput(teacher_model, Xs, var_s, batch_size=int(teacher_batch_size), budget_s=float(speed_budget_s), amp=use_amp)
    s_speed = throughput(student, Xs, var_s, min_s=0.5)
    report = {
        "teacher": {"name": teacher_model.name, "path": str(teacher), "fingerprint": teacher_model.fingerprint(),
                    "tower": teacher_model.transcriptome_tower.config().get("type")},
        "student": {"name": student_name, "path": str(out), "hidden_size": student.transcriptome_tower.hidden_size,
                    "n_layers": int(n_layers), "max_length": length, "n_genes": len(tok.gene_ids), "head": head_desc},
        "data": [str(ds.path) for ds in datasets],
        "n_cells": {"train": int(len(train_idx)), "held_out": int(len(val_idx))},
        "held_out_fraction": float(held_out), "seed": int(seed), "loss": loss, "epochs": int(epochs),
        "batch_size": int(batch_size), "lr": float(lr), "device": str(dev), "amp_used": use_amp,
        "best_epoch": int(best_epoch), "history": history, "teacher_chunks": chunk_stats,
        "heldout_cosine_mean": float(cos.mean()), "heldout_cosine_min": float(cos.min()),
        "baseline_cosine_mean": float((t_val @ mean_t).mean()),
        "heldout_centred_cosine_mean": float(centred.mean()), "centred_weight": float(centred_weight),
        **agree, "queries": queries, "labels": labels,
        "speed": {"cells": int(len(rows)), "teacher_cells_per_s": t_speed["cells_per_s"],
                  "student_cells_per_s": s_speed["cells_per_s"], "ratio": s_speed["cells_per_s"] / max(t_speed["cells_per_s"], 1e-12),
                  "teacher": t_speed, "student": s_speed},
        "date": datetime.date.today().isoformat(), "lexicell_version": __version__,
    }

    # 5. save the student, check that it loads back, write the card
    student.metadata["distillation"] = {k: report[k] for k in ("teacher", "data", "n_cells", "heldout_cosine_mean",
                                                               "query_spearman_mean", "label_agreement", "best_epoch", "date")}
    student.metadata["distillation"]["speed_ratio"] = report["speed"]["ratio"]
    save_model(student, out)
    back = load_model(out, device=dev)
    report["reload_max_abs_diff"] = float(np.abs(_embed_ids(back, ids[val_idx], lengths[val_idx]) - s_val).max())
    report["out"] = str(out)
    report["seconds"] = time.perf_counter() - t_start
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=float))
    (out / CARD_FILE).write_text(_model_card(report))
    if verbose:
        print(_format_report(report))
        print(f"wrote {out}/ (load it with engine.load_model({str(out)!r}); report in {CARD_FILE})")
    return report


# --------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.distill",
        description="Distil a slow transcriptome tower (e.g. converted CellWhisperer) into a fast sparse rank tower.",
    )
    p.add_argument("--teacher", type=Path, required=True, help="teacher model folder (python -m engine.convert output)")
    p.add_argument("--data", type=Path, action="append", required=True, help="cells to distil on (.h5ad ...); repeat for more files")
    p.add_argument("--out", type=Path, required=True, help="student model folder")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available (default)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (CPU never uses it)")
    p.add_argument("--cache-dir", type=Path, help="teacher-embedding cache (default OUT/teacher_embeds)")
    p.add_argument("--chunk-size", type=int, default=1024, help="cells per cached teacher chunk (default 1,024)")
    p.add_argument("--teacher-batch-size", type=int, default=64, help="cells per teacher forward pass (default 64)")
    p.add_argument("--hidden-size", type=int, help="student width (default: the teacher tower's, which reuses its head)")
    p.add_argument("--n-layers", type=int, default=2, help="student residual blocks (default 2)")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="student block width multiple (default 2)")
    p.add_argument("--token-dropout", type=float, default=0.0, help="fraction of gene tokens dropped in training (default 0)")
    p.add_argument("--max-length", type=int, help="student genes per cell (default: the teacher's)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--loss", choices=["cosine", "mse"], default="cosine", help="distillation loss (default cosine)")
    p.add_argument("--centred-weight", type=float, default=1.0,
                   help="weight of the centred-cosine term (embeddings minus the teacher's mean; default 1, 0: off)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of cells held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--query", action="append", help="report query (repeat; default: a fixed list of 8)")
    p.add_argument("--label", action="append", help="report zero-shot label (repeat; default: a fixed list of 8)")
    p.add_argument("--speed-cells", type=int, default=64, help="held-out cells timed through both models (default 64)")
    p.add_argument("--speed-budget", type=float, default=60.0, help="stop timing the teacher after this many seconds")
    p.add_argument("--name", help="student name (default: TEACHER-fast)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON too")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 (done), 1 (an engine error, printed) or 2 (usage error, including an
    ``--out`` that would replace an input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.label is not None and len(args.label) < 2:
        parser.error("--label needs at least two labels")
    try:  # --out over an input is a usage error (exit status 2): nothing was read or written
        out = args.out.expanduser()
        _check_not_input(out, args.cache_dir.expanduser() if args.cache_dir else out / CACHE_DIR,
                         [args.teacher, *args.data])
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = distill(
            args.teacher, args.data, args.out, overwrite=args.overwrite, device=args.device, amp=not args.no_amp,
            cache_dir=args.cache_dir, chunk_size=args.chunk_size, teacher_batch_size=args.teacher_batch_size,
            hidden_size=args.hidden_size, n_layers=args.n_layers, mlp_ratio=args.mlp_ratio, token_dropout=args.token_dropout,
            max_length=args.max_length, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
            centred_weight=args.centred_weight,
            held_out=args.held_out, seed=args.seed, queries=args.query, labels=args.label, speed_cells=args.speed_cells,
            speed_budget_s=args.speed_budget, name=args.name, progress=not args.no_progress,
        )
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2, default=float))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
