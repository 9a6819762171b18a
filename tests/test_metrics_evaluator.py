"""The one-pass streaming evaluator against the exact metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_repro.metrics import (StreamingRetrievalEvaluator, epsilon_opis_from_utilities, evaluate_retrieval,
                                       map_at_r, opis, recall_at_k)
from contrastive_repro.utils import NonFiniteError


def make_data(kind: str, n: int = 900, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    if kind == "random":  # isotropic: all classes overlap
        lab = torch.randint(0, 25, (n,), generator=g)
        x = torch.randn(n, d, **f64)
    elif kind == "clustered":
        lab = torch.randint(0, 25, (n,), generator=g)
        x = 4 * torch.randn(25, d, **f64)[lab] + torch.randn(n, d, **f64)
    elif kind == "imbalanced":  # Zipf class sizes, per-class spread: inconsistent thresholds
        p = torch.arange(1, 41, dtype=torch.float64) ** -1.0
        lab = torch.multinomial(p, n, replacement=True, generator=g)
        spread = 0.5 + 2 * torch.rand(40, **f64)
        x = 3 * torch.randn(40, d, **f64)[lab] + spread[lab, None] * torch.randn(n, d, **f64)
    else:
        raise ValueError(kind)
    lab[:2] = torch.tensor([1000, 1001])  # two classes of one sample (lone queries; negatives only)
    return x, lab


def test_recall_and_map_at_r_equal_the_exact_functions():
    x, lab = make_data("clustered", n=500, seed=1)
    x32 = x.float()
    exact_r = recall_at_k(x32, lab, ks=(1, 2, 4, 8, 16))
    exact_map = map_at_r(x32, lab)
    for chunk in (None, 101, 7):
        res = evaluate_retrieval(x32, lab, ks=(1, 2, 4, 8, 16), chunk_size=chunk, compute_opis=chunk != 7)
        assert {k: res[k] for k in exact_r} == exact_r
        assert res["MAP@R"] == pytest.approx(exact_map, abs=1e-12)
        assert res["n_queries"] == len(lab) - 2
    # lone queries counted as misses when asked
    res = evaluate_retrieval(x32, lab, ks=(1,), exclude_lone_queries=False, compute_opis=False)
    assert res["R@1"] == recall_at_k(x32, lab, ks=(1,), exclude_lone_queries=False)["R@1"]


@pytest.mark.parametrize("kind", ["random", "clustered", "imbalanced"])
def test_streaming_opis_within_its_error_bound(kind):
    x, lab = make_data(kind, n=700)
    det = opis(x, lab, return_details=True)
    exact, exact_eps = det["opis"], epsilon_opis_from_utilities(det["utility"])
    for n_bins in (200, 2000):
        res = evaluate_retrieval(x.float(), lab, n_bins=n_bins)
        err = abs(res["OPIS"] - exact)
        assert err <= res["opis_error_bound"], (n_bins, err, res["opis_error_bound"])
        # a bound that means something: it shrinks with the bin width
        if n_bins == 2000:
            assert res["opis_error_bound"] < 2.5e-3
            assert abs(res["eps_OPIS"] - exact_eps) < 1e-3  # no bound for epsilon-OPIS; empirically close
    if kind != "imbalanced":
        return
    # the other reference and an F-beta utility are covered by the same bound
    kw = dict(reference="global", beta=2.0, far_range=(0.02, 0.2), n_thresholds=51)
    res = evaluate_retrieval(x.float(), lab, n_bins=1000, **kw)
    assert abs(res["OPIS"] - opis(x, lab, **kw)) <= res["opis_error_bound"]


def test_histograms_are_exact_in_float64():
    x, lab = make_data("imbalanced", n=300, seed=3)
    nb = 500
    hists = []
    for chunk in (3, 29, None):  # <= 4 class runs per chunk (one bincount per run), mixed, all runs in one chunk
        ev = StreamingRetrievalEvaluator(n_bins=nb, chunk_size=chunk)
        ev.update(x, lab)  # float64 input -> float64 compute
        ev.compute()
        hists.append(ev.histograms)
    h = hists[0]
    # independent computation of the same counts
    xn = torch.nn.functional.normalize(x, dim=1)
    dist = (1.0 - xn @ xn.T).numpy()
    bins = np.clip(np.floor(dist / (2.0 / nb)), 0, nb - 1).astype(int)
    classes = h["classes"].numpy()
    li = np.searchsorted(classes, lab.numpy())
    n = len(lab)
    iu, ju = np.triu_indices(n, 1)
    same = li[iu] == li[ju]
    pos = np.zeros((len(classes), nb), np.int64)
    neg = np.zeros((len(classes), nb), np.int64)
    np.add.at(pos, (li[iu][same], bins[iu, ju][same]), 1)
    np.add.at(neg, (li[iu][~same], bins[iu, ju][~same]), 1)
    np.add.at(neg, (li[ju][~same], bins[iu, ju][~same]), 1)
    for h in hists:
        np.testing.assert_array_equal(h["pos"].numpy(), pos)
        np.testing.assert_array_equal(h["neg"].numpy(), neg)
    sizes = h["class_sizes"].numpy()
    np.testing.assert_array_equal(pos.sum(1), sizes * (sizes - 1) // 2)
    np.testing.assert_array_equal(neg.sum(1), sizes * (n - sizes))


def test_batched_updates_bf16_and_order():
    x, lab = make_data("clustered", n=400, seed=4)
    x32 = x.float()
    whole = evaluate_retrieval(x32, lab)
    ev = StreamingRetrievalEvaluator()
    for part in torch.arange(400).split(150):
        ev.update(x32[part], lab[part])
    assert ev.compute() == whole
    ev.reset()
    with pytest.raises(ValueError):
        ev.compute()
    # bf16 embeddings are evaluated in float32
    xb = x32.to(torch.bfloat16)
    assert evaluate_retrieval(xb, lab) == evaluate_retrieval(xb.float(), lab)
    # the input order does not matter (up to the rounding of the distances at bin edges)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    shuffled = evaluate_retrieval(x32[perm], lab[perm])
    for k in ("R@1", "R@2", "R@4", "R@8"):
        assert shuffled[k] == whole[k]
    assert shuffled["MAP@R"] == pytest.approx(whole["MAP@R"], abs=1e-12)
    assert shuffled["OPIS"] == pytest.approx(whole["OPIS"], abs=1e-6)


def test_options_and_errors():
    x, lab = make_data("clustered", n=200, seed=5)
    res = evaluate_retrieval(x.float(), lab, compute_opis=False, compute_map_at_r=False, ks=(1, 3))
    assert set(res) == {"R@1", "R@3", "n_queries", "n_classes"}
    res = evaluate_retrieval(x.float(), lab, epsilon=None)
    assert "eps_OPIS" not in res and "OPIS" in res
    bad = x.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        evaluate_retrieval(bad, lab)
    with pytest.raises(ValueError):
        evaluate_retrieval(x, torch.arange(len(x)))  # every class has one sample
    with pytest.raises(ValueError):
        StreamingRetrievalEvaluator(n_bins=1)
    for bad_kw in (dict(far_range=(0.5, 0.1)), dict(epsilon=2.0), dict(rank_by="best"), dict(reference="x")):
        with pytest.raises(ValueError):
            StreamingRetrievalEvaluator(**bad_kw)  # rejected before any work
    # no class big enough for OPIS: the retrieval metrics survive, OPIS is None
    with pytest.warns(RuntimeWarning):
        res = evaluate_retrieval(x.float(), lab, min_class_size=10_000)
    assert res["OPIS"] is None and res["eps_OPIS"] is None and res["R@1"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, lab = make_data("imbalanced", n=600, seed=6)
    cpu = evaluate_retrieval(x.float(), lab)
    gpu = evaluate_retrieval(x.float().cuda(), lab.cuda())
    for k in ("R@1", "R@2", "R@4", "R@8"):
        assert gpu[k] == cpu[k]
    assert gpu["MAP@R"] == pytest.approx(cpu["MAP@R"], abs=1e-9)
    assert gpu["OPIS"] == pytest.approx(cpu["OPIS"], abs=cpu["opis_error_bound"])
    assert evaluate_retrieval(x.cuda().to(torch.bfloat16), lab.cuda())["R@1"] > 0


@pytest.mark.parametrize("kind, opts", [("random", {}), ("clustered", {"rank_by": "per_threshold"}),
                                        ("imbalanced", {"compare_to": "all"}), ("imbalanced", {})])
def test_streaming_epsilon_opis_within_its_error_bound(kind, opts):
    from contrastive_repro.metrics import epsilon_opis

    x, lab = make_data(kind, n=600, seed=3)
    exact = epsilon_opis(x, lab, **opts)
    for n_bins in (300, None):
        res = evaluate_retrieval(x.float(), lab, n_bins=n_bins, **opts)
        assert abs(res["eps_OPIS"] - exact) <= res["eps_OPIS_error_bound"], (n_bins, res["eps_OPIS"], exact)
    assert evaluate_retrieval(x.float(), lab, statistic="squared")["eps_OPIS_error_bound"] is None


def test_automatic_bins_tighten_the_bound_at_small_n_and_keep_2000_at_large_n():
    from contrastive_repro.metrics.evaluator import auto_bins

    assert auto_bins(100_000, 1000) == 2000 and auto_bins(20_001, 10) == 2000
    assert auto_bins(1000, 50) == 32768  # 16 B x 50 x 32768 = 25 MiB
    assert auto_bins(20_000, 500) == (64 << 20) // (16 * 500) and auto_bins(5000, 10**6) == 2000
    x, lab = make_data("imbalanced", n=800, seed=4)
    exact = opis(x, lab)
    fixed, auto = evaluate_retrieval(x.float(), lab, n_bins=2000), evaluate_retrieval(x.float(), lab)
    assert auto["n_bins"] > 2000 and abs(auto["OPIS"] - exact) <= auto["opis_error_bound"]
    assert auto["opis_error_bound"] < fixed["opis_error_bound"] / 4
