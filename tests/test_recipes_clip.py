"""The CLIP pre-training recipe (contrastive_repro.recipes.clip_pretrain): training runs, loss composition, the
alignment term, EDA, the tokenizer, augmentations, evaluation helpers and the DATA_ROOT error path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.data import generate_world
from contrastive_repro.data.errors import DatasetNotFoundError
from contrastive_repro.recipes import clip_pretrain as cp


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world():
    return generate_world(48, seed=3, info_gap=0.25, vqa_per_scene=0, ve_per_scene=0, nlvr_per_scene=0)


@pytest.fixture(scope="module")
def pairs(world):
    return cp.PairData(world.images, world.captions, views=[world.rerender(1), world.rerender(2)])


def _cfg(**kw):
    kw.setdefault("model_overrides", {"text_cfg": {"context_length": 32}})
    return cp.CLIPPretrainConfig(steps=kw.pop("steps", 5), batch_size=kw.pop("batch_size", 16),
                                 warmup_steps=1, device="cpu", **kw)


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("base,regs,aug", [
    ("clip", {}, "crop_flip"),
    ("clip+inmodal", {"cyclip": 1.0, "separation": 1.0, "bridge": 1.0, "gc": 0.25}, "views"),
])
def test_recipe_trains_five_steps_with_finite_losses(pairs, world, base, regs, aug):
    trained = cp.train_clip(pairs, _cfg(base=base, regularizers=regs, image_aug=aug, align_scale=0.5),
                            vocab_texts=world.class_prompts())
    assert len(trained.history) == 5
    for rec in trained.history:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
        for name in regs:
            key = {"separation": "sep"}.get(name, name)
            assert math.isfinite(rec[key])
        assert math.isfinite(rec["align"])
    assert not trained.model.training
    curve = trained.loss_curve(points=3)
    assert curve[0][0] == 1 and curve[-1][0] == 5


def test_image_only_baseline_trains_and_leaves_text_tower_alone(pairs):
    trained = cp.train_image_only(pairs, _cfg(image_aug="views", steps=3))
    assert len(trained.history) == 3 and all(math.isfinite(r["loss"]) for r in trained.history)
    # the text tower was neither trained nor decayed: it equals a fresh model of the same seed and vocabulary
    fresh = cp.train_clip(pairs, _cfg(steps=0))
    for (name, p), (_, q) in zip(trained.model.clip.transformer.named_parameters(),
                                 fresh.model.clip.transformer.named_parameters()):
        assert torch.equal(p, q), name
    assert all(p.requires_grad for p in trained.model.parameters())


def test_batches_are_a_pure_function_of_the_step(pairs):
    cfg = _cfg(base="clip+inmodal", image_aug="views+crop_flip")
    tok = cp.ClipTokenizer(32, vocab_texts=pairs.captions)
    f1, f2 = cp.make_batch_fn(pairs, tok, cfg, 32), cp.make_batch_fn(pairs, tok, cfg, 32)
    for i in (0, 4, 2):
        a, b = f1(i), f2(i)
        assert set(a) == {"images", "tokens", "images_aug", "tokens_aug"}
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(f1(0)["images"], f1(1)["images"])


# ---------------------------------------------------------------------------------------------------- objective
def _features(pairs, regs):
    torch.manual_seed(0)
    cfg = _cfg(base="clip+inmodal", regularizers=regs, image_aug="views")
    tok = cp.ClipTokenizer(32, vocab_texts=pairs.captions)
    model = cp.build_model(cfg, tok.vocab_size)
    batch = cp.make_batch_fn(pairs, tok, cfg, 32)(0)
    with torch.no_grad():
        return model(batch["images"], batch["tokens"], batch["images_aug"], batch["tokens_aug"])


@pytest.mark.parametrize("reg,part", [("cyclip", "cyclip"), ("separation", "sep"), ("bridge", "bridge"),
                                      ("gc", "gc")])
def test_each_regularizer_switch_changes_the_loss(pairs, reg, part):
    feats = _features(pairs, {"separation": 1.0})  # with the heads, so every regularizer has its inputs
    base_total, base_parts = cp.CLIPObjective("clip+inmodal")(feats)
    total, parts = cp.CLIPObjective("clip+inmodal", {reg: 0.7})(feats)
    assert abs(float(total - base_total)) > 1e-6
    torch.testing.assert_close(total, base_total + 0.7 * parts[part], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["con"], base_parts["con"])


def test_alignment_switch_adds_the_scaled_term(pairs):
    feats = _features(pairs, {})
    base_total, _ = cp.CLIPObjective("clip+inmodal")(feats)
    total, parts = cp.CLIPObjective("clip+inmodal", align_scale=0.5, align_eps=0.1)(feats)
    torch.testing.assert_close(total, base_total + 0.5 * cp.alignment_term(feats["z_v"], feats["z_t"], 0.1))
    torch.testing.assert_close(parts["align"], cp.alignment_term(feats["z_v"], feats["z_t"], 0.1))


def test_separation_heads_give_normalised_independent_features(pairs):
    feats = _features(pairs, {"separation": 1.0})
    for k in ("zi_v", "zi_t", "zi_v_aug", "zi_t_aug"):
        assert feats[k].shape == feats["z_v"].shape
        torch.testing.assert_close(feats[k].norm(dim=1), torch.ones(len(feats[k])))
    assert not torch.allclose(feats["zi_v"], feats["z_v"])


def test_alignment_term_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    zv = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    zt = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    for eps in (0.0, 0.1, 1.0):
        expect = 0.0
        for j in range(6):
            c = sum(float(zv[j, k]) * float(zt[j, k]) for k in range(5))
            expect += 1.0 / (c * c + eps)
        expect /= 6
        assert math.isclose(float(cp.alignment_term(zv, zt, eps)), expect, rel_tol=1e-12)
    # perfectly aligned pairs: 1 / (1 + eps)
    assert math.isclose(float(cp.alignment_term(zv, zv, 0.25)), 1 / 1.25, rel_tol=1e-12)
    zv.requires_grad_(True)
    zt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: cp.alignment_term(a, b, 0.1), (zv, zt))
    with pytest.raises(ValueError):
        cp.alignment_term(zv, zt, -1.0)
    with pytest.raises(ValueError):
        cp.alignment_term(zv, zt[:3], 0.1)


# ---------------------------------------------------------------------------------------------------- EDA, tokens
def test_eda_augment_is_deterministic_per_seed():
    cap = "a picture of a large red circle at the top left and a small blue square at the bottom right"
    assert cp.eda_augment(cap, 7) == cp.eda_augment(cap, 7)
    outs = {cp.eda_augment(cap, s) for s in range(20)}
    assert len(outs) > 5
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    assert [cp.eda_augment(cap, r1) for _ in range(3)] == [cp.eda_augment(cap, r2) for _ in range(3)]
    # swap only: a permutation of the words; nothing at all: the caption itself
    assert sorted(cp.eda_augment(cap, 1, p_delete=0.0, n_swap=2).split()) == sorted(cap.split())
    assert cp.eda_augment(cap, 1, p_delete=0.0, n_swap=0) == cap
    # deletion never empties a caption
    assert all(cp.eda_augment("one two", s, p_delete=0.99, n_swap=0) for s in range(30))
    assert cp.eda_words([], 0) == []
    with pytest.raises(ValueError):
        cp.eda_augment(cap, 0, p_delete=1.0)


def test_tokenizer_full_vocab_matches_open_clip_and_compact_keeps_eot_largest(world):
    from open_clip.tokenizer import SimpleTokenizer

    caps = list(world.captions[:10]) + ["an emoji of face-smiling & more"]
    full = cp.ClipTokenizer(32)
    assert torch.equal(full(caps), SimpleTokenizer(context_length=32)(caps))
    compact = cp.ClipTokenizer(32, vocab_texts=caps[:5])
    ids = compact(caps)
    assert int(ids.max()) == compact.vocab_size - 1 == compact.eot_id
    assert (ids.argmax(1) == (ids != 0).sum(1) - 1).all()  # argmax pooling finds the end token
    assert (ids[5:] == compact.unk_id).any()  # words outside vocab_texts map to <unk>
    # same sequence lengths as the full tokenizer
    assert torch.equal((ids == compact.eot_id).int().argmax(1), (full(caps) == full.eot_id).int().argmax(1))


def test_crop_flip_is_batched_and_deterministic():
    x = torch.rand(4, 3, 16, 16)
    a = cp.crop_flip(x, torch.Generator().manual_seed(1))
    b = cp.crop_flip(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    full = cp.crop_flip(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(full, x, atol=1e-5, rtol=0)  # the whole image, resampled on its own grid


# ---------------------------------------------------------------------------------------------------- evaluation
def test_eval_helpers_return_the_right_keys(pairs, world):
    trained = cp.train_clip(pairs, _cfg(steps=1), vocab_texts=world.class_prompts("a picture of {}"))
    model, tok = trained.model, trained.tokenizer
    y = world.class_labels % 4  # 4 classes so that every class has several items
    zs = cp.zero_shot_eval(model, tok, cp.embed_images(model, world.images), y, ["a", ["b", "c"], "d", "e"],
                           ["a picture of {}"])
    assert set(zs) == {"top1", "top5", "n_classes"} and zs["top5"] == 1.0
    f = cp.embed_images(model, world.images)
    assert f.shape == (48, 64) and torch.allclose(f.norm(dim=1), torch.ones(48), atol=1e-5)
    lp = cp.linear_probe_eval(f[:32], y[:32], f[32:], y[32:], Cs=(1.0,))
    assert set(lp) == {"accuracy", "C"} and 0.0 <= lp["accuracy"] <= 1.0
    fs = cp.few_shot_eval(f[:32], y[:32], f[32:], y[32:], shots=(1, 2), n_draws=2)
    assert set(fs) == {"1shot", "1shot_std", "1shot_classes", "2shot", "2shot_std", "2shot_classes"}
    zt = cp.embed_texts(model, tok, world.captions)
    ret = cp.retrieval_eval(f, zt)
    assert set(ret) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"mean_recall"}
    suite = cp.EvalSuite(zero_shot={"cls": cp.ZeroShotTask(world.images, y, ["a", "b", "c", "d"], ["{}"])},
                         probes={"cls": cp.ProbeTask(world.images[:32], y[:32], world.images[32:], y[32:])},
                         retrieval=(world.images, world.captions), few_shot=(1,), few_shot_draws=1, probe_Cs=(1.0,),
                         pca=True)
    out = cp.evaluate_suite(model, tok, suite)
    expected = {"zs/cls/top1", "zs/cls/top5", "probe/cls", "probe/cls/C", "fewshot/cls/1shot",
                "fewshot/cls/1shot_std", "fewshot/cls/1shot_classes", "modality_gap", "paired_cosine",
                "paired_cosine_abs", "unpaired_cosine", "pca"} | {f"ret/{k}" for k in ret}
    assert set(out) == expected
    assert len(out["pca"]["v"]) == len(out["pca"]["t"]) == 48


def test_modality_gap_and_stats_by_hand():
    zv = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    # means (0.5, 0.5) and (-0.5, -0.5): distance sqrt(2)
    assert math.isclose(cp.modality_gap(zv, zt), math.sqrt(2.0), rel_tol=1e-6)
    st = cp.modality_stats(zv, zt)
    assert math.isclose(st["paired_cosine"], -1.0, rel_tol=1e-6) and math.isclose(st["unpaired_cosine"], 0.0,
                                                                                   abs_tol=1e-7)
    assert math.isclose(st["paired_cosine_abs"], 1.0, rel_tol=1e-6)
    assert cp.modality_gap(zv, zv) == 0.0


# ---------------------------------------------------------------------------------------------------- paper data
def test_paper_data_loading_raises_dataset_not_found_on_an_empty_data_root(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as e:
        cp.load_paper_data(tmp_path)
    assert str(tmp_path / "cc3m" / "train.tsv") in str(e.value) and "expected layout" in str(e.value)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetNotFoundError):
        cp.load_paper_data()
    with pytest.raises(DatasetNotFoundError) as e:
        cp.load_retrieval_data()
    assert "coco" in str(e.value)
    # tables present, CIFAR missing: the CIFAR loader's error
    for rel in ("cc3m/train.tsv", "cc3m/val.tsv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("filepath\ttitle\nimages/a.jpg\ta dog\n")
    with pytest.raises(DatasetNotFoundError) as e:
        cp.load_paper_data(tmp_path)
    assert "cifar" in str(e.value).lower()


def test_config_validates_its_choices():
    with pytest.raises(ValueError):
        cp.CLIPPretrainConfig(base="nope")
    with pytest.raises(ValueError):
        cp.CLIPPretrainConfig(regularizers={"nope": 1.0})
    with pytest.raises(ValueError):
        cp.CLIPPretrainConfig(image_aug="nope")
    assert cp.needs_augmented_views(cp.CLIPPretrainConfig(regularizers={"bridge": 1.0}))
    assert not cp.needs_augmented_views(cp.CLIPPretrainConfig(regularizers={"cyclip": 1.0}))
