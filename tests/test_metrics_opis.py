"""OPIS / epsilon-OPIS: a hand-worked example, a pure-Python loop reference, symmetry and edge cases."""
from __future__ import annotations

import math
from fractions import Fraction as F

import numpy as np
import pytest
import torch

from contrastive_repro.metrics import (epsilon_opis, epsilon_opis_from_utilities, opis, opis_from_utilities,
                                       utility)
from contrastive_repro.utils import NonFiniteError


# ---------------------------------------------------------------------------------------------------------------
# hand-worked example
# ---------------------------------------------------------------------------------------------------------------
# Six unit vectors in the plane at angles (degrees) 0, 20 | 50, 90 | 150, 200 with classes A | B | C.
# Cosine distance d = 1 - cos(delta). Positive pairs: A 0-20 (delta 20), B 50-90 (40), C 150-200 (50).
# Negative pairs (12), delta in degrees:
#   A-B: 0-50 (50), 0-90 (90), 20-50 (30), 20-90 (70)      A-C: 0-150 (150), 0-200 (160), 20-150 (130), 20-200 (180)
#   B-C: 50-150 (100), 50-200 (150), 90-150 (60), 90-200 (110)
# sorted negative deltas: 30 50 60 70 90 100 110 130 150 150 160 180.
# far_range = (1.5/11, 5.5/11), linear quantiles at positions (M-1) q = 1.5 and 5.5:
#   d_lo = (d(50) + d(60)) / 2 = (0.357212 + 0.5) / 2 = 0.428606   (delta ~ 55.2 deg)
#   d_hi = (d(100) + d(110)) / 2 = (1.173648 + 1.342020) / 2 = 1.257834  (delta ~ 104.9 deg)
# n_thresholds = 3: t = d_lo, (d_lo + d_hi)/2 = 0.843220 (delta ~ 81.0 deg), d_hi.
# All positive deltas (20, 40, 50) are <= 55.2 deg, so TPR = 1 for every class at every threshold.
# Each class has 2 x 4 = 8 negative pairs; negatives at or below the threshold:
#   t0 (55.2): A {30, 50} = 2, B {30, 50} = 2, C {} = 0         -> TNR 6/8, 6/8, 8/8
#   t1 (81.0): A {30, 50, 70} = 3, B {30, 50, 60, 70} = 4, C {60} = 1   -> TNR 5/8, 4/8, 7/8
#   t2 (104.9): A + {90} = 4, B + {90, 100} = 6, C + {100} = 2  -> TNR 4/8, 2/8, 6/8
# U = 2 TPR TNR / (TPR + TNR) = 2 TNR / (1 + TNR):
#   t0: 6/7, 6/7, 1        t1: 10/13, 2/3, 14/15        t2: 2/3, 2/5, 6/7
HAND_ANGLES = [0, 20, 50, 90, 150, 200]
HAND_LABELS = [0, 0, 1, 1, 2, 2]
HAND_U = [[F(6, 7), F(10, 13), F(2, 3)],
          [F(6, 7), F(2, 3), F(2, 5)],
          [F(1), F(14, 15), F(6, 7)]]
HAND_FAR = (1.5 / 11, 5.5 / 11)


def _hand_embeddings(dtype=torch.float64):
    a = torch.tensor(HAND_ANGLES, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], 1).to(dtype)


def test_opis_hand_example():
    det = opis(_hand_embeddings(), HAND_LABELS, far_range=HAND_FAR, n_thresholds=3, return_details=True)
    d = lambda deg: 1 - math.cos(math.radians(deg))  # noqa: E731
    assert det["calibration_range"][0] == pytest.approx((d(50) + d(60)) / 2, abs=1e-12)
    assert det["calibration_range"][1] == pytest.approx((d(100) + d(110)) / 2, abs=1e-12)
    np.testing.assert_allclose(det["tpr"], 1.0)
    np.testing.assert_allclose(det["tnr"], [[6 / 8, 5 / 8, 4 / 8], [6 / 8, 4 / 8, 2 / 8], [1, 7 / 8, 6 / 8]])
    np.testing.assert_allclose(det["utility"], np.array(HAND_U, dtype=float), atol=1e-12)
    # OPIS = mean over (class, threshold) of (U - class mean)^2:
    #   t0: mean 19/21, deviations -1/21, -1/21, 2/21            -> sum of squares 6/441
    #   t1: mean 154/195, deviations -4/195, -24/195, 28/195     -> 1376/38025
    #   t2: mean 202/315, deviations 8/315, -76/315, 68/315      -> 10464/99225
    expected = (F(6, 441) + F(1376, 38025) + F(10464, 99225)) / 9
    assert det["opis"] == pytest.approx(float(expected), abs=1e-12)
    assert float(expected) == pytest.approx(0.0172499, abs=1e-7)


