"""Decomposable contrastive loss (stochastic EM): exactness at u = 1/Z, gamma sampler, unbiasedness vs the biased
conventional loss, persistent state (state_dict / torch.save), 2-rank gloo equality with one process, NaN guard."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from contrastive_repro.io import atomic_torch_save
from contrastive_repro.losses.decomposable import (DecomposableContrastiveLoss, conventional_contrastive_loss,
                                                    ema_log, sample_gamma)
from contrastive_repro.utils import NonFiniteError

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _feats(b=6, d=5, seed=0, dtype=DT, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=dtype) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# naive loop references (positive excluded from the denominator; Z_i is a mean over the negatives)
# ---------------------------------------------------------------------------------------------------------------
def _loop_terms(a, p, tau, negs=None):
    """[(s_ii/tau, [s_ij/tau for j in N_i])] for the anchor->positive direction, by explicit loops."""
    a, p = F.normalize(a, dim=1), F.normalize(p, dim=1)
    out = []
    for i in range(a.shape[0]):
        pool = [p[j] for j in range(p.shape[0]) if j != i] if negs is None else list(F.normalize(negs, dim=1))
        out.append((a[i] @ p[i] / tau, torch.stack([a[i] @ n / tau for n in pool])))
    return out


def _loop_conventional(a, p, tau, negs=None, symmetric=False):
    dirs = [_loop_terms(a, p, tau, negs)] + ([_loop_terms(p, a, tau)] if symmetric else [])
    vals = [-s + torch.log(torch.exp(ls).mean()) for d in dirs for s, ls in d]
    return torch.stack(vals).mean()


def _loop_log_z(a, p, tau, negs=None, symmetric=False):
    dirs = [_loop_terms(a, p, tau, negs)] + ([_loop_terms(p, a, tau)] if symmetric else [])
    return torch.stack([torch.stack([torch.log(torch.exp(ls).mean()) for _, ls in d]) for d in dirs])


def _grad(fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    return out.detach(), torch.autograd.grad(out, xs)


# ---------------------------------------------------------------------------------------------------------------
# (a) exactness: u_i = 1/Z_i on the same negatives -> the InfoNCE (conventional-form) gradient
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_conventional_loss_matches_loop(symmetric, tau):
    a, p = _feats(b=5, seed=1)
    ref = _loop_conventional(a, p, tau, symmetric=symmetric)
    assert torch.allclose(conventional_contrastive_loss(a, p, tau, symmetric=symmetric), ref, rtol=1e-12)


def test_conventional_is_cross_entropy_without_positive():
    """l_CE_i = -s_ii + log(exp(s_ii) + n Zhat_i), n = B - 1 (CLIP's image->text cross-entropy)."""
    a, p = _feats(b=6, seed=2)
    tau, n = 0.2, 5
    conv = conventional_contrastive_loss(a, p, tau, reduction="none")[0]
    log_z = _loop_log_z(a, p, tau)[0]
    s = (F.normalize(a, dim=1) * F.normalize(p, dim=1)).sum(1) / tau
    ce_from_conv = -s + torch.logaddexp(s, log_z + math.log(n))
    logits = F.normalize(a, dim=1) @ F.normalize(p, dim=1).T / tau
    ce = F.cross_entropy(logits, torch.arange(6), reduction="none")
    assert torch.allclose(ce_from_conv, ce, rtol=1e-12)
    assert torch.allclose(conv, -s + log_z, rtol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("explicit_negatives", [False, True])
def test_u_at_exact_inverse_z_gives_infonce_gradient(symmetric, explicit_negatives):
    a, p, negs = _feats(b=6, d=4, seed=3, n=3)
    negs = negs[:5] if explicit_negatives else None
    tau = 0.3
    kw = {} if negs is None else {"negatives_anchor": negs, "negatives_positive": negs if symmetric else None}
    ref_negs = None if negs is None else negs
    if symmetric and explicit_negatives:
        conv = lambda x, y: 0.5 * (_loop_conventional(x, y, tau, negs) + _loop_conventional(y, x, tau, negs))
        log_z = torch.stack([_loop_log_z(a, p, tau, negs)[0], _loop_log_z(p, a, tau, negs)[0]])
    else:
        conv = lambda x, y: _loop_conventional(x, y, tau, ref_negs, symmetric)
        log_z = _loop_log_z(a, p, tau, ref_negs, symmetric)
    u = torch.exp(-log_z)                                         # exact 1/Z_i, from the loop reference
    loss_mod = DecomposableContrastiveLoss(10, tau=tau, symmetric=symmetric).double()
    v_ref, g_ref = _grad(conv, a, p)
    v, g = _grad(lambda x, y: loss_mod(x, y, torch.arange(6), u=u, **kw), a, p)
    for x, y in zip(g, g_ref):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-13)
    # value: mean_i(-s_ii/tau + u_i Z_i) with u_i Z_i = 1
    s = (F.normalize(a, dim=1) * F.normalize(p, dim=1)).sum(1) / tau
    assert torch.allclose(v, (1 - s).mean(), rtol=1e-12)
    assert not loss_mod.seen.any()                                  # u given: no E-step, no state change
    assert torch.allclose(loss_mod.last_stats["conventional"], v_ref, rtol=1e-12)


def test_minibatch_e_step_reproduces_infonce_gradient_exactly():
    """z_estimate='minibatch', e_step='mean': u_i = 1/Zhat_i of the same batch, i.e. the conventional gradient."""
    a, p = _feats(b=7, seed=4)
    mod = DecomposableContrastiveLoss(7, tau=0.2, z_estimate="minibatch", symmetric=True).double()
    _, g_ref = _grad(lambda x, y: conventional_contrastive_loss(x, y, 0.2, symmetric=True), a, p)
    _, g = _grad(lambda x, y: mod(x, y, torch.arange(7)), a, p)
    for x, y in zip(g, g_ref):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-13)


