"""ALBEF-style fusion on frozen features (contrastive_repro.recipes.albef_frozen): shapes, pre-training losses,
fine-tuning with best-validation selection, the image-blind control and the majority-per-question-type gate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_repro.recipes import albef_frozen as af


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _data(S=60, T=4, L=6, seed=0):
    """Scenes whose image token 0 encodes a colour c in {0,1,2}; a VQA item asks for it (answer = c, only visible in
    the image), a VE item's label is c as well; NLVR asks whether both scenes share the colour."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 3, (S,), generator=g)
    grid = 0.1 * torch.randn(S, T, 10, generator=g)
    grid[:, 0, :3] += 3 * torch.eye(3)[c]
    M = S + 3
    tok = torch.randn(M, L, 8, generator=g)
    mask = torch.ones(M, L, dtype=torch.bool)
    mask[:, 4:] = False
    ids = torch.randint(1, 20, (M, L), generator=g) * mask
    q = torch.full((S,), S)          # one question text for every scene
    items = {"vqa": {"scene": torch.arange(S), "text": q, "label": c, "qtype": torch.zeros(S, dtype=torch.long)},
             "ve": {"scene": torch.arange(S), "text": q + 1, "label": c},
             "nlvr": {"scene": torch.arange(S), "scene_b": torch.roll(torch.arange(S), 1), "text": q + 2,
                      "label": (c == torch.roll(c, 1)).long()}}
    return af.FusionData(grid=grid, grid_view=grid + 0.01, tok=tok, mask=mask, ids=ids, caption=torch.arange(S),
                         items=items, n_classes={"vqa": 3, "ve": 3, "nlvr": 2})


def test_model_shapes_and_embeddings_are_normalised():
    d = _data()
    m = af.build(d, af.FusionConfig(width=16, embed_dim=8, heads=2), seed=0)
    vs, ts = m.image_states(d.grid[:5]), m.text_states(d.tok[:5], d.mask[:5])
    f = m.embed(vs, ts, separation=True)
    for k in ("z_v", "z_t", "zi_v", "zi_t"):
        assert f[k].shape == (5, 8) and torch.allclose(f[k].norm(dim=-1), torch.ones(5), atol=1e-5)
    assert m.fuse(ts, d.mask[:5], vs).shape == (5, 6, 16)
    # masked inputs replace the feature by the [MASK] vector: the masked position's state changes
    masked = torch.zeros(5, 6, dtype=torch.bool)
    masked[:, 2] = True
    assert not torch.allclose(m.text_states(d.tok[:5], d.mask[:5], masked)[:, 2], ts[:, 2])


@pytest.mark.parametrize("reg", [None, "separation", "bridge", "gc"])
def test_pretrain_runs_and_lowers_itc(reg):
    d = _data()
    cfg = af.FusionConfig(width=16, embed_dim=8, heads=2, pretrain_steps=30, pretrain_batch=16)
    _, hist = af.pretrain(d, torch.arange(40), cfg, reg, 0.3, seed=0)
    assert all(torch.isfinite(torch.tensor([h["itc"], h["itm"], h["mlm"]])).all() for h in hist)
    assert hist[-1]["itc"] < hist[0]["itc"]


def test_finetune_learns_an_image_question_and_blind_model_cannot():
    d = _data(S=90)
    cfg = af.FusionConfig(width=16, embed_dim=8, heads=2, finetune_steps=60, finetune_batch=16, eval_every=20,
                          finetune_lr=3e-3)
    tr, va, te = torch.arange(0, 50), torch.arange(50, 70), torch.arange(70, 90)
    seen = af.finetune(af.build(d, cfg, 0), d, "vqa", tr, va, te, cfg, seed=0)
    blind = af.finetune(af.build(d, cfg, 0), d, "vqa", tr, va, te, cfg, seed=0, image_blind=True)
    assert seen["test"] > 0.8 and blind["test"] < 0.6
    assert seen["best_step"] in (0, 20, 40, 60)


def test_run_fusion_unit_majority_gate_by_hand():
    d = _data(S=40)
    cfg = af.FusionConfig(width=16, embed_dim=8, heads=2, pretrain_steps=3, pretrain_batch=8, finetune_steps=3,
                          finetune_batch=8, eval_every=3)
    out = af.run_fusion_unit(d, cfg, seed=1, methods=["albef", "gc"], weights={"gc": 0.1}, tasks=["vqa", "nlvr"])
    assert {"albef", "gc", "no_pretrain", "text_only", "majority"} <= set(out)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    te, tr = perm[:10], perm[16:]
    c = d.items["vqa"]["label"]
    common = int(torch.mode(c[tr]).values)
    assert out["majority"]["vqa"] == pytest.approx(float((c[te] == common).float().mean()))
    assert "ret/i2t_R@1" in out["albef"]["retrieval"]


def test_fusion_splits_dev_pool_is_fixed_and_never_test():
    a, b = af.fusion_splits(200, seed=0, dev_fraction=0.25), af.fusion_splits(200, seed=1, dev_fraction=0.25)
    assert torch.equal(a["dev_train"], b["dev_train"]) and torch.equal(a["dev_val"], b["dev_val"])
    assert len(a["dev_val"]) + len(a["dev_train"]) == 50 and len(a["dev_val"]) == 15
    for sp in (a, b):
        allidx = torch.cat([sp[k] for k in ("train", "val", "test", "dev_train", "dev_val")])
        assert sorted(allidx.tolist()) == list(range(200))  # a partition
        assert len(sp["test"]) == round(0.25 * 150) and len(sp["val"]) == round(0.15 * 150)
    assert not torch.equal(a["test"], b["test"])  # the unit varies the split
    with pytest.raises(ValueError, match="fractions"):
        af.fusion_splits(100, 0, test_fraction=0.7, val_fraction=0.4)