def test_epsilon_opis_hand_example():
    # mean utilities: A (6/7 + 10/13 + 2/3)/3 = 0.764, B (6/7 + 2/3 + 2/5)/3 = 0.641, C 0.930 -> worst class B.
    # ceil(0.1 * 3) = 1 worst class; gap = mean(A, C) - B per threshold:
    #   t0: 13/14 - 6/7 = 1/14   t1: 166/195 - 2/3 = 12/65   t2: 16/21 - 2/5 = 38/105
    expected = (F(1, 14) + F(12, 65) + F(38, 105)) / 3
    det = epsilon_opis(_hand_embeddings(), HAND_LABELS, epsilon=0.1, far_range=HAND_FAR, n_thresholds=3,
                       return_details=True)
    assert det["epsilon_opis"] == pytest.approx(float(expected), abs=1e-12)
    assert list(det["worst_classes"]) == [1]
    # compare_to="all": gap = mean(A, B, C) - B = 19/21 - 6/7, 154/195 - 2/3, 202/315 - 2/5
    all_expected = ((F(19, 21) - F(6, 7)) + (F(154, 195) - F(2, 3)) + (F(202, 315) - F(2, 5))) / 3
    v = epsilon_opis(_hand_embeddings(), HAND_LABELS, far_range=HAND_FAR, n_thresholds=3, compare_to="all")
    assert v == pytest.approx(float(all_expected), abs=1e-12)
    # squared statistic
    sq = (F(1, 14) ** 2 + F(12, 65) ** 2 + F(38, 105) ** 2) / 3
    v = epsilon_opis(_hand_embeddings(), HAND_LABELS, far_range=HAND_FAR, n_thresholds=3, statistic="squared")
    assert v == pytest.approx(float(sq), abs=1e-12)


def test_utility_function():
    assert float(utility(1.0, 0.5)) == pytest.approx(2 / 3)
    assert float(utility(0.0, 0.0)) == 0.0
    assert float(utility(0.0, 1.0)) == 0.0
    # F-beta weighting: beta = 2 -> 5 tpr tnr / (4 tnr + tpr)
    assert float(utility(0.5, 1.0, beta=2.0)) == pytest.approx(5 * 0.5 / (4 + 0.5))
    assert opis_from_utilities([[1.0, 0.0], [1.0, 0.0]]) == 0.0
    assert opis_from_utilities([[1.0], [0.0]]) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------------
# pure-Python loop reference
# ---------------------------------------------------------------------------------------------------------------
def naive_scores(x, labels, far_range=(1e-2, 1e-1), n_thr=101, min_class_size=2, beta=1.0, reference="class_mean",
                 distance="cosine"):
    """Everything by loops over unordered pairs, straight from the definitions."""
    x = [list(map(float, row)) for row in x]
    labels = [int(v) for v in labels]
    n = len(x)

    def dist(a, b):
        if distance == "cosine":
            dot = sum(p * q for p, q in zip(a, b))
            na = math.sqrt(sum(p * p for p in a))
            nb = math.sqrt(sum(q * q for q in b))
            return 1.0 - dot / (na * nb)
        return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))

    pairs = [(i, j, dist(x[i], x[j])) for i in range(n) for j in range(i + 1, n)]
    negs = sorted(dd for i, j, dd in pairs if labels[i] != labels[j])

    def quantile(q):
        h = (len(negs) - 1) * q
        lo = int(math.floor(h))
        hi = min(lo + 1, len(negs) - 1)
        return negs[lo] + (h - lo) * (negs[hi] - negs[lo])

    d_lo, d_hi = quantile(far_range[0]), quantile(far_range[1])
    ts = [d_lo + k * (d_hi - d_lo) / (n_thr - 1) for k in range(n_thr)] if n_thr > 1 else [d_lo]
    classes = sorted(set(labels))
    kept = [c for c in classes if labels.count(c) >= min_class_size]

    def u(tp, tn):
        b2 = beta * beta
        den = b2 * tn + tp
        return 0.0 if den == 0 else (1 + b2) * tp * tn / den

    U = []
    for c in kept:
        row = []
        for t in ts:
            pos = [dd for i, j, dd in pairs if labels[i] == c and labels[j] == c]
            neg = [dd for i, j, dd in pairs if (labels[i] == c) != (labels[j] == c)]
            tpr = sum(dd <= t for dd in pos) / len(pos)
            tnr = sum(dd > t for dd in neg) / len(neg)
            row.append(u(tpr, tnr))
        U.append(row)
    if reference == "class_mean":
        ref = [sum(U[a][k] for a in range(len(kept))) / len(kept) for k in range(len(ts))]
    else:
        allpos = [dd for i, j, dd in pairs if labels[i] == labels[j]]
        ref = [u(sum(dd <= t for dd in allpos) / len(allpos), sum(dd > t for dd in negs) / len(negs)) for t in ts]
    o = sum((U[a][k] - ref[k]) ** 2 for a in range(len(kept)) for k in range(len(ts))) / (len(kept) * len(ts))
    return o, U, (d_lo, d_hi), len(negs)


