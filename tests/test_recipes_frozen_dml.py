"""Frozen-feature DML recipe (TCM notebooks 06-08) and emoji families: expected values computed independently."""
import math

import numpy as np
import pytest
import torch

from contrastive_repro.data.emoji_families import (emoji_family_key, emoji_family_labels,
                                                   emoji_family_representatives)
from contrastive_repro.recipes.frozen_dml import (HeadConfig, class_split, embed_head, evaluate_embeddings,
                                                  frozen_gates, paired_arms, recall_at_1, retrieval_chance,
                                                  select_tcm_margins, summarize_tcm_cell, train_head)


# ------------------------------------------------------------------------------------------------- emoji families
def test_family_key_strips_skin_tones_and_vs16():
    assert emoji_family_key("1F44B 1F3FD") == "1F44B"
    assert emoji_family_key("261D FE0F") == emoji_family_key("261D 1F3FB") == "261D"
    # two-person emoji with two independent tones
    assert emoji_family_key("1F9D1 1F3FB 200D 1F91D 200D 1F9D1 1F3FF") == "1F9D1 200D 1F91D 200D 1F9D1"
    with pytest.raises(ValueError):
        emoji_family_key("  ")


def test_family_labels_and_representatives():
    cps = ["1F44B", "1F44B 1F3FB", "1F600", "261D FE0F", "261D 1F3FF", "1F44B 1F3FF"]
    # families: wave {0,1,5}, grin {2} (singleton), point {3,4}; numbered by first appearance of kept families
    assert emoji_family_labels(cps).tolist() == [0, 0, -1, 1, 1, 0]
    assert emoji_family_labels(cps, min_size=1).tolist() == [0, 0, 1, 2, 2, 0]
    assert emoji_family_labels(cps, min_size=3).tolist() == [0, 0, -1, -1, -1, 0]
    assert emoji_family_representatives(cps).tolist() == [True, False, True, True, False, False]


# ------------------------------------------------------------------------------------------------------- splits
def test_class_split_disjoint_and_skips_unlabelled():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, 4])  # class 4 has one item
    tr, te = class_split(y, n_test_classes=2, seed=3)
    ctr, cte = set(y[tr].tolist()), set(y[te].tolist())
    assert not ctr & cte and len(cte) == 2 and ctr | cte == {0, 1, 2, 3}
    assert 8 not in tr.tolist() + te.tolist() and 9 not in tr.tolist() + te.tolist()
    assert class_split(y, n_test_classes=2, seed=3)[1].tolist() == te.tolist()  # seeded
    with pytest.raises(ValueError, match="n_test_classes"):
        class_split(y, n_test_classes=4)


# --------------------------------------------------------------------------------------------------- metrics
def test_recall_at_1_matches_loop_and_chance_by_hand():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 5, generator=g)
    y = torch.randint(0, 4, (30,), generator=g)
    zn = z / z.norm(dim=1, keepdim=True)
    hits = 0
    for i in range(30):
        best, arg = -2.0, -1
        for j in range(30):
            if j != i and float(zn[i] @ zn[j]) > best:
                best, arg = float(zn[i] @ zn[j]), j
        hits += int(y[arg] == y[i])
    assert recall_at_1(z, y) == pytest.approx(hits / 30)
    # classes of sizes 3, 2, 1: (3*2 + 2*1 + 0) / (6*5) = 8/30
    assert retrieval_chance(torch.tensor([0, 0, 0, 1, 1, 2])) == pytest.approx(8 / 30)


def test_evaluate_embeddings_and_gates_on_separable_data():
    y = torch.arange(6).repeat_interleave(5)
    z = torch.nn.functional.one_hot(y, 6).float() + 0.01 * torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    r = evaluate_embeddings(z, y)
    assert r["R@1"] == 1.0 and r["n_classes"] == 6 and r["n"] == 30
    assert r["OPIS"] >= 0 and r["OPIS_global"] >= 0
    g = frozen_gates(z, y, x_random=torch.randn(30, 6, generator=torch.Generator().manual_seed(2)))
    assert g["frozen"] == 1.0 and g["chance"] == pytest.approx(6 * 5 * 4 / (30 * 29)) and "random_init" in g


