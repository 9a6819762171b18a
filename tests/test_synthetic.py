"""The synthetic noise study: known optimum (metric exactly 1.0), unbiased noise, agreement with the library's
losses, gradient bias of both losses, and short training runs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.losses.decomposable import (DecomposableContrastiveLoss, conventional_contrastive_loss,
                                                    conventional_terms, decomposable_terms)
from contrastive_repro.synthetic import (effective_negatives, gradient_bias, init_params, make_problem,
                                         minibatch_scores, noise_log_weights, train_run)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def problem():
    return make_problem(num_classes=16, num_frequencies=2, tau=0.5)


# ---------------------------------------------------------------------------------------------------------------
# the problem and its optimum
# ---------------------------------------------------------------------------------------------------------------
def test_problem_structure(problem):
    k = problem.num_classes
    assert torch.allclose(problem.mu.norm(dim=1), torch.ones(k, dtype=torch.float64))
    p_cond = problem.log_p_cond.exp()
    assert torch.allclose(p_cond.sum(1), torch.ones(k, dtype=torch.float64))
    assert torch.allclose(p_cond.mean(0), torch.full((k,), 1 / k, dtype=torch.float64))   # marginal of y uniform
    # PMI = <mu_x, mu_y>/tau + c_x: realizable by the model
    pmi = problem.log_p_cond + math.log(k)
    resid = pmi - problem.mu @ problem.mu.T / problem.tau
    assert torch.allclose(resid, resid[:, :1].expand_as(resid), atol=1e-12)
    mi = float((p_cond * pmi).sum(1).mean())
    assert problem.mutual_information == pytest.approx(mi) and mi > 0


def test_metric_is_exactly_one_at_the_optimum_and_zero_without_information(problem):
    f, g = problem.optimum()
    assert float(problem.metric(f, g)) == pytest.approx(1.0, abs=1e-12)
    rot, _ = torch.linalg.qr(torch.randn(problem.dim, problem.dim, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(0)))
    assert float(problem.metric(f @ rot, g @ rot)) == pytest.approx(1.0, abs=1e-12)   # rotation invariant
    const = torch.ones_like(f)
    assert float(problem.metric(const, const)) == pytest.approx(0.0, abs=1e-12)
    assert float(problem.generalized_loss(f, g)) == pytest.approx(problem.optimal_loss, abs=1e-12)


def test_loss_gap_is_expected_kl(problem):
    f, g = init_params(problem, [0, 1, 2])
    gap = problem.generalized_loss(f, g) - problem.optimal_loss
    log_q = torch.log_softmax(problem.scores(f, g), dim=-1)
    lp = problem.log_p_cond
    kl = (lp.exp() * (lp - log_q)).sum(-1).mean(-1)
    assert torch.allclose(gap, kl, atol=1e-12)
    assert (gap > 0).all()
    assert torch.allclose(problem.metric(f, g), 1 - kl / problem.mutual_information)
    # the optimum is a minimum: small perturbations lower the metric
    fo, go = problem.optimum()
    assert (problem.metric(fo + 0.05 * f, go + 0.05 * g) < 1.0).all()


def test_sample_pairs_follow_the_joint(problem):
    x, y = problem.sample_pairs(200, 1000, torch.Generator().manual_seed(1))
    k = problem.num_classes
    counts = torch.zeros(k, k, dtype=torch.float64).index_put_((x.flatten(), y.flatten()),
                                                              torch.ones(x.numel(), dtype=torch.float64),
                                                              accumulate=True)
    joint = problem.log_p_cond.exp() / k
    n = x.numel()
    z = (counts / n - joint) / torch.sqrt(joint * (1 - joint) / n)
    assert z.abs().max() < 5


# ---------------------------------------------------------------------------------------------------------------
# noise: mean-one weights; the noisy minibatch estimate of Z stays unbiased
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.5, 4.0, 64.0])
def test_noise_weights_have_mean_one_and_variance_noise(noise):
    lw = noise_log_weights((1_000_000,), noise, rng=3)
    w = lw.exp()
    assert abs(w.mean().item() - 1) < 5 * math.sqrt(noise / w.numel())
    if noise <= 4:
        assert w.var().item() == pytest.approx(noise, rel=0.05)
    assert torch.isfinite(lw).all()
    assert noise_log_weights((3,), 0.0) is None
    assert effective_negatives(65, 3.0) == 16.0


@pytest.mark.parametrize("noise", [0.0, 16.0])
def test_noisy_minibatch_estimate_of_z_is_unbiased(problem, noise):
    k, b, r = problem.num_classes, 8, 20_000
    f, g = init_params(problem, [4])
    gen = torch.Generator().manual_seed(5)
    x, y = problem.sample_pairs(r, b, gen)
    log_w = noise_log_weights((r, b, b), noise, rng=6)
    _, log_zhat = minibatch_scores(problem, f.expand(r, -1, -1), g.expand(r, -1, -1), x, y, log_w)
    z_true = torch.logsumexp(problem.scores(f[0], g[0]), dim=-1).exp() / k
    zhat = log_zhat.exp()
    for c in range(k):
        vals = zhat[x == c]
        se = vals.std() / math.sqrt(vals.numel())
        assert abs(vals.mean() - z_true[c]) < 5 * se + 1e-12, c


def test_minibatch_terms_agree_with_the_library_losses(problem):
    f, g = init_params(problem, [7])
    x, y = problem.sample_pairs(1, 10, torch.Generator().manual_seed(8))
    pos, log_zhat = minibatch_scores(problem, f, g, x, y)
    a, p = F.normalize(f[0], dim=-1)[x[0]], F.normalize(g[0], dim=-1)[y[0]]
    conv = conventional_contrastive_loss(a, p, problem.tau, normalize=False)
    assert torch.allclose(conventional_terms(pos, log_zhat).mean(), conv, rtol=1e-12)
    u = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5
    mod = DecomposableContrastiveLoss(10, tau=problem.tau, normalize=False).double()
    assert torch.allclose(decomposable_terms(pos, log_zhat, u.log()[None]).mean(), mod(a, p, u=u), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# gradient bias: the decomposable M-step (u = 1/Z) is unbiased, the conventional gradient is not
# ---------------------------------------------------------------------------------------------------------------
def test_gradient_bias_of_both_losses(problem):
    rel = {}
    for b in (4, 16):
        d_bias, d_se = gradient_bias("decomposable", b, n_draws=8000, noise=64.0, problem=problem, return_error=True)
        c_bias, c_se = gradient_bias("infonce", b, n_draws=8000, noise=64.0, problem=problem, return_error=True)
        assert d_bias < 4 * d_se, (b, d_bias, d_se)                  # unbiased: only Monte Carlo error
        assert c_bias > 6 * c_se, (b, c_bias, c_se)                  # biased
        rel[b] = c_bias
    assert rel[4] > rel[16]                                           # more bias for smaller batches
    assert gradient_bias("infonce", 16, n_draws=8000, noise=0.0, problem=problem) < rel[16]   # and less noise


def test_e_step_jensen_gap_shrinks_with_averaging(problem):
    """u = 1/Zbar with Zbar from one noisy batch is biased upwards (E[1/Zbar] > 1/Z); averaging 20 batches
    shrinks the gap to within Monte Carlo error."""
    one, se1 = gradient_bias("decomposable", 16, n_draws=1500, noise=4.0, problem=problem, e_step_batches=1,
                             return_error=True)
    many, se = gradient_bias("decomposable", 16, n_draws=1500, noise=4.0, problem=problem, e_step_batches=20,
                             return_error=True)
    assert one > 3 * se1, (one, se1)
    assert many < 0.5 * one and many < 3 * se, (one, many, se)


# ---------------------------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------------------------
def test_train_run_shapes_and_determinism(problem):
    kw = dict(noise=4.0, seed=[0, 1, 2], steps=60, batch_size=16, problem=problem, log_every=20)
    h = train_run("decomposable", **kw)
    assert h["metric"].shape == (3, 4) and h["loss"].shape == (3, 4)
    assert list(h["step"]) == [0, 20, 40, 60]
    assert np.allclose(h["final_metric"], h["metric"][:, -1])
    assert np.array_equal(train_run("decomposable", **kw)["metric"], h["metric"])
    assert np.isfinite(h["metric"]).all() and h["seconds"] > 0
    with pytest.raises(ValueError):
        train_run("nce", problem=problem)


def test_minibatch_e_step_reproduces_the_conventional_run(problem):
    """u = 1/Zhat of the same batch is exactly the conventional gradient: identical trajectories (same data)."""
    kw = dict(noise=16.0, seed=[3, 4], steps=40, batch_size=16, problem=problem, log_every=10)
    conv = train_run("infonce", **kw)
    dec = train_run("decomposable", z_estimate="minibatch", **kw)
    assert np.allclose(conv["metric"], dec["metric"], rtol=0, atol=1e-9)


def test_short_training_improves_both_losses_without_noise(problem):
    for loss in ("infonce", "decomposable"):
        h = train_run(loss, 0.0, seed=[0, 1], steps=300, batch_size=32, problem=problem, log_every=100)
        assert (h["final_metric"] > 0.9).all(), (loss, h["final_metric"])
        assert (h["metric"][:, -1] > h["metric"][:, 0]).all()


def test_noise_study_grid(problem):
    from contrastive_repro.synthetic import noise_study

    res = noise_study((0.0, 16.0), seeds=[0, 1], steps=20, batch_size=8, log_every=10,
                      problem_kwargs=dict(num_classes=16))
    assert set(res) == {(l, n) for l in ("infonce", "decomposable") for n in (0.0, 16.0)}
    single = train_run("decomposable", 16.0, seed=[0, 1], steps=20, batch_size=8, log_every=10, problem=problem)
    assert np.array_equal(res[("decomposable", 16.0)]["metric"], single["metric"])


# ---- notebook 01's arms, criterion and validation choice ------------------------------------------------------
from contrastive_repro.stats import PairedVerdict  # noqa: E402
from contrastive_repro.synthetic import (ARMS, arm_kwargs, arm_study, arm_summary, choose_momentum,  # noqa: E402
                                         curve_change, distance_from_optimum, one_batch_u_ratio,
                                         within_tolerance)


def test_arm_kwargs_and_unknown_arm():
    assert arm_kwargs("oracle") == ("decomposable", {"z_estimate": "exact", "e_step": "mean"})
    assert arm_kwargs("sampled")[1]["e_step"] == "sample"
    assert set(ARMS) == {"conventional", "decomposable", "sampled", "oracle"}
    with pytest.raises(ValueError, match="arm must be one of"):
        arm_kwargs("nope")


def test_tolerance_and_distance_by_hand():
    fm = [1.0, 0.995, 0.98, 1.02, 0.5]
    np.testing.assert_allclose(distance_from_optimum(fm), [0, 0.005, 0.02, 0.02, 0.5], atol=1e-12)
    assert within_tolerance(fm, 0.01) == 2
    assert within_tolerance(fm, 0.02 + 1e-12) == 4
    with pytest.raises(ValueError):
        within_tolerance(fm, 0.0)


def test_curve_change_uses_the_last_fraction():
    step = np.arange(0, 101, 10)                        # 0..100
    m = np.vstack([np.linspace(0, 1, 11), np.full(11, 0.7)])
    ch = curve_change(m, step, frac=0.25)                # nearest logged step to 75 is 70 (ties: first)
    np.testing.assert_allclose(ch, [1.0 - 0.7, 0.0], atol=1e-12)
    with pytest.raises(ValueError):
        curve_change(m, step[:-1])


def test_arm_summary_paired_direction():
    conv = [0.70, 0.68, 0.69, 0.71]
    dec = [0.999, 0.995, 1.003, 0.992]
    rows = {r["arm"]: r for r in arm_summary({"conventional": conv, "decomposable": dec}, tol=0.01)}
    assert rows["conventional"]["verdict"] is None and rows["conventional"]["within_tol"] == 0
    assert rows["decomposable"]["within_tol"] == 4
    v = rows["decomposable"]["verdict"]
    assert isinstance(v, PairedVerdict) and v.verdict == "reproduced"
    expected = np.mean(np.abs(np.array(dec) - 1) - np.abs(np.array(conv) - 1))
    assert v.effect == pytest.approx(expected)
    rows = {r["arm"]: r for r in arm_summary({"conventional": dec, "decomposable": conv}, tol=0.01)}
    assert rows["decomposable"]["verdict"].verdict == "opposite"


def test_arm_study_is_paired_and_matches_train_run(problem):
    kw = dict(steps=20, batch_size=8, lr=4.0, log_every=10)
    out = arm_study([("conventional", 4.0), ("oracle", 4.0)], [0, 1],
                    problem_kwargs=dict(num_classes=16, num_frequencies=2, tau=0.5), **kw)
    ref = train_run("decomposable", 4.0, seed=[0, 1], problem=problem, z_estimate="exact", **kw)
    np.testing.assert_allclose(out[("oracle", 4.0)]["final_metric"], ref["final_metric"], rtol=0, atol=1e-12)
    conv = train_run("infonce", 4.0, seed=[0, 1], problem=problem, **kw)
    np.testing.assert_allclose(out[("conventional", 4.0)]["final_metric"], conv["final_metric"], atol=1e-12)


def test_choose_momentum_picks_the_smallest_validation_distance(problem):
    kw = dict(steps=30, batch_size=8, lr=4.0, log_every=30)
    res = choose_momentum([0.0, 0.5], 2.0, [100, 101], problem=problem, **kw)
    for m, score in res["scores"].items():
        r = train_run("decomposable", 2.0, seed=[100, 101], problem=problem, momentum=m, **kw)
        assert score == pytest.approx(float(np.abs(r["final_metric"] - 1).mean()))
    assert res["chosen"] == min(res["scores"], key=res["scores"].get)
    with pytest.raises(ValueError):
        choose_momentum([1.0], 2.0, [100], problem=problem, **kw)


def test_one_batch_u_ratio_quantiles(problem):
    no_noise = one_batch_u_ratio(64, 0.0, n_draws=200, problem=problem)
    heavy = one_batch_u_ratio(8, 64.0, n_draws=200, problem=problem)
    assert no_noise["q"] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert np.all(np.diff(heavy["value"]) >= 0) and np.all(np.isfinite(heavy["value"]))
    assert abs(no_noise["value"][2] - 1.0) < 0.1               # many negatives: Zhat ~ Z
    assert heavy["value"][2] > 2.0                               # < 1 effective negative: Zhat mostly tiny
    assert heavy["value"][4] - heavy["value"][0] > no_noise["value"][4] - no_noise["value"][0]


# ---------------------------------------------------------------------------------------------------------------
# the batched grid (notebook 01): hand-written gradient, pairing, equivalence test, table and claims
# ---------------------------------------------------------------------------------------------------------------
def test_grid_backward_equals_autograd(problem):
    from contrastive_repro.synthetic import grid_backward, grid_forward

    g0 = torch.Generator().manual_seed(3)
    f, g = (torch.randn(4, problem.num_classes, problem.dim, generator=g0, dtype=torch.float64) for _ in range(2))
    x, y = problem.sample_pairs(4, 12, g0)
    log_w = noise_log_weights((4, 12, 12), 64.0, 5)
    coef = torch.rand(4, 12, generator=g0, dtype=torch.float64) + 0.5
    pos, log_zhat, cache = grid_forward(problem, f, g, x, y, log_w)
    fa, ga = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    pos_a, lz_a = minibatch_scores(problem, fa, ga, x, y, log_w)
    torch.testing.assert_close(pos, pos_a.detach())
    torch.testing.assert_close(log_zhat, lz_a.detach())
    # d/dlogZhat of coef * logZhat is coef: the hand-written gradient must match autograd of that surrogate
    total = (-pos_a + coef * lz_a).mean(dim=1).sum()
    want = torch.autograd.grad(total, (fa, ga))
    got = grid_backward(problem, cache, coef)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_train_grid_equals_train_run_and_splits_change_nothing(problem):
    from contrastive_repro.synthetic import arm_kwargs, train_grid

    seeds, kw = [0, 1], dict(steps=30, batch_size=12, lr=4.0, problem=problem, log_every=10)
    configs = [("conventional", 0.0, 0.8), ("decomposable", 16.0, 0.5), ("oracle", 16.0, 0.8),
               ("conventional", 16.0, 0.8), ("sampled", 16.0, 0.8)]
    grid = train_grid(configs, seeds, **kw)
    for arm, noise, m in configs[:4]:
        loss, extra = arm_kwargs(arm)
        ref = train_run(loss, noise, seed=seeds, momentum=m, **extra, **kw)
        np.testing.assert_allclose(grid[(arm, noise, m)]["metric"], ref["metric"], rtol=0, atol=1e-10)
    part = train_grid(configs[1:2], seeds, **kw)                     # one config alone: the same run
    np.testing.assert_allclose(part[configs[1]]["metric"], grid[configs[1]]["metric"], rtol=0, atol=1e-12)
    f32 = train_grid(configs[:1], seeds, dtype=torch.float32, **kw)
    np.testing.assert_allclose(f32[configs[0]]["final_metric"], grid[configs[0]]["final_metric"], atol=1e-4)
    with pytest.raises(ValueError, match="arm must be one of"):
        train_grid([("nope", 0.0, 0.5)], seeds, **kw)
    with pytest.raises(ValueError, match="momentum"):
        train_grid([("decomposable", 0.0, 1.0)], seeds, **kw)


def test_grid_study_processes_and_momentum_choice(problem):
    from contrastive_repro.synthetic import choose_momentum_grid, grid_study, train_grid

    kw = dict(steps=20, batch_size=12, lr=4.0, log_every=10)
    configs = [("decomposable", 0.0, 0.5), ("decomposable", 16.0, 0.5), ("conventional", 16.0, 0.5)]
    one = train_grid(configs, [0, 1], problem=make_problem(num_classes=16), **kw)
    two = grid_study(configs, [0, 1], problem_kwargs=dict(num_classes=16), workers=2, **kw)
    for c in configs:
        np.testing.assert_allclose(two[c]["metric"], one[c]["metric"], rtol=0, atol=1e-12)
    val = choose_momentum_grid([0.5, 0.9], 16.0, [7, 8], problem_kwargs=dict(num_classes=16), **kw)
    assert val["chosen"] == min(val["scores"], key=val["scores"].get) and set(val["scores"]) == {0.5, 0.9}


def test_equivalence_verdict_by_hand():
    from contrastive_repro.synthetic import equivalence_verdict

    a = np.array([0.002, 0.003, 0.002, 0.004])
    v = equivalence_verdict(a, a + np.array([0.0001, -0.0001, 0.0002, 0.0]), 0.01)
    assert v.verdict == "reproduced" and v.margin == 0.01 and -0.01 < v.ci_low < v.ci_high < 0.01
    assert equivalence_verdict(a, a + np.array([0.05, 0.051, 0.049, 0.05]), 0.01).verdict == "opposite"
    assert equivalence_verdict(a, a + np.array([0.0, 0.02, -0.01, 0.012]), 0.01).verdict == "inconclusive"
    with pytest.raises(ValueError, match="margin"):
        equivalence_verdict(a, a, 0.0)


def test_study_table_and_claims():
    from contrastive_repro.synthetic import study_claims, study_table

    step = [0, 50, 100]
    def curve(finals):
        return {"step": step, "metric": [[0.5, f, f] for f in finals]}
    near, far = [0.998, 0.997, 0.999, 0.998], [0.90, 0.91, 0.92, 0.90]
    curves = {("conventional", 0.0): curve(near), ("decomposable", 0.0): curve([0.998, 0.998, 0.998, 0.997]),
              ("oracle", 0.0): curve(near), ("conventional", 64.0): curve(far),
              ("decomposable", 64.0): curve(near), ("oracle", 64.0): curve(near)}
    rows = study_table(curves, ["conventional", "decomposable", "oracle"], [0.0, 64.0], tol=0.01, flat_tol=0.005,
                       flat_frac=0.25, alpha=0.05)
    by = {(r["arm"], r["noise"]): r for r in rows}
    assert by[("decomposable", 0.0)]["test"] == "equivalence" and by[("decomposable", 0.0)]["verdict"] == "reproduced"
    assert by[("decomposable", 64.0)]["test"] == "superiority" and by[("decomposable", 64.0)]["verdict"] == "reproduced"
    assert by[("conventional", 64.0)]["within_tol"] == 0 and by[("decomposable", 64.0)]["within_tol"] == 4
    claims, summary = study_claims(rows, tol=0.01, momentum=0.8, batch_size=8, steps=100, max_noise=64.0)
    ids = [c["id"] for c in claims]
    assert ids == ["dcl.synthetic.noise0.decomposable", "dcl.synthetic.noise64.decomposable",
                   "dcl.synthetic.noise64.oracle"]
    assert all(c["verdict"] == "reproduced" for c in claims)
    assert any(s.get("paper_key") == "dcl.synthetic_heavy_decomposable_converged" for s in summary)
    # an oracle outside tol on average makes the decomposable row uninformative
    curves[("oracle", 64.0)] = curve(far)
    rows = study_table(curves, ["conventional", "decomposable", "oracle"], [64.0], tol=0.01, flat_tol=0.005,
                       flat_frac=0.25)
    claims, _ = study_claims(rows, tol=0.01, momentum=0.8, batch_size=8, steps=100, max_noise=64.0)
    assert claims[0]["verdict"] == "uninformative" and claims[0]["test_verdict"] == "reproduced"
