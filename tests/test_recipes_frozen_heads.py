"""Heads on frozen features (notebook 02): losses by hand, the doubling-check prefix property, the probe, the
non-inferior-batch scan, splits and retrieval metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.losses.decomposable import conventional_terms, decomposable_terms
from contrastive_repro.recipes import frozen_heads as fh


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _naive(logits, arm, u=None):
    b = len(logits)
    out = []
    for i in range(b):
        pos = logits[i][i]
        negs = [logits[i][j] for j in range(b) if j != i]
        if arm == "conventional":
            out.append(-pos + math.log(sum(math.exp(v) for v in logits[i])))
        elif arm == "control":
            out.append(-pos + math.log(sum(math.exp(v) for v in negs) / (b - 1)))
        else:
            out.append(-pos + u[i] * sum(math.exp(v) for v in negs) / (b - 1))
    return torch.tensor(out, dtype=torch.float64)


def test_pair_losses_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64)
    u = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    for arm in ("conventional", "control"):
        torch.testing.assert_close(fh.pair_losses(logits, arm), _naive(logits.tolist(), arm))
    torch.testing.assert_close(fh.pair_losses(logits, "decomposable", u.log()), _naive(logits.tolist(), "d", u.tolist()))
    # agrees with the library's terms
    pos = logits.diagonal()
    lz = fh._off_diag_log_mean_exp(logits)
    torch.testing.assert_close(fh.pair_losses(logits, "control"), conventional_terms(pos, lz))
    torch.testing.assert_close(fh.pair_losses(logits, "sampled", u.log()), decomposable_terms(pos, lz, u.log()))
    with pytest.raises(ValueError):
        fh.pair_losses(logits, "decomposable")
    with pytest.raises(ValueError):
        fh.pair_losses(logits, "nope")


def test_decomposable_gradient_equals_control_gradient_at_u_one_over_zhat():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lz = fh._off_diag_log_mean_exp(logits).detach()
    g1 = torch.autograd.grad(fh.pair_losses(logits, "control").sum(), logits)[0]
    g2 = torch.autograd.grad(fh.pair_losses(logits, "decomposable", -lz).sum(), logits)[0]
    torch.testing.assert_close(g1, g2)


def test_full_data_objective_by_hand():
    g = torch.Generator().manual_seed(2)
    z1 = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    z2 = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    s = (z1 @ z2.T / 0.5).tolist()
    st = [list(r) for r in zip(*s)]
    want = 0.5 * (_naive(s, "control").mean() + _naive(st, "control").mean())
    assert float(fh.full_data_objective(z1, z2, 0.5)) == pytest.approx(float(want))


def _toy_pool(n=60, k=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d, generator=g) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + 0.3 * torch.randn(n, d, generator=g)
    views = x.unsqueeze(1) + 0.3 * torch.randn(n, k, d, generator=g)
    return views, x, y


def test_train_ssl_heads_prefix_property_and_pairing():
    views, x, y = _toy_pool()
    tr, te = fh.split_pool(60, 20, [0, 1])
    kw = dict(batch_size=8, seeds=[0, 1], proj_dim=4, tau=0.5)
    long = fh.train_ssl_heads("decomposable", views, x, y, tr, te, steps=20, eval_at=[10, 20], **kw)
    short = fh.train_ssl_heads("decomposable", views, x, y, tr, te, steps=10, **kw)
    np.testing.assert_allclose(long["eval"][10]["objective"], short["eval"][10]["objective"], rtol=1e-6)
    # a seed's run does not depend on which other seeds run beside it
    solo = fh.train_ssl_heads("decomposable", views, x, y, tr[1:], te[1:], steps=10, batch_size=8, seeds=[1],
                              proj_dim=4, tau=0.5)
    np.testing.assert_allclose(solo["eval"][10]["objective"][0], short["eval"][10]["objective"][1], rtol=1e-5)
    with pytest.raises(ValueError):
        fh.train_ssl_heads("nope", views, x, y, tr, te, steps=5, **kw)


def test_training_lowers_the_heldout_objective():
    views, x, y = _toy_pool(n=80)
    tr, te = fh.split_pool(80, 20, [0, 1])
    before = fh.untrained_readout(views, x, y, tr, te, seeds=[0, 1], proj_dim=4, tau=0.5)
    for arm in fh.SSL_ARMS:
        after = fh.train_ssl_heads(arm, views, x, y, tr, te, batch_size=16, steps=60, seeds=[0, 1], proj_dim=4,
                                   tau=0.5, lr=3e-2)
        assert np.mean(after["eval"][60]["objective"]) < np.mean(before["objective"]) - 0.05


def test_ridge_probe_separable_and_picks_lambda_on_validation():
    views, x, y = _toy_pool(n=120)
    r = fh.ridge_probe(x[:80], y[:80], x[80:], y[80:])
    assert r["acc"] > 0.95 and r["lam"] in (1e-4, 1e-3, 1e-2, 1e-1)
    # closed form by hand for one lambda
    lam = 1e-2
    zb = torch.cat([x[:80], torch.ones(80, 1)], 1).double()
    eye = torch.eye(zb.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0
    w = torch.linalg.solve(zb.T @ zb + lam * 80 * eye, zb.T @ F.one_hot(y[:80], 4).double())
    acc = float(((torch.cat([x[80:], torch.ones(40, 1)], 1).double() @ w).argmax(1) == y[80:]).double().mean())
    assert fh.ridge_probe(x[:80], y[:80], x[80:], y[80:], lams=(lam,))["acc"] == pytest.approx(acc)


def test_non_inferior_batch_scan():
    rng = np.random.default_rng(0)
    base = rng.normal(size=6)
    res = {("conventional", 256): 0.70 + 0.001 * base, ("decomposable", 256): 0.70 + 0.001 * base,
           ("decomposable", 128): 0.70 + 0.001 * base + 0.0005, ("decomposable", 64): 0.60 + 0.001 * base,
           ("decomposable", 32): 0.70 + 0.001 * base}
    for b in (32, 64, 128):
        res[("conventional", b)] = res[("conventional", 256)]
    out = fh.non_inferior_batch(res, [32, 64, 128, 256], "decomposable", direction=+1, margin=0.01)
    assert out["batch"] == 128                       # 64 fails, so the isolated pass at 32 is not counted
    assert out["verdicts"][64].verdict == "opposite"
    assert out["verdicts"][32].verdict == "reproduced"


def test_steps_split_and_family_split():
    assert fh.steps_for_batch(256, 256, 500) == 500 and fh.steps_for_batch(64, 256, 500) == 1000
    tr, te = fh.split_pool(10, 3, [0, 1])
    for a, b in zip(tr, te):
        assert sorted(a.tolist() + b.tolist()) == list(range(10))
    assert not torch.equal(te[0], te[1])
    caps = ["waving hand", "waving hand: dark skin tone", "cat", "dog", "dog: light skin tone", "sun"]
    tr, te = fh.family_split(caps, 0.5, 0)
    fam = [c.split(":")[0] for c in caps]
    assert {fam[i] for i in tr}.isdisjoint({fam[i] for i in te})
    assert sorted(tr.tolist() + te.tolist()) == list(range(6))


def test_recall_zero_shot_balanced():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
    r = fh.recall_at_k(sim, ks=(1, 2))
    assert float(r[1]) == pytest.approx(1 / 3) and float(r[2]) == pytest.approx(1.0)
    pred = fh.zero_shot(torch.eye(3)[[0, 1, 1, 2]], torch.eye(3))
    assert pred.tolist() == [0, 1, 1, 2]
    assert fh.balanced_top1(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 1])) == 1.0
    assert fh.balanced_top1(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])) == 0.5


def test_clip_heads_train_and_evaluate():
    g = torch.Generator().manual_seed(3)
    lab = torch.arange(40) % 4
    img = torch.randn(4, 6, generator=g)[lab] + 0.2 * torch.randn(40, 6, generator=g)
    txt = torch.randn(4, 5, generator=g)[lab] + 0.2 * torch.randn(40, 5, generator=g)
    for arm in fh.CLIP_ARMS:
        h = fh.train_clip_heads(arm, img[:30], txt[:30], batch_size=8, steps=80, seeds=[0], proj_dim=4, tau=0.2,
                                lr=3e-2)
        m = fh.evaluate_clip_heads(h["w_img"][0], h["w_txt"][0], img[30:], txt[30:], lab[30:], lab[30:] % 2,
                                   txt[:4], [txt[:4][[0, 2]], txt[:4][[1, 3]]], img[:30], lab[:30], shots=(1,))
        assert m["i2t R@10"] == 1.0 and 0 <= m["zs subgroup top1"] <= 1 and m["1-shot subgroup"] > 0.5


def test_end_to_end_settings_reject_unknown_keys():
    from contrastive_repro.recipes import dcl_end_to_end as e2e

    s = e2e.settings({"ssl_epochs": 3.0})
    assert s["ssl_epochs"] == 3.0 and s["clip_preset"] == e2e.DEFAULTS["clip_preset"]
    with pytest.raises(ValueError, match="ssl_epoch"):
        e2e.settings({"ssl_epoch": 3.0})


def test_choose_momentum_on_a_validation_pool():
    views, x, y = _toy_pool(n=60)
    pool = {"views": views, "x": x, "y": y}
    res = fh.choose_momentum([0.0, 0.9], pool, 20, [100, 101], batch_size=8, steps=20, proj_dim=4, tau=0.5)
    tr, te = fh.split_pool(60, 20, [100, 101])
    for m, score in res["scores"].items():
        r = fh.train_ssl_heads("decomposable", views, x, y, tr, te, batch_size=8, steps=20, seeds=[100, 101],
                               proj_dim=4, tau=0.5, momentum=m, eval_at=[20])
        assert score == pytest.approx(float(np.mean(r["eval"][20]["objective"])))
    assert res["chosen"] == min(res["scores"], key=res["scores"].get)
    with pytest.raises(ValueError):
        fh.choose_momentum([1.0], pool, 20, [100], batch_size=8, steps=5)


def test_non_inferior_batch_skips_missing_cells():
    base = np.random.default_rng(1).normal(size=5)
    res = {("conventional", 64): 0.7 + 0.001 * base, ("decomposable", 64): 0.7 + 0.001 * base,
           ("decomposable", 16): 0.7 + 0.001 * base}                   # (decomposable, 32) did not converge
    out = fh.non_inferior_batch(res, [16, 32, 64], "decomposable", direction=+1, margin=0.01)
    assert out["verdicts"][32] is None and out["verdicts"][16].verdict == "reproduced"
    assert out["batch"] == 64                                          # the missing cell stops the scan
    none = fh.non_inferior_batch({("decomposable", 16): res[("decomposable", 16)]}, [16, 64], "decomposable",
                                 direction=+1, margin=0.01)
    assert none == {"batch": None, "verdicts": {16: None, 64: None}}


def test_doubling_schedule():
    assert fh._doubling_schedule(100, 400) == [50, 100, 200, 400]
    assert fh._doubling_schedule(100, 300) == [50, 100, 200, 300]
    assert fh._doubling_schedule(100, 100) == [50, 100]
    with pytest.raises(ValueError):
        fh._doubling_schedule(100, 50)


def _small_pool(p=60, k=2, d=12):
    g = torch.Generator().manual_seed(0)
    views = torch.randn(p, k, d, generator=g)
    return views, views.mean(1), torch.arange(p) % 3


def test_converged_training_is_the_single_arm_runs_and_stops_per_arm():
    views, x, y = _small_pool()
    tr, te = fh.split_pool(60, 20, [0, 1])
    kw = dict(seeds=[0, 1], proj_dim=6, tau=0.5, lr=1e-2, lr_decay_steps=50.0, momentum=0.5)
    arms = ["conventional", "control", "decomposable"]
    r = fh.train_ssl_heads_converged(arms, views, x, y, tr, te, batch_size=8, start_steps=20, max_steps=80,
                                     tol_objective=1e-9, tol_probe=1e-9, **kw)
    assert r["steps_run"] == 80 and all(not a["converged"] and a["steps"] == 80 for a in r["arms"].values())
    for arm in arms:                                       # every arm is the same run as when trained alone
        q = fh.train_ssl_heads(arm, views, x, y, tr, te, batch_size=8, steps=80, eval_at=[10, 20, 40, 80], **kw)
        for s, ev in r["eval"].items():
            np.testing.assert_allclose(ev[arm]["objective"], q["eval"][int(s)]["objective"], atol=1e-5)
        want = np.mean(np.abs(np.subtract(q["eval"][80]["objective"], q["eval"][40]["objective"])))
        assert r["arms"][arm]["d_objective"] == pytest.approx(want, abs=1e-5)
    # loose tolerances: every arm converges at the first check (readouts at start/2 and start) and training stops
    r = fh.train_ssl_heads_converged(arms, views, x, y, tr, te, batch_size=8, start_steps=20, max_steps=80,
                                     tol_objective=10.0, tol_probe=1.0, **kw)
    assert r["steps_run"] == 20 and all(a["converged"] and a["steps"] == 20 for a in r["arms"].values())
    with pytest.raises(ValueError, match="arm must be one of"):
        fh.train_ssl_heads_converged(["nope"], views, x, y, tr, te, batch_size=8, start_steps=20, max_steps=80,
                                     tol_objective=1.0, tol_probe=1.0, **kw)


def test_converged_sweep_batch_sizes_and_start_steps():
    views, x, y = _small_pool()
    tr, te = fh.split_pool(60, 20, [0, 1])
    pool = {"views": views, "x": x, "y": y}
    seen = []
    out = fh.converged_sweep(["conventional", "decomposable"], [8, 32], pool, tr, te, steps_at_largest=10,
                             max_factor=2, seeds=[0, 1], proj_dim=6, tol_objective=10.0, tol_probe=1.0,
                             on_result=lambda b, r: seen.append(b))
    assert sorted(out) == [8, 32] and sorted(seen) == [8, 32]
    assert out[8]["arms"]["conventional"]["steps"] == 20 and out[32]["arms"]["decomposable"]["steps"] == 10