# ------------------------------------------------------------------------------------------------------ head
def _blobs(n_cls=12, per=8, dim=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_cls, dim, generator=g) * 2
    y = torch.arange(n_cls).repeat_interleave(per)
    return centers[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_residual_head_starts_at_the_centred_features():
    x, y = _blobs()
    x[:, 0] = 1.0  # a dimension constant on the training items must not blow up on new ones
    head = train_head(x, y, HeadConfig(embed_dim=0, rank=4, steps=1, lr=1e-12))
    xc = x - x.mean(0)
    scale = float(xc.pow(2).mean().sqrt())
    assert torch.allclose(head(x), xc / scale, atol=1e-5)
    new = x.clone()
    new[:, 0] = 2.0
    assert torch.allclose(head(new)[:, 0], torch.full((len(x),), 1.0 / scale), atol=1e-4)
    with pytest.raises(ValueError, match="identity"):
        HeadConfig(embed_dim=32, init="identity")
    with pytest.raises(ValueError, match="loss"):
        HeadConfig(loss="nope")


@pytest.mark.parametrize("loss", ["smooth_ap", "proxy_anchor"])
def test_train_head_is_seeded_and_learns(loss):
    x, y = _blobs(noise=2.5)
    views = x[:, None, :] + 0.1 * torch.randn(len(x), 2, x.shape[1], generator=torch.Generator().manual_seed(5))
    cfg = HeadConfig(loss=loss, embed_dim=16, init="random", steps=60, lr=3e-3, batch_size=32, seed=7)
    h1 = train_head(x, y, cfg, views)
    h2 = train_head(x, y, cfg, views)
    assert torch.equal(embed_head(h1, x), embed_head(h2, x))
    untrained = train_head(x, y, cfg.replace(steps=1, lr=1e-9))
    assert recall_at_1(embed_head(h1, x), y) >= recall_at_1(embed_head(untrained, x), y)
    assert train_head(x, y, cfg.replace(tcm=True, steps=5)) is not None


def test_select_tcm_margins_follows_its_rule():
    x, y = _blobs(n_cls=20, per=6, noise=2.0)
    cfg = HeadConfig(embed_dim=0, rank=4, steps=15, batch_size=24)
    cands = [(0.9, 0.5), (0.7, 0.3), (0.9, 0.2)]
    sel = select_tcm_margins(x, y, cfg, cands, n_val_classes=6, r1_tolerance=0.05)
    ok = [t for t in sel["table"] if t["val_R@1"] >= sel["base"]["val_R@1"] - 0.05]
    expect = min(ok, key=lambda t: t["val_OPIS"]) if ok else max(sel["table"], key=lambda t: t["val_R@1"])
    assert (sel["pos_margin"], sel["neg_margin"]) == (expect["pos_margin"], expect["neg_margin"])
    assert sel["n_val_classes"] == 6 and len(sel["table"]) == 3


# --------------------------------------------------------------------------------------------------- summary
def _unit(split, deltas, base_r1=0.8):
    runs = []
    for seed, d in enumerate(deltas):
        runs.append({"seed": seed, "arm": "base", "R@1": base_r1, "OPIS": 0.10, "OPIS_global": 0.2, "eps_OPIS": 0.3})
        runs.append({"seed": seed, "arm": "tcm", "R@1": base_r1 + 0.01, "OPIS": 0.10 + d, "OPIS_global": 0.2 + d,
                     "eps_OPIS": 0.3})
    return {"split": split, "runs": runs, "gates": {"chance": 0.1, "frozen": 0.7},
            "margins": {"pos_margin": 0.9, "neg_margin": 0.5}, "n_test_classes": 50}


def test_paired_arms_and_cell_summary():
    units = [_unit(0, [-0.01, -0.02, -0.012]), _unit(1, [-0.015, -0.011, -0.018])]
    a, b = paired_arms(units, "OPIS")
    assert len(a) == 6 and np.allclose(b - a, [-0.01, -0.02, -0.012, -0.015, -0.011, -0.018])
    c = summarize_tcm_cell(units)
    assert c["verdicts"]["OPIS"].verdict == "reproduced"  # lower OPIS: the paper's direction
    assert c["rel_change_pct"]["OPIS"] == pytest.approx(100 * np.mean(b - a) / 0.1)
    assert all(g.passed for g in c["gates"])
    bad = summarize_tcm_cell([_unit(0, [0.01, 0.02], base_r1=0.5), _unit(1, [0.015, 0.012], base_r1=0.5)])
    assert bad["verdicts"]["OPIS"].verdict == "opposite" and not bad["gates"][0].passed
    assert math.isfinite(bad["rel_change_pct"]["R@1"])


def test_tcm_active_pairs_by_hand():
    from contrastive_repro.recipes.frozen_dml import tcm_active_pairs

    # angles 0, 10, 90, 100 degrees on the circle; classes a a b b
    ang = torch.deg2rad(torch.tensor([0.0, 10.0, 90.0, 100.0], dtype=torch.float64))
    z = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    y = torch.tensor([0, 0, 1, 1])
    # positives: cos 10 deg = 0.985 (x2): none <= 0.9; negatives: cos 90, 100, 80, 90 -> 0, -0.17, 0.17, 0
    r = tcm_active_pairs(z, y, 0.9, 0.1)
    assert r["hard_pos_share"] == 0.0 and r["hard_neg_share"] == pytest.approx(1 / 4)
    assert tcm_active_pairs(z, y, 0.99, 0.5)["hard_pos_share"] == 1.0


def test_select_lr_picks_the_best_validation_r1():
    from contrastive_repro.recipes.frozen_dml import select_lr

    x, y = _blobs(n_cls=20, per=6, noise=2.0)
    sel = select_lr(x, y, HeadConfig(embed_dim=0, rank=4, steps=10, batch_size=24), [1e-12, 3e-3])
    assert sel["lr"] == max(sel["table"], key=lambda t: t["val_R@1"])["lr"] and len(sel["table"]) == 2
