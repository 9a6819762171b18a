"""Smooth-AP, Recall@k surrogate (loop references in float64, gradcheck, chunking) and the DML loss factory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.losses.dml import (DML_LOSS_NAMES, DMLLoss, build_dml_loss, has_learnable_parameters,
                                          needs_class_balanced_batches)
from contrastive_repro.losses.recall_surrogate import RecallAtKSurrogateLoss
from contrastive_repro.losses.smooth_ap import SmoothAPLoss
from contrastive_repro.losses.tcm import TCMLoss
from contrastive_repro.utils import NonFiniteError

LABELS = {
    "balanced": torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]),
    "interleaved": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]),
    "with_singletons": torch.tensor([5, 5, 7, 1, 1, 1, 1, 9, 3, 3]),  # 7 and 9 have no positive
    "all_same": torch.zeros(7, dtype=torch.long),
}


def _emb(n, d=6, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _value_and_grad(fn, emb, labels):
    x = emb.clone().requires_grad_(True)
    out = fn(x, labels)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


def _sims(emb):
    x = F.normalize(emb, dim=1)
    return [[torch.dot(x[i], x[j]) for j in range(len(x))] for i in range(len(x))]


def smooth_ap_loop(emb, labels, tau, include_query=False):
    s, n, aps = _sims(emb), len(labels), []
    for q in range(n):
        omega = [j for j in range(n) if include_query or j != q]
        pos = [j for j in omega if labels[j] == labels[q]]
        if not pos:
            continue
        total = 0.0
        for i in pos:
            r_pos = 1 + sum(torch.sigmoid((s[q][j] - s[q][i]) / tau) for j in pos if j != i)
            r_all = 1 + sum(torch.sigmoid((s[q][j] - s[q][i]) / tau) for j in omega if j != i)
            total = total + r_pos / r_all
        aps.append(total / len(pos))
    return 1 - sum(aps) / len(aps)


def recall_loop(emb, labels, ks, tau1s, tau2, include_query=False, clip=True):
    s, n, recalls = _sims(emb), len(labels), []
    for q in range(n):
        omega = [j for j in range(n) if include_query or j != q]
        pos = [j for j in omega if labels[j] == labels[q] and j != q]
        if not pos:
            continue
        ranks = [1 + sum(torch.sigmoid((s[q][z] - s[q][x]) / tau2) for z in omega if z != x) for x in pos]
        rq = 0.0
        for k, t1 in zip(ks, tau1s):
            num = sum(torch.sigmoid((k - r) / t1) for r in ranks)
            if clip:
                num = torch.clamp(num, max=float(k))
            rq = rq + num / min(k, len(pos))
        recalls.append(rq / len(ks))
    return 1 - sum(recalls) / len(recalls)


# ----------------------------------------------------------------------------------------------------- Smooth-AP

@pytest.mark.parametrize("pattern", sorted(LABELS))
@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("tau", [0.01, 0.1])
def test_smooth_ap_matches_loop_value_and_gradient(pattern, include_query, tau):
    labels = LABELS[pattern]
    emb = _emb(len(labels), seed=len(pattern))
    loss = SmoothAPLoss(temperature=tau, include_query=include_query)
    v1, g1 = _value_and_grad(loss, emb, labels)
    v2, g2 = _value_and_grad(lambda x, y: smooth_ap_loop(x, y, tau, include_query), emb, labels)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_smooth_ap_gradcheck():
    labels = LABELS["with_singletons"]
    loss = SmoothAPLoss(temperature=0.1)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (_emb(len(labels), 4, 1).requires_grad_(True),))


def test_smooth_ap_tends_to_exact_ap():
    labels = LABELS["with_singletons"]
    emb = _emb(len(labels), 5, 2)
    s = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T
    aps = []
    for q in range(len(labels)):
        others = [j for j in range(len(labels)) if j != q]
        order = sorted(others, key=lambda j: -s[q, j].item())
        rel = [bool(labels[j] == labels[q]) for j in order]
        if not any(rel):
            continue
        hits = [sum(rel[: r + 1]) / (r + 1) for r in range(len(rel)) if rel[r]]
        aps.append(sum(hits) / len(hits))
    exact = 1 - sum(aps) / len(aps)
    got = SmoothAPLoss(temperature=1e-7)(emb, labels).item()
    assert got == pytest.approx(exact, abs=1e-6)


def test_smooth_ap_perfect_embedding_is_near_zero():
    labels = torch.arange(4).repeat_interleave(3)
    emb = F.one_hot(labels, 8).double() + 0.01 * _emb(12, 8, 3)
    assert SmoothAPLoss()(emb, labels).item() < 1e-3


@pytest.mark.parametrize("classes,per_class", [(4, 4), (3, 3), (5, 5)])
def test_smooth_ap_matches_pml_when_it_applies(classes, per_class):
    # PML's SmoothAPLoss (like the authors' code) retrieves the query as a positive of itself, and it needs contiguous
    # class blocks with #classes == samples per class (its block size is batch // (batch // #classes)).
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = _emb(len(labels), 8, classes, dtype=torch.float32)
    v1, g1 = _value_and_grad(SmoothAPLoss(include_query=True), emb, labels)
    v2, g2 = _value_and_grad(pml_losses.SmoothAPLoss(temperature=0.01), emb, labels)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_cls", [SmoothAPLoss, RecallAtKSurrogateLoss])
def test_chunked_path_matches_single_pass(loss_cls):
    labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    emb = _emb(40, 8, 4)
    full = loss_cls()
    chunked = loss_cls(max_chunk_elements=1000)  # P ~ 15 -> ~ 1-2 queries per chunk, under checkpointing
    v1, g1 = _value_and_grad(full, emb, labels)
    v2, g2 = _value_and_grad(chunked, emb, labels)
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(chunked(emb, labels), v1)


@pytest.mark.parametrize("loss_cls", [SmoothAPLoss, RecallAtKSurrogateLoss])
def test_no_positive_anywhere_gives_zero_with_graph(loss_cls):
    x = _emb(6).requires_grad_(True)
    out = loss_cls()(x, torch.arange(6))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------- Recall@k surrogate

@pytest.mark.parametrize("pattern", sorted(LABELS))
@pytest.mark.parametrize("tau1,include_query", [(1.0, False), ("k", False), (1.0, True), ((0.5, 2.0, 3.0), False)])
def test_recall_matches_loop_value_and_gradient(pattern, tau1, include_query):
    labels = LABELS[pattern]
    emb = _emb(len(labels), seed=3 + len(pattern))
    ks = (1, 2, 4)
    loss = RecallAtKSurrogateLoss(ks=ks, tau1=tau1, tau2=0.01, include_query=include_query)
    v1, g1 = _value_and_grad(loss, emb, labels)
    v2, g2 = _value_and_grad(lambda x, y: recall_loop(x, y, ks, loss.tau1, 0.01, include_query), emb, labels)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_recall_clip_numerator_and_default_ks():
    labels = LABELS["all_same"]
    emb = _emb(len(labels), seed=9)
    for clip in (True, False):
        loss = RecallAtKSurrogateLoss(tau1=4.0, clip_numerator=clip)
        assert loss.ks == (1, 2, 4, 8, 16)
        expected = recall_loop(emb, labels, loss.ks, loss.tau1, 0.01, clip=clip)
        torch.testing.assert_close(loss(emb, labels), expected)
    # with a wide tau1 the unclipped numerator exceeds k, so clipping changes the value
    assert RecallAtKSurrogateLoss(tau1=4.0)(emb, labels) > RecallAtKSurrogateLoss(tau1=4.0, clip_numerator=False)(
        emb, labels)


def test_recall_gradcheck():
    labels = LABELS["with_singletons"]
    loss = RecallAtKSurrogateLoss(ks=(1, 2, 4), tau1=1.0, tau2=0.1)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (_emb(len(labels), 4, 5).requires_grad_(True),))


def test_recall_tends_to_hard_definition():
    # tiny temperatures: sum_x H(k - r(q, x)) / min(k, |P|) with the smooth step's H(0) = 1/2 at rank exactly k
    labels = LABELS["interleaved"]
    emb = _emb(len(labels), 5, 6)
    s = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T
    ks = (1, 2, 4)
    recalls = []
    for q in range(len(labels)):
        others = [j for j in range(len(labels)) if j != q]
        pos = [x for x in others if labels[x] == labels[q]]
        ranks = [1 + sum(1 for z in others if z != x and s[q, z] > s[q, x]) for x in pos]
        per_k = [min(k, sum(1.0 if r < k else 0.5 if r == k else 0.0 for r in ranks)) / min(k, len(pos)) for k in ks]
        recalls.append(sum(per_k) / len(ks))
    exact = 1 - sum(recalls) / len(recalls)
    got = RecallAtKSurrogateLoss(ks=ks, tau1=1e-6, tau2=1e-7)(emb, labels).item()
    assert got == pytest.approx(exact, abs=1e-6)


def test_recall_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RecallAtKSurrogateLoss(ks=(0, 1))
    with pytest.raises(ValueError):
        RecallAtKSurrogateLoss(ks=(1, 2), tau1=(1.0,))
    with pytest.raises(ValueError):
        RecallAtKSurrogateLoss(tau1="x")
    with pytest.raises(ValueError):
        SmoothAPLoss(temperature=0)


# -------------------------------------------------------------------------------------------------------- factory

def _batch(seed=0, classes=4, per_class=4, d=8):
    labels = torch.arange(classes).repeat_interleave(per_class)
    return _emb(len(labels), d, seed, dtype=torch.float32), labels


@pytest.mark.parametrize("name", DML_LOSS_NAMES)
@pytest.mark.parametrize("tcm", [False, True])
def test_factory_builds_every_loss(name, tcm):
    emb, labels = _batch()
    loss = build_dml_loss(name, num_classes=4, embedding_size=8, tcm=tcm)
    assert isinstance(loss, DMLLoss) and loss.name == name
    x = emb.clone().requires_grad_(True)
    out = loss(x, labels)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    params = list(loss.parameters())
    assert bool(params) == has_learnable_parameters(name) == (name in {"arcface", "proxy_anchor"})
    assert all(p.grad is not None for p in params)
    assert loss.needs_class_balanced_batches == needs_class_balanced_batches(name)
    if tcm:
        assert isinstance(loss.tcm, TCMLoss)
        parts = loss.last_parts
        torch.testing.assert_close(parts["total"], parts["base"] + parts["tcm"])
    else:
        assert loss.tcm is None and set(loss.last_parts) == {"total"}


def test_factory_options_and_errors():
    with pytest.raises(ValueError, match="smooth_ap.*recall_at_k.*arcface"):
        build_dml_loss("triplet")
    with pytest.raises(ValueError, match="num_classes"):
        build_dml_loss("arcface")
    with pytest.raises(ValueError):
        needs_class_balanced_batches("nope")
    with pytest.raises(ValueError):
        build_dml_loss("supcon", tcm_kwargs={"pos_margin": 0.8})
    assert {n for n in DML_LOSS_NAMES if needs_class_balanced_batches(n)} == {
        "smooth_ap", "recall_at_k", "contrastive", "multi_similarity", "supcon"}
    loss = build_dml_loss("Smooth-AP", temperature=0.05, tcm=True, tcm_weight=0.3, tcm_kwargs={"pos_margin": 0.8})
    assert loss.base_loss.temperature == 0.05 and loss.tcm.pos_margin == 0.8 and loss.loss.weight == 0.3
    assert build_dml_loss("recall_at_k", ks=(1, 4)).base_loss.ks == (1, 4)
    assert build_dml_loss("supcon").base_loss.temperature == 0.1


def test_factory_nan_guard():
    emb, labels = _batch()
    emb[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="smooth_ap"):
        build_dml_loss("smooth_ap", tcm=True)(emb, labels)
    out = build_dml_loss("smooth_ap", check_finite=False)(emb, labels)
    assert torch.isnan(out)
