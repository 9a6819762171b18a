"""Frozen-feature two-tower recipe (contrastive_repro.recipes.frozen_clip): shared trunk, separation heads, training,
zero-shot prediction by prompt ensembles, the family split and a whole unit on planted data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.recipes import frozen_clip as fc


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _planted(n=120, n_cls=4, seed=0):
    """Image and text features that are noisy linear functions of a class code (paired through the class)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_cls
    code = torch.randn(n_cls, 8, generator=g)[y] + 0.3 * torch.randn(n, 8, generator=g)
    a, b = torch.randn(8, 20, generator=g), torch.randn(8, 12, generator=g)
    xv, xt = code @ a, code @ b
    vv = xv[:, None] + 0.1 * torch.randn(n, 2, 20, generator=g)
    tv = xt[:, None] + 0.1 * torch.randn(n, 2, 12, generator=g)
    return fc.FeaturePairs(xv, xt, vv, tv), y.numpy(), code


def test_trunk_is_shared_by_main_and_separation_heads():
    m = fc.FrozenTowers(20, 12, width=16, embed_dim=4)
    f = m(torch.randn(5, 20), torch.randn(5, 12), torch.randn(5, 20), torch.randn(5, 12), separation=True)
    assert {"z_v", "z_t", "z_v_aug", "z_t_aug", "zi_v", "zi_t", "zi_v_aug", "zi_t_aug"} <= set(f)
    for k in ("z_v", "zi_t_aug"):
        assert torch.allclose(f[k].norm(dim=-1), torch.ones(5), atol=1e-5)
    # a loss on the separation features alone reaches the shared trunk (and both input layers), not the main heads
    (f["zi_v"].sum() + f["zi_t"].sum()).backward()
    assert m.trunk[1].weight.grad.abs().sum() > 0 and m.in_t[1].weight.grad.abs().sum() > 0
    assert m.head_v.weight.grad is None and m.head_t.weight.grad is None


def test_forward_matches_encode():
    m = fc.FrozenTowers(20, 12, width=16, embed_dim=4).eval()
    xv, xt = torch.randn(3, 20), torch.randn(3, 12)
    f = m(xv, xt)
    assert torch.allclose(f["z_v"], m.encode(xv, "v"), atol=1e-6)
    assert torch.allclose(f["z_t"], fc.embed(m, xt, "t"), atol=1e-6)
    with pytest.raises(ValueError, match="modality"):
        m.encode(xv, "x")


def test_zero_shot_predict_prompt_ensemble_by_hand():
    # class 0 has prompts e0 and e1 (ensemble direction (1,1)/sqrt2), class 1 has e2
    zp = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    items = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.2, 1.0], [0.9, 0.0, 0.8]])
    # item 3: cos with class 0 = 0.9/sqrt2/|x| = 0.636/|x|, with class 1 = 0.8/|x| -> class 1
    assert fc.zero_shot_predict(items, zp, [0, 0, 1]).tolist() == [0, 1, 1]


def test_training_lowers_the_loss_and_aligns_pairs():
    data, y, _ = _planted()
    for regs in ({}, {"cyclip": 1.0}, {"separation": 0.3}, {"bridge": 1.0}, {"gc": 0.3}):
        cfg = fc.TowerConfig(width=32, embed_dim=8, steps=60, batch_size=32, warmup_steps=5, regularizers=regs,
                             log_every=20)
        model, hist = fc.train_towers(data, cfg)
        assert hist[-1]["con"] < hist[0]["con"], regs
        zv, zt = fc.embed(model, data.x_v, "v"), fc.embed(model, data.x_t, "t")
        paired = (zv * zt).sum(1).mean()
        unpaired = (zv @ zt.T).mean()
        assert paired > unpaired + 0.2, regs
    # same seed, same result
    m1, _ = fc.train_towers(data, fc.TowerConfig(width=16, embed_dim=4, steps=5, batch_size=16))
    m2, _ = fc.train_towers(data, fc.TowerConfig(width=16, embed_dim=4, steps=5, batch_size=16))
    assert torch.equal(fc.embed(m1, data.x_v, "v"), fc.embed(m2, data.x_v, "v"))