def test_shape_parameter_scales_the_uniformity_gradient():
    """E[u] = a/Z: the gradient is that of -s_ii/tau + a log Z_i."""
    a, p = _feats(b=5, seed=5)
    tau, shape = 0.25, 2.5
    mod = DecomposableContrastiveLoss(5, shape=shape, tau=tau, z_estimate="minibatch").double()
    _, g = _grad(lambda x, y: mod(x, y, torch.arange(5)), a, p)

    def ref(x, y):
        s = (F.normalize(x, dim=1) * F.normalize(y, dim=1)).sum(1) / tau
        return (-s + shape * _loop_log_z(x, y, tau)[0]).mean()

    _, g_ref = _grad(ref, a, p)
    for x, y in zip(g, g_ref):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("offset,g_mult,both", [(0, 1, True), (0, 1, False), (4, 2, False), (8, 3, False)])
def test_fused_in_batch_log_mean_exp_matches_autograd(offset, g_mult, both):
    from contrastive_repro.losses.decomposable import _InBatchLogMeanExp

    x, c = _feats(b=4, d=3, seed=30)[0], _feats(b=4 * g_mult, d=3, seed=31)[0]
    x.requires_grad_(True)
    c.requires_grad_(True)
    mask = torch.zeros(4, 4 * g_mult, dtype=torch.bool)
    mask[torch.arange(4), torch.arange(4) + offset] = True

    def ref(x, c):
        logits = (x @ c.T).masked_fill(mask, float("-inf"))
        r = torch.logsumexp(logits, 1) - math.log(c.shape[0] - 1)
        return (r, torch.logsumexp(logits, 0) - math.log(c.shape[0] - 1)) if both else (r,)

    def fused(x, c):
        r, col = _InBatchLogMeanExp.apply(x, c, offset, both)
        return (r, col) if both else (r,)

    for a, b in zip(fused(x, c), ref(x, c)):
        assert torch.allclose(a, b, rtol=1e-12)
    w = [torch.randn(4, dtype=DT), torch.randn(4 * g_mult, dtype=DT)]
    g = torch.autograd.grad(sum((o * wi[: o.shape[0]]).sum() for o, wi in zip(fused(x, c), w)), (x, c))
    g_ref = torch.autograd.grad(sum((o * wi[: o.shape[0]]).sum() for o, wi in zip(ref(x, c), w)), (x, c))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(lambda x, c: fused(x, c)[0], (x, c))


def test_gradcheck_with_fixed_u():
    a, p = _feats(b=4, d=3, seed=6)
    u = torch.tensor([[0.3, 1.2, 0.7, 2.0], [1.1, 0.4, 0.9, 0.5]], dtype=DT)
    mod = DecomposableContrastiveLoss(4, tau=0.5, symmetric=True).double()
    assert torch.autograd.gradcheck(lambda x, y: mod(x, y, u=u),
                                    (a.requires_grad_(True), p.requires_grad_(True)))