def test_choose_weights_by_hand():
    sweep = {"gc": {0.1: {"vqa": 0.5, "ve": 0.7}, 1.0: {"vqa": 0.6, "ve": 0.7}, 0.3: {"vqa": 0.4, "ve": 0.9}},
             "bridge": {0.3: {"vqa": 0.5}, 0.1: {"vqa": 0.5}}}
    # gc means: 0.60, 0.65, 0.65 -> tie between 1.0 and 0.3 -> the smaller, 0.3; bridge tie -> 0.1
    assert af.choose_weights(sweep) == {"gc": 0.3, "bridge": 0.1}
    with pytest.raises(ValueError, match="gc"):
        af.choose_weights({"gc": {}})


def _units(shift):
    """Five hand-made units: albef = 60 + i, gc = albef + shift[i], controls and majority fixed."""
    out = []
    for i, s in enumerate(shift):
        out.append({"majority": {"vqa": 0.30}, "albef": {"vqa": {"test": (60 + i) / 100}},
                    "gc": {"vqa": {"test": (60 + i + s) / 100}}, "no_pretrain": {"vqa": {"test": 0.50}},
                    "text_only": {"vqa": {"test": 0.35}}})
    return out


def test_accuracy_table_by_hand():
    rows = af.accuracy_table(_units([1, 1, 1, 1, 1]), ["albef", "gc"], ["vqa"])
    assert rows[0]["arm"] == "majority per question type" and rows[0]["mean"] == pytest.approx(30.0)
    albef = next(r for r in rows if r["arm"] == "albef")
    assert albef["mean"] == pytest.approx(62.0) and albef["std"] == pytest.approx(np.std([60, 61, 62, 63, 64],
                                                                                         ddof=1))


def test_fusion_claims_gates_and_direction():
    pv = {"lms.table4.albef.vqa_std": 73.5, "lms.table4.gc.vqa_std": 73.9}.__getitem__
    up = af.fusion_claims(_units([1.0, 1.2, 0.8, 1.1, 0.9]), ["albef", "gc"], ["vqa"], {"gc": 0.3}, alpha=0.05,
                          gate_margin=1.0, paper_value=pv, chance={"vqa": 10.0}, test="unit test")
    row = up["claims"][0]
    assert row["id"] == "lms.albef.gc.vqa" and row["verdict"] == "reproduced" and row["gate_passed"]
    assert row["effect"] == pytest.approx(1.0)
    pre = up["pretraining"][0]
    assert pre["albef - no_pretrain"] == pytest.approx(12.0) and pre["text_only - chance"] == pytest.approx(25.0)
    assert up["verdicts"][0]["weight"] == 0.3 and len(up["summary"]) == 2
    # the control beats ALBEF -> the gate fails -> uninformative, whatever the paired test says
    units = _units([1.0, 1.2, 0.8, 1.1, 0.9])
    for u in units:
        u["no_pretrain"]["vqa"]["test"] = 0.70
    low = af.fusion_claims(units, ["albef", "gc"], ["vqa"], {"gc": 0.3}, alpha=0.05, gate_margin=1.0,
                           paper_value=pv, chance={"vqa": 10.0}, test="unit test")
    assert low["claims"][0]["verdict"] == "uninformative" and low["claims"][0]["test_verdict"] == "reproduced"


def test_sweep_point_and_capped_unit():
    d = _data(S=60)
    cfg = af.FusionConfig(width=16, embed_dim=8, heads=2, pretrain_steps=3, pretrain_batch=8, finetune_steps=3,
                          finetune_batch=8, eval_every=3)
    sp = af.fusion_splits(60, seed=2, dev_fraction=0.5)
    val = af.sweep_point(d, cfg, 0, "gc", 0.1, sp, tasks=["vqa"], finetune_items=10)
    assert set(val) == {"vqa"} and 0.0 <= val["vqa"] <= 1.0
    out = af.run_fusion_unit(d, cfg, 2, methods=["albef"], weights={}, tasks=["vqa", "ve"], split=sp,
                             finetune_items=7, val_items=4)
    assert out["n_items"]["vqa"]["finetune"] == 7 and out["n_items"]["vqa"]["val_used"] == 4
    assert out["n_items"]["vqa"]["test"] == len(sp["test"])  # one VQA item per scene; the test set is not capped
    assert {"albef", "no_pretrain", "text_only"} <= set(out)


def test_merge_parts_and_chance():
    d = _data(S=40)
    cfg = af.FusionConfig(width=16, embed_dim=8, heads=2, pretrain_steps=2, pretrain_batch=8, finetune_steps=2,
                          finetune_batch=8, eval_every=2)
    sp = af.fusion_splits(40, seed=0)
    a = af.run_fusion_unit(d, cfg, 0, methods=["albef"], weights={}, tasks=["vqa", "ve"], split=sp, controls=False)
    b = af.run_fusion_unit(d, cfg, 0, methods=[], weights={}, tasks=["vqa", "ve"], split=sp)
    m = af.merge_parts([a, b])
    assert {"albef", "no_pretrain", "text_only"} <= set(m) and "albef" in m["pretrain_hist"]
    # one question type whose training answers are {0, 1, 2} -> a uniform guess is right 1/3 of the time
    tr_scenes = sp["train"]
    n_ans = len(d.items["vqa"]["label"][tr_scenes].unique())
    assert m["chance"]["vqa"] == pytest.approx(1 / n_ans) and m["chance"]["ve"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="two parts"):
        af.merge_parts([a, a])
    other = af.run_fusion_unit(d, cfg, 1, methods=[], weights={}, tasks=["vqa", "ve"])
    with pytest.raises(ValueError, match="disagree"):
        af.merge_parts([a, other])
