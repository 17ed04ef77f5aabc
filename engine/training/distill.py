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

This module holds :func:`distill` and the command line; the steps live beside it:
:mod:`.distill_teacher` (inputs, the teacher-embedding cache), :mod:`.distill_student` (student vocabulary,
model and training) and :mod:`.distill_report` (agreement, speed, model card).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, EmptySelectionError, LexicellError
# every name of this module before the split stays importable from here
from .distill_report import _agreement, _format_report, _model_card, _spearman, throughput  # noqa: F401
from .distill_student import (  # noqa: F401
    _build_student,
    _embed_ids,
    _encode_all,
    _objective,
    _student_tokenizer,
    _train_student,
)
from .distill_teacher import (  # noqa: F401
    _OWN_FILES,
    CACHE_DIR,
    CARD_FILE,
    REPORT_FILE,
    _autocast,
    _check_not_input,
    _check_out,
    _Dataset,
    _load_teacher,
    _read_chunk,
    _read_data,
    _teacher_embeds,
    _teacher_key,
)

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