def test_family_split_keeps_variants_together():
    caps = ["waving hand", "waving hand: light skin tone", "waving hand: dark skin tone", "ok hand",
            "ok hand: light skin tone", "thumbs up", "cat", "dog", "cow", "pig"]
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    tr, te = fc.family_split(caps, labels, 0.5, seed=0)
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    fam = lambda i: caps[i].split(":")[0]
    assert not {fam(i) for i in tr.tolist()} & {fam(i) for i in te.tolist()}
    # stratified: each label keeps train and test families
    assert {labels[i] for i in te.tolist()} == {0, 1} and {labels[i] for i in tr.tolist()} == {0, 1}


def test_run_unit_on_planted_data():
    data, y, code = _planted(n=160)
    caps = [f"item {i}" for i in range(len(y))]
    g = torch.Generator().manual_seed(5)
    # prompts: the class-mean text features (a perfect prompt per class)
    proto = torch.stack([data.x_t[torch.as_tensor(y == c)].mean(0) for c in range(4)])
    prompts = {"cls": (proto, [0, 1, 2, 3])}
    cfg = fc.TowerConfig(width=32, embed_dim=8, steps=60, batch_size=32, warmup_steps=5)
    out = fc.run_unit(data, caps, {"cls": y}, prompts, cfg, seed=1, methods=["clip", "gc"],
                      weight_grid={"gc": [0.1, 1.0]}, random_init_x_v=torch.randn(len(y), 20, generator=g),
                      probe_label="cls", few_shot=(1,), few_shot_draws=1)
    assert out["chosen"]["gc"] in (0.1, 1.0) and set(out["val_scores"]["gc"]) == {0.1, 1.0}
    n = out["n"]
    assert n["fit"] + n["val"] + n["test"] == len(y)
    for m in ("clip", "gc"):
        assert out[m]["zs/cls/top1"] > 0.6 and out[m]["probe"] > 0.6
        assert 0 <= out[m]["ret/i2t_R@1"] <= out[m]["ret/i2t_R@5"] <= out[m]["ret/i2t_R@10"] <= 1
        assert "text/cls/balanced" in out[m] and "fewshot/1shot" in out[m] and "modality_gap" in out[m]
    # the random-init encoder (pure noise features) probes at chance level
    assert out["gate/random_init"]["probe"] < 0.5
    assert out["majority"]["cls"] == pytest.approx(0.25, abs=0.1)
    assert set(out["cpu_seconds"]) == {"train", "evaluate", "gates"} and out["cpu_seconds"]["train"] > 0


def test_pca_images_by_hand():
    data, _, _ = _planted(n=50)
    fit = torch.arange(30)
    p = data.pca_images(fit, 3)
    x = data.x_v[fit]
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    top = evecs[:, -3:].flip(1)
    scale = (evals[-3:].sum() / 30).sqrt()
    expect = (data.x_v - x.mean(0)) @ top / scale
    assert torch.allclose(p.x_v.abs(), expect.abs(), atol=1e-3)  # signs of principal directions are arbitrary
    assert p.v_views.shape == (50, 2, 3) and torch.equal(p.x_t, data.x_t)
    assert torch.allclose(p.x_v[fit].square().sum(1).mean(), torch.tensor(1.0), atol=1e-4)


def test_stacked_renders_index_like_render():
    data, _, _ = _planted(n=10)
    gen = torch.Generator().manual_seed(3)
    idx = torch.tensor([4, 0, 9, 4])
    which = torch.randint(0, 3, (4,), generator=gen)
    stacked = fc._stack_renders(data.x_v, data.v_views)
    assert stacked.shape == (30, 20)
    # row i * 3 + r is render r of item i: r = 0 the clean feature, r = 1, 2 the views
    assert torch.equal(stacked[9 * 3 + 0], data.x_v[9]) and torch.equal(stacked[4 * 3 + 2], data.v_views[4, 1])
    assert torch.equal(stacked[idx * 3 + which], fc._render(data.x_v, data.v_views, idx, which))
    assert torch.equal(fc._stack_renders(data.x_v, None), data.x_v)


def test_probe_scores_records_the_chosen_C():
    g = torch.Generator().manual_seed(0)
    y = np.arange(120) % 3
    x = torch.randn(120, 5, generator=g) + 4 * torch.eye(5)[y]
    out = fc.probe_scores(x[:80], y[:80], x[80:], y[80:], few_shot=[1], few_shot_draws=2, Cs=[0.1, 1.0])
    assert out["probe_C"] in (0.1, 1.0) and out["probe"] > 0.8 and 0 <= out["fewshot/1shot"] <= 1
    assert fc.probe_scores(x[:80], y[:80], x[80:], y[80:], Cs=[3.0])["probe_C"] == 3.0
