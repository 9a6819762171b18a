"""ALBEF-style fusion on frozen features (contrastive_repro.recipes.albef_frozen): shapes, pre-training losses,
fine-tuning with best-validation selection, the image-blind control and the majority-per-question-type gate."""
from __future__ import annotations

import pytest
import torch

from contrastive_repro.recipes import albef_frozen as af


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
