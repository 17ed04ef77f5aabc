"""Loss values on hand-computed cases (engine.training.losses)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.training.losses import clip_loss, combined_loss, jsd_loss, jsd_loss_from_logits, positive_mask


def _np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Row-wise cross-entropy with a target distribution per row."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -(targets * logp).sum(1)


def _sp(x):
    return math.log1p(math.exp(x))


def test_clip_loss_2x2_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = (_sp(-2.0) + _sp(-2.0)) / 2  # row 0: log(1+e^-2); row 1: log(1+e^(1-3))
    cols = (_sp(-1.0) + _sp(-3.0)) / 2  # col 0: [2, 1]; col 1: [0, 3]
    assert float(clip_loss(logits)) == pytest.approx((rows + cols) / 2, abs=1e-6)


def test_clip_loss_3x3_against_numpy():
    rng = np.random.default_rng(0)
    L = rng.normal(size=(3, 3)) * 3
    eye = np.eye(3)
    expected = (_np_ce(L, eye).mean() + _np_ce(L.T, eye).mean()) / 2
    assert float(clip_loss(torch.tensor(L))) == pytest.approx(expected, abs=1e-5)


def test_clip_loss_uniform_logits_is_log_b():
    for b in (2, 3, 7):
        assert float(clip_loss(torch.zeros(b, b))) == pytest.approx(math.log(b), abs=1e-6)


def test_clip_loss_perfect_alignment_is_small():
    assert float(clip_loss(torch.eye(4) * 50)) < 1e-6


def test_clip_loss_weights():
    rng = np.random.default_rng(1)
    L = rng.normal(size=(3, 3))
    w = np.array([1.0, 0.0, 3.0])
    eye = np.eye(3)
    r, c = _np_ce(L, eye), _np_ce(L.T, eye)
    expected = ((w * r).sum() / w.sum() + (w * c).sum() / w.sum()) / 2
    got = float(clip_loss(torch.tensor(L), weights=torch.tensor(w)))
    assert got == pytest.approx(expected, abs=1e-6)
    assert float(clip_loss(torch.tensor(L), weights=torch.ones(3))) == pytest.approx(float(clip_loss(torch.tensor(L))), abs=1e-6)


def test_soft_targets_duplicate_texts():
    # pairs 0 and 1 share a text: each is a positive of the other, targets spread uniformly
    L = np.array([[2.0, 1.5, -1.0], [1.0, 2.5, 0.0], [0.0, -0.5, 3.0]])
    T = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (_np_ce(L, T).mean() + _np_ce(L.T, T).mean()) / 2
    got = float(clip_loss(torch.tensor(L), groups=[7, 7, 3]))
    assert got == pytest.approx(expected, abs=1e-6)
    mask = positive_mask(torch.tensor([7, 7, 3]))
    assert float(clip_loss(torch.tensor(L), positives=mask)) == pytest.approx(expected, abs=1e-6)
    # a duplicate is no longer a negative: confusing the two duplicates costs less than with hard targets
    assert got != pytest.approx(float(clip_loss(torch.tensor(L))))


def test_soft_targets_all_same_text_has_no_gradient_towards_separation():
    L = torch.zeros(3, 3, requires_grad=True)
    loss = clip_loss(L, groups=[1, 1, 1])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(3), abs=1e-6)  # uniform targets over 3: entropy floor
    assert torch.allclose(L.grad, torch.zeros(3, 3), atol=1e-7)


def test_positive_mask_union_of_ids():
    text = torch.tensor([0, 0, 1, 2])
    group = torch.tensor([5, 6, 7, 7])
    m = positive_mask(text, group)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    assert torch.equal(positive_mask(None, n=3), torch.eye(3, dtype=torch.bool))
    # negative ids never match each other
    assert torch.equal(positive_mask(torch.tensor([-1, -1])), torch.eye(2, dtype=torch.bool))


def test_jsd_2x2_by_hand():
    s = torch.tensor([[2.0, -1.0], [0.5, 1.0]])
    pos = (_sp(-2.0) + _sp(-1.0)) / 2
    neg = (_sp(-1.0) + _sp(0.5)) / 2
    assert float(jsd_loss_from_logits(s)) == pytest.approx(pos + neg, abs=1e-6)


def test_jsd_from_embeddings_and_groups():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    scale = 2.0
    S = (t @ x.T * scale).numpy().astype(float)
    pos = [S[i, i] for i in range(3)]
    neg = [S[i, j] for i in range(3) for j in range(3) if i != j]
    expected = np.mean([_sp(-v) for v in pos]) + np.mean([_sp(v) for v in neg])
    assert float(jsd_loss(t, x, scale=scale)) == pytest.approx(expected, abs=1e-5)
    # groups: pairs 1 and 2 are mutual positives
    P = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=bool)
    expected_g = np.mean([_sp(-v) for v in S[P]]) + np.mean([_sp(v) for v in S[~P]])
    assert float(jsd_loss(t, x, scale=scale, groups=[0, 1, 1])) == pytest.approx(expected_g, abs=1e-5)


def test_jsd_single_group_has_no_negative_term():
    s = torch.ones(2, 2)
    assert float(jsd_loss_from_logits(s, groups=[0, 0])) == pytest.approx(_sp(-1.0), abs=1e-6)


def test_combined_loss_weights_and_parts():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]], requires_grad=True)
    out = {"logits_per_transcriptome": logits}
    c = float(clip_loss(logits.detach()))
    j = float(jsd_loss_from_logits(logits.detach()))
    assert float(combined_loss(out).detach()) == pytest.approx(c)
    total, parts = combined_loss(out, clip_weight=0.5, jsd_weight=2.0, return_parts=True)
    assert float(total.detach()) == pytest.approx(0.5 * c + 2.0 * j, abs=1e-6)
    assert parts == pytest.approx({"clip": c, "jsd": j})
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_clip_loss_rejects_non_square():
    with pytest.raises(ValueError):
        clip_loss(torch.zeros(2, 3))