def test_learnable_temperature_gradient_matches_infonce():
    a, p = _feats(b=6, seed=7)
    log_z = _loop_log_z(a, p, 0.3)

    def run(fn):
        t = torch.tensor(0.3, dtype=DT, requires_grad=True)
        fn(t).backward()
        return t.grad

    g_conv = run(lambda t: conventional_contrastive_loss(a, p, t))
    g_dec = run(lambda t: DecomposableContrastiveLoss(6, tau=t).double()(a, p, u=torch.exp(-log_z[0])))
    assert torch.allclose(g_dec, g_conv, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# (b) the gamma sampler
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("rate", [0.2, 1.0, 7.0])
def test_gamma_sampler_moments(shape, rate):
    torch.manual_seed(11)
    n = 400_000
    r = torch.full((n,), rate, dtype=DT)
    u = sample_gamma(shape, r)
    mean, var = shape / rate, shape / rate ** 2
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt((2 + 6 / shape) / n)                  # Var of the sample variance (kurtosis 3+6/a)
    assert abs(u.mean().item() - mean) < 5 * se_mean
    assert abs(u.var().item() - var) < 5 * se_var
    log_u = sample_gamma(shape, log_rate=torch.log(r), log=True)
    assert abs(log_u.exp().mean().item() - mean) < 5 * se_mean
    assert abs(log_u.mean().item() - (torch.digamma(torch.tensor(shape)).item() - math.log(rate))) < 0.02


def test_sample_e_step_draws_gamma_around_inverse_z():
    """The module's e_step='sample' draws u_i ~ Gamma(a, rate=Zbar_i)."""
    torch.manual_seed(12)
    n, shape = 20_000, 2.0
    a, p = _feats(b=2, seed=8)
    a, p = a[:1].expand(n, -1), p[:1].expand(n, -1)
    negs = _feats(b=3, seed=9)[0]
    mod = DecomposableContrastiveLoss(n, shape=shape, tau=0.5, e_step="sample", z_estimate="minibatch").double()
    mod(a, p, torch.arange(n), negatives_anchor=negs)
    z = torch.exp(_loop_log_z(a[:1], p[:1], 0.5, negs)[0, 0])
    u = mod.u[0]
    assert abs(u.mean().item() - shape / z.item()) < 5 * math.sqrt(shape / z.item() ** 2 / n)
    assert abs(u.var().item() - shape / z.item() ** 2) < 5 * (shape / z.item() ** 2) * math.sqrt(5 / n)


# ---------------------------------------------------------------------------------------------------------------
# (c) unbiasedness of the M-step gradient vs the bias of the conventional minibatch gradient
# ---------------------------------------------------------------------------------------------------------------
def _pool_problem(seed=13, k=3, n_pool=24, d=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, generator=g, dtype=DT)
    p = a + 0.5 * torch.randn(k, d, generator=g, dtype=DT)
    pool = torch.randn(n_pool, d, generator=g, dtype=DT)
    pool[:3] = a[0] + 0.3 * torch.randn(3, d, generator=g, dtype=DT)   # a few hard negatives: Z has a heavy part
    return a, p, pool


def _minibatch_grads(kind, a, p, pool, tau, b, n_draws, log_u_full, seed):
    """Per-draw gradients (flattened over anchors, positives and pool) for ``n_draws`` random subsets of ``b``
    pool negatives, vectorized with torch.func over the library's functional pieces (the module computes the same:
    checked on a few draws in the test)."""
    from torch.func import grad, vmap

    from contrastive_repro.losses.decomposable import conventional_terms, decomposable_terms, log_mean_exp

    def loss(x, y, z, idx):
        x, y, z = F.normalize(x, dim=1), F.normalize(y, dim=1), F.normalize(z, dim=1)
        s_pos = (x * y).sum(1) / tau
        log_zhat = log_mean_exp(x @ z[idx].T / tau, dim=1)
        if kind == "decomposable":
            return decomposable_terms(s_pos, log_zhat, log_u_full).mean()
        return conventional_terms(s_pos, log_zhat).mean()

    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_draws, pool.shape[0], generator=g).argsort(dim=1)[:, :b]
    ga, gp, gz = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0))(a, p, pool, idx)
    return torch.cat([ga.flatten(1), gp.flatten(1), gz.flatten(1)], dim=1), idx