def naive_eps(U, eps, rank_by="mean_utility", compare_to="rest", statistic="difference"):
    n_cls, n_thr = len(U), len(U[0])
    m = min(max(1, math.ceil(eps * n_cls - 1e-9)), n_cls - 1)
    vals = []
    order = sorted(range(n_cls), key=lambda a: sum(U[a]) / n_thr)
    for k in range(n_thr):
        if rank_by == "per_threshold":
            order = sorted(range(n_cls), key=lambda a: U[a][k])
        worst = [U[a][k] for a in order[:m]]
        other = [U[a][k] for a in order[m:]] if compare_to == "rest" else [U[a][k] for a in range(n_cls)]
        gap = sum(other) / len(other) - sum(worst) / len(worst)
        vals.append(gap if statistic == "difference" else gap * gap)
    return sum(vals) / n_thr


def _random_set(seed=0, n=41, d=5, n_cls=5):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, n_cls, (n,), generator=g)
    lab[0] = 99  # a class of one sample: no positive pairs, still a negative for everyone else
    centers = torch.randn(n_cls + 100, d, generator=g, dtype=torch.float64)
    x = centers[lab % (n_cls + 100)] * 0.8 + torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, lab


@pytest.mark.parametrize("seed", [0, 1])
def test_opis_matches_loop_reference(seed):
    x, lab = _random_set(seed)
    ref, U, rng, m = naive_scores(x.tolist(), lab.tolist())
    # thresholds at the range ends are strictly between two order statistics (no tie with a pair distance)
    assert ((m - 1) * 0.01) % 1 != 0 and ((m - 1) * 0.1) % 1 != 0
    det = opis(x, lab, return_details=True)
    assert abs(det["opis"] - ref) < 1e-10
    np.testing.assert_allclose(det["utility"], np.array(U), atol=1e-10, rtol=0)
    np.testing.assert_allclose(det["calibration_range"], rng, atol=1e-12)
    assert 99 not in det["classes"] and det["n_excluded_classes"] == 1
    assert det["opis"] > 1e-4  # not a degenerate example
    for kw in [dict(), dict(rank_by="per_threshold"), dict(compare_to="all"), dict(statistic="squared"),
               dict(epsilon=0.3, rank_by="per_threshold", compare_to="all", statistic="squared")]:
        eps = kw.pop("epsilon", 0.1)
        assert abs(epsilon_opis(x, lab, epsilon=eps, **kw) - naive_eps(U, eps, **kw)) < 1e-10


def test_opis_options_match_loop_reference():
    x, lab = _random_set(3)
    ref, U, _, _ = naive_scores(x.tolist(), lab.tolist(), far_range=(0.05, 0.3), n_thr=17, beta=2.0,
                                reference="global", min_class_size=6)
    v = opis(x, lab, far_range=(0.05, 0.3), n_thresholds=17, beta=2.0, reference="global", min_class_size=6)
    assert abs(v - ref) < 1e-10
    ref, U, _, _ = naive_scores(x.tolist(), lab.tolist(), distance="euclidean", n_thr=11)
    v = opis(x, lab, distance="euclidean", n_thresholds=11, chunk_size=7)
    assert abs(v - ref) < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# properties and edge cases
