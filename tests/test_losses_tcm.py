"""TCM loss: equality with pytorch-metric-learning (value and gradient), a loop reference, cross-batch, wrapper."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.losses.tcm import TCMLoss, WithTCM, add_tcm

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

LABEL_PATTERNS = {
    "random4": lambda n, g: torch.randint(0, 4, (n,), generator=g),
    "balanced": lambda n, g: torch.arange(n) % (n // 4),
    "all_distinct": lambda n, g: torch.arange(n),          # no positive pair
    "all_same": lambda n, g: torch.zeros(n, dtype=torch.long),  # no negative pair
    "imbalanced": lambda n, g: torch.tensor([0] * (n - 3) + [1, 2, 2]),
    "shuffled": lambda n, g: torch.randint(0, 3, (n,), generator=g)[torch.randperm(n, generator=g)],
}
# (pos_margin, neg_margin): defaults; margins that select part of each set; margins that select nothing / everything.
MARGINS = [(0.9, 0.5), (0.2, 0.1), (-1.5, 1.5), (1.5, -1.5)]


def _data(n=16, d=8, seed=0, pattern="random4", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=dtype)
    return emb, LABEL_PATTERNS[pattern](n, g)


def _value_and_grad(loss_fn, emb, labels):
    x = emb.clone().requires_grad_(True)
    out = loss_fn(x, labels)
    out = torch.as_tensor(out, dtype=emb.dtype)
    if out.requires_grad:
        (grad,) = torch.autograd.grad(out, x)
    else:
        grad = torch.zeros_like(x)
    return out.detach(), grad


def _loop_reference(emb, labels, m_pos, m_neg, w_pos=1.0, w_neg=1.0, ref=None, ref_labels=None):
    """Unordered pairs when the reference is the batch, all (batch, ref) pairs otherwise; python loops."""
    x = F.normalize(emb, dim=1)
    cross = ref is not None
    y = F.normalize(ref, dim=1) if cross else x
    yl = ref_labels if cross else labels
    pos_sum, pos_n, neg_sum, neg_n = 0.0, 0, 0.0, 0
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            if not cross and j <= i:
                continue
            s = torch.dot(x[i], y[j])
            if labels[i] == yl[j]:
                if s <= m_pos:
                    pos_sum, pos_n = pos_sum + (m_pos - s), pos_n + 1
            elif s >= m_neg:
                neg_sum, neg_n = neg_sum + (s - m_neg), neg_n + 1
    pos = pos_sum / pos_n if pos_n else 0.0
    neg = neg_sum / neg_n if neg_n else 0.0
    return w_pos * pos + w_neg * neg


@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
@pytest.mark.parametrize("margins", MARGINS)
def test_matches_pml_value_and_gradient(pattern, margins):
    m_pos, m_neg = margins
    seed = 10 * sorted(LABEL_PATTERNS).index(pattern) + MARGINS.index(margins)
    emb, labels = _data(n=20, d=6, seed=seed, pattern=pattern)
    ours = TCMLoss(pos_margin=m_pos, neg_margin=m_neg, pos_weight=0.7, neg_weight=1.3)
    theirs = pml_losses.ThresholdConsistentMarginLoss(lambda_plus=0.7, lambda_minus=1.3, margin_plus=m_pos,
                                                      margin_minus=m_neg)
    v1, g1 = _value_and_grad(ours, emb, labels)
    v2, g2 = _value_and_grad(theirs, emb, labels)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pattern", ["random4", "balanced", "imbalanced"])
def test_matches_loop_reference_unordered_pairs(pattern):
    # ordered (PML, ours) and unordered (the loop) pair counting give the same value
    emb, labels = _data(n=14, d=5, seed=3, pattern=pattern)
    for m_pos, m_neg in MARGINS[:2]:
        expected = _loop_reference(emb, labels, m_pos, m_neg, 2.0, 0.5)
        got = TCMLoss(m_pos, m_neg, 2.0, 0.5)(emb, labels)
        torch.testing.assert_close(got, torch.as_tensor(expected, dtype=emb.dtype))


def test_hand_computed_example():
    # three unit vectors at known angles: cos(a,b)=0.6 (positive pair), cos(a,c)=0.8, cos(b,c)=0.0 (negatives)
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, -0.6]], dtype=torch.float64) * torch.tensor([[2.0], [1.0], [3.0]],
                                                                                                   dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # hard positives (s <= 0.9): {0.6} -> 0.3 ; hard negatives (s >= 0.5): {0.8} -> 0.3
    torch.testing.assert_close(TCMLoss()(emb, labels), torch.tensor(0.6, dtype=torch.float64))
    torch.testing.assert_close(TCMLoss(pos_weight=2.0, neg_weight=0.0)(emb, labels),
                               torch.tensor(0.6, dtype=torch.float64))


def test_empty_sets_give_zero_and_finite_gradient():
    emb, labels = _data(n=8, pattern="all_distinct")
    x = emb.clone().requires_grad_(True)
    loss = TCMLoss(neg_margin=2.0)(x, labels)  # no positive pair, no negative above 2
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradcheck_float64():
    emb, labels = _data(n=10, d=4, seed=5, pattern="random4")
    loss = TCMLoss(pos_margin=0.3, neg_margin=-0.1)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (emb.clone().requires_grad_(True),))


def test_cross_batch_reference_matches_loop():
    emb, labels = _data(n=9, d=5, seed=7, pattern="random4")
    ref, ref_labels = _data(n=13, d=5, seed=8, pattern="random4")
    loss = TCMLoss(pos_margin=0.4, neg_margin=0.0)
    x = emb.clone().requires_grad_(True)
    r = ref.clone().requires_grad_(True)
    got = loss(x, labels, r, ref_labels)
    y = emb.clone().requires_grad_(True)
    q = ref.clone().requires_grad_(True)
    expected = _loop_reference(y, labels, 0.4, 0.0, ref=q, ref_labels=ref_labels)
    torch.testing.assert_close(got, expected)
    got.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(r.grad, q.grad)
    with pytest.raises(ValueError):
        loss(emb, labels, ref_embeddings=ref)


def test_scale_invariance_and_half_precision():
    emb, labels = _data(n=12, d=6, seed=2, pattern="balanced", dtype=torch.float32)
    loss = TCMLoss(0.5, 0.0)
    torch.testing.assert_close(loss(emb, labels), loss(3.0 * emb, labels))
    half = loss(emb.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, loss(emb, labels), rtol=0.05, atol=0.02)


def test_with_tcm_wrapper_sums_parts_and_exposes_parameters():
    emb, labels = _data(n=16, d=8, seed=4, pattern="balanced", dtype=torch.float32)
    base = pml_losses.ArcFaceLoss(num_classes=4, embedding_size=8)
    wrapped = WithTCM(base, TCMLoss(0.8, 0.2), weight=0.5)
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in base.parameters()}
    x = emb.clone().requires_grad_(True)
    total = wrapped(x, labels)
    parts = wrapped.last_parts
    torch.testing.assert_close(total.detach(), parts["base"] + 0.5 * parts["tcm"])
    torch.testing.assert_close(parts["base"], base(emb, labels).detach())
    torch.testing.assert_close(parts["tcm"], TCMLoss(0.8, 0.2)(emb, labels))
    assert {"tcm_pos", "tcm_neg", "tcm_hard_pos_pairs", "tcm_hard_neg_pairs", "total"} <= set(parts)
    total.backward()
    assert x.grad is not None and base.W.grad is not None
    w2 = add_tcm(base, weight=2.0, pos_margin=0.7)
    assert w2.weight == 2.0 and w2.tcm.pos_margin == 0.7


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        TCMLoss()(torch.randn(4, 3), torch.arange(5))


def test_nonfinite_and_integer_embeddings_are_named():
    from contrastive_repro.losses import TCMLoss
    from contrastive_repro.utils import NonFiniteError

    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for bad in (float("nan"), float("inf")):
        e = emb.clone()
        e[2, 1] = bad
        with pytest.raises(NonFiniteError, match="TCMLoss embeddings"):
            TCMLoss()(e, labels)
        with pytest.raises(NonFiniteError, match="TCMLoss ref_embeddings"):
            TCMLoss()(emb, labels, e, labels)
    with pytest.raises(TypeError, match="TCMLoss embeddings must be floating-point, got dtype torch.int64"):
        TCMLoss()(emb.long(), labels)