def test_decomposable_minibatch_gradient_is_unbiased_and_conventional_is_biased():
    tau = 0.2
    a, p, pool = _pool_problem()
    log_z = _loop_log_z(a, p, tau, pool)[0]
    # full-pool gradient of the generalized loss (the conventional form on the whole pool is the exact loss)
    _, g_full = _grad(lambda x, y, z: conventional_contrastive_loss(x, y, tau, negatives_anchor=z), a, p, pool)
    g_full = torch.cat([t.reshape(-1) for t in g_full])
    n_draws = 20_000
    bias = {}
    for b in (2, 4, 8):
        stats = {}
        for kind in ("decomposable", "conventional"):
            grads, idx = _minibatch_grads(kind, a, p, pool, tau, b, n_draws, -log_z, seed=b)
            # the vectorized per-draw gradient is the module's / the library function's gradient
            for t in range(2):
                negs = pool[idx[t]]
                if kind == "decomposable":
                    mod = DecomposableContrastiveLoss(3, tau=tau).double()
                    _, gm = _grad(lambda x, y, z: mod(x, y, negatives_anchor=z, u=torch.exp(-log_z)), a, p, negs)
                else:
                    _, gm = _grad(lambda x, y, z: conventional_contrastive_loss(x, y, tau, negatives_anchor=z),
                                  a, p, negs)
                gz = torch.zeros_like(pool).index_add_(0, idx[t], gm[2])
                assert torch.allclose(torch.cat([gm[0].flatten(), gm[1].flatten(), gz.flatten()]), grads[t],
                                      rtol=1e-9, atol=1e-12)
            mean = grads.mean(0)
            se = math.sqrt(grads.var(0).sum().item() / n_draws)        # Monte Carlo error of the mean (norm)
            err = (mean - g_full).norm().item()
            err_small = (grads[: n_draws // 25].mean(0) - g_full).norm().item()
            stats[kind] = (err, se, err_small)
        err, se, err_small = stats["decomposable"]
        assert err < 3 * se, (b, err, se)                            # unbiased: error is Monte Carlo error only
        assert err / g_full.norm() < 0.05
        assert err < err_small                                         # and shrinks with more draws
        err_c, se_c, _ = stats["conventional"]
        assert err_c > 10 * se_c, (b, err_c, se_c)                     # biased: far beyond Monte Carlo error
        bias[b] = err_c / g_full.norm().item()
        print(f"B={b}: decomposable rel. err {err / g_full.norm():.4f} (MC se {se / g_full.norm():.4f}); "
              f"conventional rel. bias {bias[b]:.4f} (MC se {se_c / g_full.norm():.4f})")
    assert bias[2] > bias[4] > bias[8]                                 # bias grows as the batch shrinks


# ---------------------------------------------------------------------------------------------------------------
# state: E-step bookkeeping, state_dict, checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_running_estimate_is_an_ema_and_first_visit_initializes():
    a1, p1, a2, p2 = _feats(b=4, seed=14, n=4)
    tau, m = 0.5, 0.8
    mod = DecomposableContrastiveLoss(10, tau=tau, momentum=m).double()
    idx = torch.tensor([1, 3, 5, 7])
    mod(a1, p1, idx)
    z1 = torch.exp(_loop_log_z(a1, p1, tau)[0])
    assert torch.allclose(mod.z[0, idx], z1, rtol=1e-12)
    assert torch.allclose(mod.u[0, idx], 1 / z1, rtol=1e-12)
    assert mod.seen[0, idx].all() and mod.seen.sum() == 4 and int(mod.step) == 1
    mod(a2, p2, idx)
    z2 = torch.exp(_loop_log_z(a2, p2, tau)[0])
    assert torch.allclose(mod.z[0, idx], m * z1 + (1 - m) * z2, rtol=1e-12)
    assert torch.allclose(mod.u[0, idx], 1 / (m * z1 + (1 - m) * z2), rtol=1e-12)
    assert (mod.last_update[0, idx] == 1).all() and int(mod.step) == 2
    assert torch.allclose(ema_log(torch.log(z1), torch.log(z2), m), torch.log(m * z1 + (1 - m) * z2))


def test_symmetric_state_is_separate_per_direction():
    a, p = _feats(b=5, seed=15)
    mod = DecomposableContrastiveLoss(5, tau=0.3, symmetric=True).double()
    mod(a, p, torch.arange(5))
    ref = _loop_log_z(a, p, 0.3, symmetric=True)
    assert mod.log_z.shape == (2, 5)
    assert torch.allclose(mod.log_z, ref, rtol=1e-12)
    assert not torch.allclose(mod.log_z[0], mod.log_z[1])


def test_independent_e_step_uses_its_own_negatives():
    a, p, e = _feats(b=5, seed=16, n=3)
    mod = DecomposableContrastiveLoss(5, tau=0.3, z_estimate="independent").double()
    mod(a, p, torch.arange(5), estimate_negatives_anchor=e)
    assert torch.allclose(mod.log_z[0], _loop_log_z(a, p, 0.3, e)[0], rtol=1e-12)
    with pytest.raises(ValueError):
        mod(a, p, torch.arange(5))
    with pytest.raises(ValueError):
        DecomposableContrastiveLoss(5, z_estimate="minibatch")(a, p, torch.arange(5), estimate_negatives_anchor=e)
    with pytest.raises(ValueError):
        DecomposableContrastiveLoss(5)(a, p)                          # running needs indices


def test_eval_mode_does_not_touch_state():
    a, p = _feats(b=4, seed=17)
    mod = DecomposableContrastiveLoss(4, tau=0.3).double().eval()
    mod(a, p, torch.arange(4))
    assert not mod.seen.any() and int(mod.step) == 0
    mod(a, p, torch.arange(4), update_state=True)
    assert mod.seen.all()


def _train_steps(mod, steps, seed, n=12, b=4, d=5):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:b]
        a = torch.randn(b, d, generator=g, dtype=DT)
        p = a + 0.3 * torch.randn(b, d, generator=g, dtype=DT)
        losses.append(mod(a, p, idx).detach())
    return torch.stack(losses)


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    mod = DecomposableContrastiveLoss(12, tau=0.2, symmetric=True, momentum=0.7).double()
    _train_steps(mod, 5, seed=0)
    sd = mod.state_dict()
    assert set(sd) == {"log_z", "log_u", "last_update", "step"}
    fresh = DecomposableContrastiveLoss(12, tau=0.2, symmetric=True, momentum=0.7).double()
    fresh.load_state_dict(sd)
    path = atomic_torch_save({"loss_state": mod.state_dict()}, tmp_path / "ckpt.pt")
    from_disk = DecomposableContrastiveLoss(12, tau=0.2, symmetric=True, momentum=0.7).double()
    from_disk.load_state_dict(torch.load(path)["loss_state"])
    for other in (fresh, from_disk):
        for k, v in mod.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
    # resuming continues exactly where the original goes
    cont = _train_steps(mod, 3, seed=1)
    for other in (fresh, from_disk):
        assert torch.equal(_train_steps(other, 3, seed=1), cont)
        for k, v in mod.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k


def test_small_temperature_does_not_overflow_float32():
    a, p = _feats(b=8, seed=18, dtype=torch.float32)
    mod = DecomposableContrastiveLoss(8, tau=0.005)
    loss = mod(a, p, torch.arange(8))
    assert torch.isfinite(loss)
    assert torch.isfinite(mod.log_z).all()


# ---------------------------------------------------------------------------------------------------------------
# (f) non-finite guard
# ---------------------------------------------------------------------------------------------------------------
def test_nan_guard_raises_and_keeps_state():
    a, p = _feats(b=4, seed=19)
    mod = DecomposableContrastiveLoss(4, tau=0.3).double()
    mod(a, p, torch.arange(4))
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    bad = a.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        mod(bad, p, torch.arange(4))
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(NonFiniteError):
        mod(a, p, u=torch.full((4,), float("inf"), dtype=DT))


def test_argument_validation():
    with pytest.raises(ValueError):
        DecomposableContrastiveLoss(4, z_estimate="ema")
    with pytest.raises(ValueError):
        DecomposableContrastiveLoss(4, e_step="mode")
    with pytest.raises(ValueError):
        DecomposableContrastiveLoss(4, momentum=1.5)
    with pytest.raises(ValueError):
        DecomposableContrastiveLoss(4, tau=0.0)
    a, p = _feats(b=4)
    with pytest.raises(IndexError):
        DecomposableContrastiveLoss(4)(a, p, torch.tensor([0, 1, 2, 4]))
    DecomposableContrastiveLoss(4).sync_state()                      # no process group: no-op


# ---------------------------------------------------------------------------------------------------------------
# (e) two gloo ranks == one process on the concatenated batch
# ---------------------------------------------------------------------------------------------------------------
N_DATA, B_GLOBAL, D_IN, D_OUT = 16, 8, 6, 4
# global batches (dataset indices); the second and third steps move samples across ranks
SCHEDULE = [list(range(0, 8)), [4, 5, 6, 7, 0, 1, 2, 3], [8, 2, 15, 4, 1, 12, 6, 9]]
LOSS_KW = dict(tau=0.25, symmetric=True, momentum=0.6, z_estimate="running", e_step="mean")


def _ddp_data():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(N_DATA, D_IN, generator=g, dtype=DT)
    y = x + 0.4 * torch.randn(N_DATA, D_IN, generator=g, dtype=DT)
    return x, y


class _TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(D_IN, D_OUT), nn.Linear(D_IN, D_OUT)

    def forward(self, x, y):
        return self.f(x), self.g(y)


def _ddp_model():
    torch.manual_seed(22)
    return _TwoTower().double()


def _single_process_run():
    x, y = _ddp_data()
    model = _ddp_model()
    crit = DecomposableContrastiveLoss(N_DATA, **LOSS_KW).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = []
    for idx in SCHEDULE:
        idx = torch.tensor(idx)
        opt.zero_grad()
        loss = crit(*model(x[idx], y[idx]), idx)
        loss.backward()
        rec.append({"loss": loss.detach(), "grads": [q.grad.clone() for q in model.parameters()],
                    "state": {k: v.clone() for k, v in crit.state_dict().items()}})
        opt.step()
    return rec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from contrastive_repro.distributed import all_gather_with_grad

        x, y = _ddp_data()
        model = DDP(_ddp_model())
        crit = DecomposableContrastiveLoss(N_DATA, gather=all_gather_with_grad, **LOSS_KW).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        b = B_GLOBAL // world
        rec = []
        for idx in SCHEDULE:
            idx = torch.tensor(idx)[rank * b:(rank + 1) * b]
            opt.zero_grad()
            loss = crit(*model(x[idx], y[idx]), idx)
            loss.backward()                                            # DDP averages parameter gradients
            touched = crit.seen.clone()
            crit.sync_state()                                          # "end of epoch": replicas merged
            rec.append({"loss": loss.detach(), "grads": [q.grad.clone() for q in model.parameters()],
                        "state": {k: v.clone() for k, v in crit.state_dict().items()}, "touched": touched})
            opt.step()
        torch.save(rec, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ref = _single_process_run()
    b = B_GLOBAL // world
    for step, want in enumerate(ref):
        got = [r[step] for r in ranks]
        loss = sum(g["loss"] for g in got) / world
        assert torch.allclose(loss, want["loss"], rtol=0, atol=1e-6), step
        for g in got:
            for q, q_ref in zip(g["grads"], want["grads"]):
                assert torch.allclose(q, q_ref, rtol=0, atol=1e-6), step
            for k, v in want["state"].items():
                assert torch.allclose(g["state"][k].to(v.dtype), v, rtol=0, atol=1e-6), (step, k)
    # before each sync a rank had written only rows it saw (its own samples, now or at an earlier step)
    first = ranks[1][0]["touched"][0]
    assert first.nonzero().flatten().tolist() == SCHEDULE[0][b:]


# ------------------------------------------------------------------------------------------ bad input is named
def test_decomposable_rejects_empty_batch_and_bad_indices():
    from contrastive_repro.losses import DecomposableContrastiveLoss

    loss = DecomposableContrastiveLoss(num_samples=10)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="empty batch"):
        loss(x[:0], x[:0], torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="indices must be integer dataset indices, got dtype torch.float32"):
        loss(x, x + 0.1, torch.tensor([0.0, 1.5, 2.0, 3.0]))
    with pytest.raises(TypeError, match="indices must be integer.*torch.bool"):
        loss(x, x + 0.1, torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match=r"indices has duplicates in one batch: \[2\]"):
        loss(x, x + 0.1, torch.tensor([2, 1, 2, 3]))
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\), got \[12\]"):
        loss(x, x + 0.1, torch.tensor([0, 1, 12, 3]))
    with pytest.raises(TypeError, match="anchor must be floating-point"):
        loss(x.long(), x.long(), torch.arange(4))
    assert not loss.seen.any()  # no failed call touched the state
    assert torch.isfinite(loss(x, x + 0.1, [0, 1, 2, 3]))  # a plain list of ints is fine