# ---------------------------------------------------------------------------------------------------------------
def _symmetric_classes(n_cls=6, seed=0):
    """Classes that are cyclic coordinate shifts of one base class: an orthogonal map takes every class (with its
    positives and its negatives) onto every other, so all utility curves coincide. Entries in {0, +-1} with four
    non-zeros make every normalized entry +-0.5 and every dot product exact, so no rounding breaks the symmetry."""
    rng = np.random.default_rng(seed)
    span, shift, m = 7, 2, 5
    dim = n_cls * shift
    base = np.zeros((m, dim))
    for i in range(m):
        idx = rng.choice(span, size=4, replace=False)
        base[i, idx] = rng.choice([-1.0, 1.0], size=4)
    x = np.concatenate([np.roll(base, c * shift, axis=1) for c in range(n_cls)])
    lab = np.repeat(np.arange(n_cls), m)
    return torch.tensor(x), torch.tensor(lab)


def test_perfectly_consistent_classes_give_zero():
    x, lab = _symmetric_classes()
    det = opis(x, lab, far_range=(0.05, 0.4), return_details=True)
    assert det["opis"] < 1e-20
    assert np.ptp(det["utility"], axis=0).max() < 1e-12  # identical curves...
    assert det["utility"].max() > 0.1  # ...that are not trivially zero
    assert epsilon_opis(x, lab, far_range=(0.05, 0.4)) < 1e-12
    # breaking the symmetry makes it positive
    x2 = x.clone()
    x2[:5] += 0.7 * torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    assert opis(x2, lab, far_range=(0.05, 0.4)) > 1e-4


def test_permutation_and_relabeling_invariance():
    x, lab = _random_set(5, n=60)
    v = opis(x, lab)
    e = epsilon_opis(x, lab)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    assert opis(x[perm], lab[perm]) == pytest.approx(v, abs=1e-12)
    assert epsilon_opis(x[perm], lab[perm]) == pytest.approx(e, abs=1e-12)
    assert opis(x, lab * 7 + 1000) == pytest.approx(v, abs=1e-12)
    # cosine distance ignores the scale of each embedding
    scale = torch.rand(60, 1, generator=torch.Generator().manual_seed(1), dtype=x.dtype) + 0.5
    assert opis(x * scale, lab) == pytest.approx(v, abs=1e-10)
    # numpy input and float32 input
    assert opis(x.numpy(), lab.numpy()) == pytest.approx(v, abs=1e-12)


def test_small_classes_are_excluded_but_count_as_negatives():
    x, lab = _random_set(2, n=30)
    det = opis(x, lab, return_details=True)
    assert 99 not in det["classes"]
    assert (det["class_sizes"] >= 2).all()
    # removing the singleton changes the negatives of the other classes, hence (in general) the score
    keep = lab != 99
    assert opis(x[keep], lab[keep]) != pytest.approx(det["opis"], abs=1e-12)
    det3 = opis(x, lab, min_class_size=8, return_details=True)
    assert (det3["class_sizes"] >= 8).all() and det3["n_excluded_classes"] > det["n_excluded_classes"]


def test_errors():
    x, lab = _random_set(0)
    x_bad = x.clone()
    x_bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        opis(x_bad, lab)
    x_bad[3, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        epsilon_opis(x_bad, lab)
    with pytest.raises(ValueError):
        opis(x, torch.zeros(len(x), dtype=torch.long))  # one class: no negatives
    with pytest.raises(ValueError):
        opis(x, torch.arange(len(x)))  # no class with 2 samples
    with pytest.raises(ValueError):
        opis(x, lab, far_range=(0.2, 0.1))
    with pytest.raises(ValueError):
        epsilon_opis(x, lab, epsilon=1.5)
    with pytest.raises(ValueError):
        epsilon_opis_from_utilities(np.ones((1, 5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_opis_cuda_matches_cpu():
    x, lab = _random_set(0, n=200)
    assert opis(x.cuda(), lab.cuda()) == pytest.approx(opis(x, lab), abs=1e-10)
