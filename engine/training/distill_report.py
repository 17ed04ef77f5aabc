"""The distillation report: student vs teacher on held-out cells, speed, and the student's model card.

Agreement is the cosine between the two models' cell embeddings (plain and centred on the teacher's mean),
the Spearman correlation of query scores over a fixed query list, and zero-shot label agreement; speed is
:func:`throughput` of both models on the same cells in the same run (rank encoding, tower and head).
"""
from __future__ import annotations

import time

import numpy as np

from .distill_teacher import _autocast

__all__ = ["throughput"]


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
