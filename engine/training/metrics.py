"""Evaluation metrics on score matrices (pure numpy / scikit-learn).

Two families:

- **Classification** of items (cells, class-mean embeddings) against a label set, from a score matrix
  ``(n_items, n_classes)`` and the true class index of each item: macro ROC-AUC one-vs-rest on softmax
  probabilities (seed 000 appendix D), accuracy, macro F1, recall@k (true class among the top k) and the
  confusion matrix.
- **Retrieval** for paired data (seed 000 appendix B; Radford et al. 2021): transcriptome -> text and
  text -> transcriptome recall@k over *unique* texts, so that pairs with identical texts count as correct
  matches (a perfect model cannot tell identical texts apart).

Ranks are pessimistic: a candidate tied with the true one counts as ranked above it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "softmax",
    "roc_auc_ovr",
    "accuracy",
    "f1_macro",
    "recall_at_k",
    "confusion_matrix",
    "classification_metrics",
    "retrieval_metrics",
    "unique_index",
]

DEFAULT_KS = (1, 5, 10)


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float64)."""
    z = np.asarray(scores, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _check(scores, y_true) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise ValueError(f"scores must be (n_items, n_classes) with one true class per item; got {scores.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= scores.shape[1]):
        raise ValueError(f"true class indices must lie in 0..{scores.shape[1] - 1}")
    return scores, y


def roc_auc_ovr(scores: np.ndarray, y_true: np.ndarray, *, probabilities: bool = False) -> tuple[float, dict]:
    """Macro-averaged one-vs-rest ROC-AUC.

    Parameters
    ----------
    scores
        ``(n_items, n_classes)`` logits (a softmax over classes is applied first, as CellWhisperer does) or
        probabilities when ``probabilities=True``.
    y_true
        ``(n_items,)`` int true class index.

    Returns
    -------
    (float, dict)
        The macro AUC over the classes that can be scored (NaN if none) and a dict with ``per_class``
        (class index -> AUC) and ``skipped`` (class indices absent from ``y_true``, or present in every
        item, for which one-vs-rest AUC is undefined).
    """
    from sklearn.metrics import roc_auc_score

    scores, y = _check(scores, y_true)
    probs = scores if probabilities else softmax(scores, axis=1)
    per_class, skipped = {}, []
    for c in range(scores.shape[1]):
        pos = y == c
        if pos.all() or not pos.any():
            skipped.append(c)
            continue
        per_class[c] = float(roc_auc_score(pos, probs[:, c]))
    auc = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return auc, {"per_class": per_class, "skipped": skipped}


def accuracy(scores: np.ndarray, y_true: np.ndarray) -> float:
    """Fraction of items whose top-scoring class is the true one."""
    scores, y = _check(scores, y_true)
    return float((scores.argmax(1) == y).mean()) if y.size else float("nan")


def f1_macro(scores: np.ndarray, y_true: np.ndarray) -> float:
    """Macro F1 of the top-1 predictions over the classes present in ``y_true`` or predicted."""
    from sklearn.metrics import f1_score

    scores, y = _check(scores, y_true)
    if not y.size:
        return float("nan")
    return float(f1_score(y, scores.argmax(1), average="macro", zero_division=0))


def _ranks_of_true(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    true = scores[np.arange(y.size), y]
    return (scores >= true[:, None]).sum(1) - 1  # 0 = best; ties count against


def recall_at_k(scores: np.ndarray, y_true: np.ndarray, k: int) -> float:
    """Fraction of items whose true class is among their ``k`` best-scoring classes."""
    scores, y = _check(scores, y_true)
    return float((_ranks_of_true(scores, y) < k).mean()) if y.size else float("nan")


def confusion_matrix(scores: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts, rows = true class, columns = predicted (top-1) class."""
    scores, y = _check(scores, y_true)
    n = scores.shape[1]
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (y, scores.argmax(1)), 1)
    return m


def classification_metrics(
    scores: np.ndarray,
    y_true: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    probabilities: bool = False,
) -> dict:
    """All classification metrics of a score matrix.

    Parameters
    ----------
    scores
        ``(n_items, n_classes)`` logits (or probabilities with ``probabilities=True``).
    y_true
        ``(n_items,)`` int true class index.
    ks
        The k of recall@k.

    Returns
    -------
    dict
        ``roc_auc`` (macro one-vs-rest on softmax probabilities), ``accuracy``, ``f1_macro``,
        ``recall@k`` for each k, ``n_items``, ``n_classes_scored`` (classes with an AUC) and ``note`` (which
        classes were skipped for AUC, or ``""``). All values are plain Python numbers / strings.
    """
    scores, y = _check(scores, y_true)
    auc, info = roc_auc_ovr(scores, y, probabilities=probabilities)
    out = {
        "n_items": int(y.size),
        "roc_auc": auc,
        "accuracy": accuracy(scores, y),
        "f1_macro": f1_macro(scores, y),
    }
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(scores, y, int(k))
    out["n_classes_scored"] = len(info["per_class"])
    out["note"] = (
        f"ROC-AUC skipped {len(info['skipped'])} class(es) absent from the true labels (or the only class)"
        if info["skipped"]
        else ""
    )
    out["skipped_classes"] = [int(c) for c in info["skipped"]]
    return out


def unique_index(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique texts in first-seen order and the ``(n,)`` int64 index of each text into them."""
    uniq: dict[str, int] = {}
    idx = np.fromiter((uniq.setdefault(t, len(uniq)) for t in texts), dtype=np.int64, count=len(texts))
    return list(uniq), idx


def retrieval_metrics(
    similarity: np.ndarray,
    text_index: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    auc: bool = True,
    max_auc_texts: int = 5000,
) -> dict:
    """Cross-modal retrieval recall@k of paired data, over unique texts.

    Parameters
    ----------
    similarity
        ``(n_pairs, n_unique_texts)`` scores of every transcriptome against every *unique* text (cosine or
        logits).
    text_index
        ``(n_pairs,)`` int index of each pair's text into the unique texts (see :func:`unique_index`).
    ks
        The k of recall@k.
    auc
        Also report the macro one-vs-rest ROC-AUC of transcriptome -> text (softmax over texts), skipped
        when there are more than ``max_auc_texts`` unique texts.

    Returns
    -------
    dict
        - ``transcriptome_to_text_R@k``: fraction of transcriptomes whose own text is among the k best texts
          (identical texts are one candidate, so duplicates count as correct matches);
        - ``text_to_transcriptome_R@k``: fraction of unique texts for which one of their transcriptomes is
          among the k best transcriptomes;
        - ``mean_R@k``: the mean of both; ``R@k``: alias of ``transcriptome_to_text_R@k`` (appendix B's
          model-selection metric);
        - ``roc_auc`` (when computed), ``n_pairs``, ``n_texts``.
    """
    s = np.asarray(similarity, dtype=np.float64)
    ti = np.asarray(text_index, dtype=np.int64).reshape(-1)
    n, m = s.shape
    if ti.shape[0] != n or (n and (ti.min() < 0 or ti.max() >= m)):
        raise ValueError("text_index must give one valid unique-text index per pair")
    out: dict = {"n_pairs": int(n), "n_texts": int(m)}
    if n == 0:
        return out
    # transcriptome -> text: rank of own text among unique texts
    r_x2t = _ranks_of_true(s, ti)
    # text -> transcriptome: best own transcriptome vs all others
    own_score = s[np.arange(n), ti]
    best_own = np.full(m, -np.inf)
    np.maximum.at(best_own, ti, own_score)  # best score of each text's own transcriptomes
    present = np.bincount(ti, minlength=m) > 0
    n_own_at_best = np.bincount(ti, weights=(own_score >= best_own[ti]).astype(np.float64), minlength=m)
    r_t2x = ((s >= best_own[None, :]).sum(0) - n_own_at_best)[present]  # other transcriptomes ranked >= best own
    for k in ks:
        a = float((r_x2t < k).mean())
        b = float((r_t2x < k).mean())
        out[f"transcriptome_to_text_R@{k}"] = a
        out[f"text_to_transcriptome_R@{k}"] = b
        out[f"mean_R@{k}"] = (a + b) / 2
        out[f"R@{k}"] = a
    if auc and 2 <= m <= max_auc_texts:
        out["roc_auc"] = roc_auc_ovr(s, ti)[0]
    return out
