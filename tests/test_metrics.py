"""Metrics on hand-built score matrices (engine.training.metrics)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.training.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    f1_macro,
    recall_at_k,
    retrieval_metrics,
    roc_auc_ovr,
    softmax,
    unique_index,
)


def test_perfect_scores():
    y = np.array([0, 1, 2, 0, 1, 2])
    scores = np.eye(3)[y] * 10
    m = classification_metrics(scores, y)
    assert m["roc_auc"] == 1.0 and m["accuracy"] == 1.0 and m["f1_macro"] == 1.0
    assert m["recall@1"] == m["recall@5"] == m["recall@10"] == 1.0
    assert m["n_items"] == 6 and m["n_classes_scored"] == 3 and m["note"] == ""
    assert (confusion_matrix(scores, y) == np.diag([2, 2, 2])).all()


def test_worst_scores():
    y = np.array([0, 1, 0, 1])
    scores = np.eye(2)[1 - y] * 5
    assert roc_auc_ovr(scores, y)[0] == 0.0
    assert accuracy(scores, y) == 0.0
    assert recall_at_k(scores, y, 2) == 1.0


def test_known_auc_binary_one_vs_rest():
    # class 0 vs rest with probabilities p0 = [0.9, 0.6, 0.7, 0.2]; positives: items 0, 1
    # pairs (pos, neg): (0.9>0.7), (0.9>0.2), (0.6<0.7), (0.6>0.2) -> AUC = 3/4 for both classes
    p0 = np.array([0.9, 0.6, 0.7, 0.2])
    probs = np.stack([p0, 1 - p0], axis=1)
    y = np.array([0, 0, 1, 1])
    auc, info = roc_auc_ovr(probs, y, probabilities=True)
    assert auc == pytest.approx(0.75)
    assert info["per_class"] == {0: pytest.approx(0.75), 1: pytest.approx(0.75)}


def test_auc_uses_softmax_of_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    y = rng.integers(0, 4, size=50)
    a, _ = roc_auc_ovr(logits, y)
    b, _ = roc_auc_ovr(softmax(logits, axis=1), y, probabilities=True)
    assert a == pytest.approx(b)
    from sklearn.metrics import roc_auc_score

    assert a == pytest.approx(roc_auc_score(y, softmax(logits, axis=1), multi_class="ovr", average="macro"))


def test_random_scores_are_near_chance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=4000)
    m = classification_metrics(rng.normal(size=(4000, 5)), y, ks=(1, 2))
    assert m["roc_auc"] == pytest.approx(0.5, abs=0.03)
    assert m["accuracy"] == pytest.approx(0.2, abs=0.03)
    assert m["recall@2"] == pytest.approx(0.4, abs=0.03)


def test_absent_class_is_skipped_with_note():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[3, 0, 0], [2, 1, 0], [0, 3, 1], [1, 2, 0]], dtype=float)
    m = classification_metrics(scores, y)
    assert m["n_classes_scored"] == 2 and m["skipped_classes"] == [2]
    assert "skipped 1 class" in m["note"]
    assert m["roc_auc"] == 1.0


def test_recall_at_k_and_f1_by_hand():
    y = np.array([0, 1, 2])
    scores = np.array([[3, 2, 1], [3, 2, 1], [3, 2, 1]], dtype=float)  # predicts class 0 always
    assert recall_at_k(scores, y, 1) == pytest.approx(1 / 3)
    assert recall_at_k(scores, y, 2) == pytest.approx(2 / 3)
    assert recall_at_k(scores, y, 3) == 1.0
    # f1: class0 precision 1/3 recall 1 -> 0.5; classes 1, 2 -> 0
    assert f1_macro(scores, y) == pytest.approx(0.5 / 3)
    cm = confusion_matrix(scores, y)
    assert cm.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_ties_count_against():
    y = np.array([0, 1])
    scores = np.zeros((2, 3))
    assert recall_at_k(scores, y, 1) == 0.0
    assert recall_at_k(scores, y, 3) == 1.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        accuracy(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError):
        accuracy(np.zeros((2, 2)), np.array([0, 2]))


def test_unique_index():
    texts, idx = unique_index(["a", "b", "a", "c"])
    assert texts == ["a", "b", "c"] and idx.tolist() == [0, 1, 0, 2]


def test_retrieval_perfect_and_duplicates():
    # 4 pairs, texts: a, b, a, c -> 3 unique texts; pairs 0 and 2 share "a" (both correct matches)
    _, ti = unique_index(["a", "b", "a", "c"])
    sim = np.eye(3)[ti]
    m = retrieval_metrics(sim, ti, ks=(1, 2))
    assert m["transcriptome_to_text_R@1"] == 1.0
    assert m["text_to_transcriptome_R@1"] == 1.0
    assert m["R@1"] == m["mean_R@1"] == 1.0
    assert m["n_pairs"] == 4 and m["n_texts"] == 3
    assert m["roc_auc"] == 1.0


def test_retrieval_by_hand():
    # 3 pairs, 3 unique texts; rows = transcriptomes
    sim = np.array(
        [
            [0.9, 0.1, 0.0],  # own text 0 ranked 1st
            [0.8, 0.3, 0.5],  # own text 1 ranked 3rd
            [0.2, 0.1, 0.7],  # own text 2 ranked 1st
        ]
    )
    ti = np.array([0, 1, 2])
    m = retrieval_metrics(sim, ti, ks=(1, 2, 3), auc=False)
    assert m["transcriptome_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["transcriptome_to_text_R@2"] == pytest.approx(2 / 3)
    assert m["transcriptome_to_text_R@3"] == 1.0
    # text -> transcriptome: text 0 column [0.9,0.8,0.2] own row 0 first; text 1 [0.1,0.3,0.1] own row 1
    # first; text 2 [0.0,0.5,0.7] own row 2 first
    assert m["text_to_transcriptome_R@1"] == 1.0
    assert "roc_auc" not in m


def test_retrieval_text_to_transcriptome_uses_best_own():
    # text 0 has two transcriptomes; one of them is top -> hit at k=1
    sim = np.array([[0.1, 0.3], [0.9, 0.2], [0.5, 0.8]])
    ti = np.array([0, 0, 1])
    m = retrieval_metrics(sim, ti, ks=(1,), auc=False)
    assert m["text_to_transcriptome_R@1"] == 1.0
    assert m["transcriptome_to_text_R@1"] == pytest.approx(2 / 3)
