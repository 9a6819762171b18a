"""The ALBEF + modality-structure recipe (notebook 05): data plumbing, pre-training with each regularizer, the
fine-tuning heads, retrieval recall against an independent implementation, and the paper-data path."""
from __future__ import annotations

import json
import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from contrastive_repro.data import generate_world
from contrastive_repro.data.errors import DatasetNotFoundError
from contrastive_repro.metrics import image_text_recall
from contrastive_repro.recipes import albef_world as aw

PRE = dict(steps=3, batch_size=16, warmup_steps=1, device="cpu")
FT = dict(steps=2, batch_size=8, eval_every=1, warmup_steps=0, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: overhead-bound, and one thread does not fight a busy machine
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def world():
    return generate_world(120, seed=3, image_size=16, nlvr_per_scene=6)


@pytest.fixture(scope="module")
def tasks(world):
    return aw.world_tasks(world, val_frac=0.2, test_frac=0.25, split_seed=0, n_views=2)


def _in01(d: dict) -> None:
    for k, v in d.items():
        assert isinstance(v, float) and 0.0 <= v <= 1.0, (k, v)


# ------------------------------------------------------------------------------------------------ data plumbing
def test_world_tasks_splits_are_disjoint_and_follow_scenes(world, tasks):
    sp = aw.split_scenes(len(world), 0.2, 0.25, 0)
    assert sorted(sp["train"] + sp["val"] + sp["test"]) == list(range(len(world)))
    assert len(sp["test"]) == 30 and len(sp["val"]) == 24
    where = {i: s for s, idx in sp.items() for i in idx}
    assert tasks.pretrain_images.tolist() == sp["train"]
    assert tasks.pretrain_texts == [world.captions[i] for i in sp["train"]]
    assert len(tasks.pretrain_text_views) == 2 and all(len(v) == len(sp["train"]) for v in tasks.pretrain_text_views)
    for s in ("train", "val", "test"):
        assert all(where[it[0]] == s for it in tasks.vqa[s]) and all(where[it[0]] == s for it in tasks.ve[s])
        assert all(where[a] == s and where[b] == s for a, b, _, _ in tasks.nlvr[s])
        assert tasks.nlvr[s] and tasks.vqa[s] and tasks.ve[s]
    img, texts, t2i = tasks.retrieval["test"]
    assert img.tolist() == sp["test"] and texts == [world.captions[i] for i in sp["test"]]
    assert t2i.tolist() == list(range(30))
    assert tasks.bank.n_views == 2 and tasks.bank.get(torch.tensor([0, 1])).shape == (2, 3, 16, 16)
    # a view is a re-rendering of the same scene: close to the original, not equal
    a, b = tasks.bank.get(torch.tensor([5])), tasks.bank.get(torch.tensor([5]), torch.tensor([1]))
    assert not torch.equal(a, b) and (a - b).abs().mean() < 1.0


def test_tokenizer_special_ids_and_trim(tasks):
    tok = tasks.tokenizer
    sp = tok.special
    v = tok.vocab
    assert sp["vocab_size"] == len(v) + 1 and sp["mask_id"] == len(v)
    assert (sp["pad_id"], sp["cls_id"], sp["sep_id"], sp["extra_special_ids"]) == (0, v.bos_id, v.eos_id, (v.unk_id,))
    ids, mask = tok(["a red circle", "a picture of a small blue square at the top left"])
    assert ids.shape[1] == int(mask.sum(1).max()) and bool((ids[:, 0] == v.bos_id).all())
    assert mask.dtype == torch.bool and mask[0].sum() == 5  # <bos> a red circle <eos>


# ------------------------------------------------------------------------------------------------ pre-training
def test_pretrain_with_each_regularizer_is_finite_paired_and_different(tasks):
    first = {}
    for reg in aw.REGULARIZERS:
        model = aw.build_albef(tasks, "tiny", seed=0)
        cfg = aw.PretrainConfig(**PRE, regularizer=reg, reg_weight=0.5, seed=0)
        hist = aw.pretrain(model, tasks, cfg)
        assert len(hist) == 3
        for h in hist:
            for k in ("loss", "itc", "itm", "mlm", "reg"):
                assert math.isfinite(h[k]), (reg, k)
        h = hist[0]
        # total = ITC + ITM + MLM + weight x regularizer
        assert h["loss"] == pytest.approx(h["itc"] + h["itm"] + h["mlm"] + 0.5 * h["reg"], rel=1e-5)
        assert (h["reg"] == 0.0) == (reg == "none")
        first[reg] = h
    # same seed -> same initial weights and batches: the base losses at step 1 agree, the totals differ
    for reg in aw.REGULARIZERS[1:]:
        assert first[reg]["itc"] == pytest.approx(first["none"]["itc"], rel=1e-5)
    totals = [first[r]["loss"] for r in aw.REGULARIZERS]
    assert len({round(t, 6) for t in totals}) == len(totals)


def test_regularizer_switch_on_and_ramp(tasks):
    model = aw.build_albef(tasks, "tiny", seed=0)
    cfg = aw.PretrainConfig(**{**PRE, "steps": 3}, regularizer="bridge", reg_weight=2.0, reg_start_steps=1,
                            reg_ramp_steps=2)
    h = aw.pretrain(model, tasks, cfg)
    base = [x["itc"] + x["itm"] + x["mlm"] for x in h]
    assert h[0]["loss"] == pytest.approx(base[0], rel=1e-6) and h[0]["reg"] > 0  # off at step 1 (logged anyway)
    assert h[1]["loss"] == pytest.approx(base[1] + 2.0 * 0.5 * h[1]["reg"], rel=1e-5)  # half way up the ramp
    assert h[2]["loss"] == pytest.approx(base[2] + 2.0 * h[2]["reg"], rel=1e-5)


def test_bridge_regularizer_uses_momentum_features_by_hand(tasks):
    torch.manual_seed(0)
    model = aw.build_albef(tasks, "tiny", seed=0).train()
    batch = next(iter(aw._pretrain_batches(tasks, aw.PretrainConfig(**PRE))._open()))
    images, ids, mask, images_aug, ids_aug, mask_aug = batch
    out = model(images, ids, mask, images_aug, ids_aug, mask_aug)
    with torch.no_grad():  # the momentum encoder on the augmented image, by hand
        zm = F.normalize(model.vision_proj_m(model.visual_encoder_m(images_aug)[:, 0]), dim=-1)
    assert torch.allclose(out["z_v_aug"], zm, atol=1e-6)
    reg, _ = aw.regularizer_loss("bridge", out, bridge_t=0.25)
    mu = F.normalize(0.25 * out["z_v"] + 0.75 * out["z_t"], dim=-1)
    expected = ((zm - mu) ** 2).sum(1).mean()
    assert reg.item() == pytest.approx(expected.item(), rel=1e-5)
    reg.backward()  # the gradient reaches the online encoders through the bridge point
    assert model.text_proj.weight.grad is not None and model.text_proj.weight.grad.abs().sum() > 0
    g, _ = aw.regularizer_loss("gc", out)
    s = out["z_v"] @ out["z_t"].T
    by_hand = ((s - s.T) ** 2).sum() / len(s) + ((out["z_v"] @ out["z_v"].T - out["z_t"] @ out["z_t"].T) ** 2).sum() \
        / len(s) + ((out["z_v"] @ out["z_v"].T - out["z_v_aug"] @ out["z_v_aug"].T) ** 2).sum() / len(s) \
        + ((out["z_t"] @ out["z_t"].T - out["z_t_aug"] @ out["z_t_aug"].T) ** 2).sum() / len(s) \
        + (((out["z_v"] * out["z_t"]).sum(1) - (out["z_v_aug"] * out["z_t_aug"]).sum(1)) ** 2).mean()
    assert g.item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_pretrain_config_rejects_unknown_regularizer():
    with pytest.raises(ValueError, match="regularizer"):
        aw.PretrainConfig(regularizer="cyclip")
    with pytest.raises(ValueError):
        aw.run_method(None, "codis", 0)


# ------------------------------------------------------------------------------------------------ downstream
@pytest.fixture(scope="module")
def pretrained(tasks):
    model = aw.build_albef(tasks, "tiny", seed=1)
    aw.pretrain(model, tasks, aw.PretrainConfig(**PRE, seed=1))
    return model


@pytest.mark.parametrize("name", ["vqa", "nlvr", "ve"])
def test_finetune_heads_run_two_steps_and_select_on_val(tasks, pretrained, name):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    fn = {"vqa": aw.finetune_vqa, "nlvr": aw.finetune_nlvr, "ve": aw.finetune_ve}[name]
    res = fn(pretrained, tasks, aw.FinetuneConfig(**FT, seed=0))
    assert res["steps"] == 2 and res["best_step"] in (1, 2) and len(res["val_curve"]) == 2
    assert res["val_acc"] == max(a for _, a in res["val_curve"])
    assert res["test_n"] == len(getattr(tasks, name)["test"])
    _in01({k: res[k] for k in ("val_acc", "test_acc")})
    # fine-tuning works on a copy: the pre-trained model is unchanged
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())


def test_recall_from_scores_matches_image_text_recall():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 10])  # image 11 has no caption
    txt = F.normalize(img[t2i] + 0.9 * torch.randn(len(t2i), 8, generator=g), dim=-1)
    s = img @ txt.T
    ours = aw.recall_from_scores(s, s, t2i, ks=(1, 5, 10))
    ref = image_text_recall(img, txt, t2i, ks=(1, 5, 10))
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v), k
    # by hand: a perfect score matrix gives recall 1 everywhere
    perfect = (t2i[None, :] == torch.arange(12)[:, None]).float()
    assert all(v == 1.0 for v in aw.recall_from_scores(perfect, perfect, t2i).values())


def test_retrieval_and_geometry_keys(tasks, pretrained):
    r = aw.evaluate_retrieval(pretrained, tasks, "test", k_rerank=4)
    keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["mean_recall"]
    assert set(r) == set(keys) | {f"itc_{k}" for k in keys}
    _in01(r)
    geo = aw.modality_geometry(pretrained, tasks, "test", n_points=10)
    assert geo["gap"] >= 0 and -1 <= geo["matched_cos"] <= 1 and 0 <= geo["pca_explained"] <= 1 + 1e-9
    assert len(geo["pca"]["image"]) == len(geo["pca"]["text"]) == 10 and len(geo["pca"]["image"][0]) == 2


def test_run_method_returns_a_json_ready_dict(tasks):
    res = aw.run_method(tasks, "gc", 0, model={"preset": "tiny"}, pretrain_cfg=PRE, finetune_cfg=FT,
                        reg_weights={"gc": 0.1}, k_rerank=4, n_pca=5)
    res = json.loads(json.dumps(res))
    assert res["regularizer"] == "gc" and res["reg_weight"] == 0.1 and res["pretrain"]["steps"] == 3
    for task in aw.TASKS:
        _in01({"val_acc": res[task]["val_acc"], "test_acc": res[task]["test_acc"]})
    _in01({k: v for k, v in res["retrieval"].items()})
    with pytest.raises(TypeError, match="unknown PretrainConfig"):
        aw.run_method(tasks, "albef", 0, pretrain_cfg={"stepz": 1})


class _FakeRun:
    def __init__(self):
        self.store, self.computed = {}, []

    def cached(self, key, fn):
        if key not in self.store:
            self.store[key] = fn()
            self.computed.append(key)
        return self.store[key]


def _square(x):
    return {"y": x * x}


def test_run_cached_parallel_resumes():
    run = _FakeRun()
    run.store["a"] = {"y": -1}
    out = aw.run_cached_parallel(run, {"a": (_square, (2,), {}), "b": (_square, (3,), {})}, workers=1)
    assert out == {"a": {"y": -1}, "b": {"y": 9}} and run.computed == ["b"]


# ------------------------------------------------------------------------------------------------ paper data path
def test_paper_data_missing_raises_naming_data_root_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    for fn in (aw.check_paper_data, aw.benchmark_tasks):
        with pytest.raises(DatasetNotFoundError) as ei:
            fn()
        msg = str(ei.value)
        assert f"DATA_ROOT={tmp_path}" in msg and str(tmp_path / "albef_4m" / "train.tsv") in msg
        for part in ("albef_4m/train.tsv", "v2_OpenEnded_mscoco", "nlvr2/", "snli_ve_", "dataset_coco.json"):
            assert part in msg, part


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)


def _make_paper_tree(root):
    """Every file of PAPER_DATA_LAYOUT, a few items each, in the released formats."""
    (root / "albef_4m").mkdir(parents=True)
    rows = ["filepath\ttitle"]
    for i in range(12):
        _png(root / "albef_4m" / "images" / f"{i:06d}.jpg", 10 * i)
        rows.append(f"images/{i:06d}.jpg\ta {'red' if i % 2 else 'blue'} thing number {i % 3}")
    (root / "albef_4m" / "train.tsv").write_text("\n".join(rows) + "\n")
    for split in ("train2014", "val2014"):
        qs, anns = [], []
        for i in range(10):
            _png(root / "coco" / split / f"COCO_{split}_{i:012d}.jpg", 20 + i)
            ans = "yes" if i % 2 else "no"
            qs.append({"image_id": i, "question": f"is it red {i}?", "question_id": 100 + i})
            anns.append({"question_id": 100 + i, "image_id": i, "multiple_choice_answer": ans, "answer_type": "yes/no",
                         "answers": [{"answer": ans, "answer_confidence": "yes", "answer_id": k} for k in range(10)]})
        (root / "vqav2").mkdir(exist_ok=True)
        (root / "vqav2" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": qs}))
        (root / "vqav2" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    karpathy = {"images": [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": "test",
                            "sentences": [{"raw": f"a red thing {i}"}, {"raw": f"a blue thing {i}"}]}
                           for i in range(4)]}
    (root / "karpathy").mkdir()
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps(karpathy))
    flickr = [f"{1000 + i}" for i in range(10)]
    for f in flickr:
        _png(root / "flickr30k" / "flickr30k-images" / f"{f}.jpg", 60)
    (root / "karpathy" / "dataset_flickr30k.json").write_text(json.dumps(
        {"images": [{"filename": f"{f}.jpg", "split": "test", "sentences": [{"raw": "a thing"}]} for f in flickr[:3]]}))
    (root / "snli_ve").mkdir()
    for split in ("train", "dev", "test"):
        rows = [{"Flickr30K_ID": flickr[i], "sentence2": f"there is a thing {i}",
                 "gold_label": ("entailment", "neutral", "contradiction")[i % 3]} for i in range(10)]
        (root / "snli_ve" / f"snli_ve_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "nlvr2").mkdir()
    for split in ("train", "dev", "test1"):
        rows = []
        for i in range(10):
            ident = f"{split}-{i}-0-0"
            rows.append({"identifier": ident, "sentence": f"both images show a thing {i}",
                         "label": "True" if i % 2 else "False"})
            for k in (0, 1):
                _png(root / "nlvr2" / "images" / split / f"{split}-{i}-0-img{k}.png", 5 * i + k)
        (root / "nlvr2" / f"{split}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_paper_data_path_runs_end_to_end_on_a_fixture_tree(tmp_path):
    _make_paper_tree(tmp_path)
    assert aw.check_paper_data(tmp_path) == tmp_path
    t = aw.benchmark_tasks(tmp_path, img_size=16, val_frac=0.2, min_word_freq=1, check_files=True)
    assert len(t.pretrain_texts) == 12 and set(t.retrieval) == {"coco_test", "flickr30k_test"}
    assert len(t.retrieval["coco_test"][1]) == 8 and t.retrieval["coco_test"][2].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(t.answer_vocab) == {"yes", "no"} and len(t.vqa["train"]) == 8 and len(t.vqa["val"]) == 2
    assert set(t.nlvr) == {"train", "val", "dev", "test1"} and set(t.ve) == {"train", "val", "dev", "test"}
    x = t.bank.get(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    v = t.bank.get(torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert torch.equal(v[0], v[1])  # a view is deterministic
    res = aw.run_method(t, "separation", 0, model={"preset": "tiny"},
                        pretrain_cfg=dict(steps=2, batch_size=4, warmup_steps=0, device="cpu"),
                        finetune_cfg=dict(steps=2, batch_size=4, eval_every=1, warmup_steps=0, device="cpu"),
                        k_rerank=2, n_pca=3)
    assert {"retrieval_coco_test", "retrieval_flickr30k_test"} <= set(res)
    assert res["vqa"]["val2014_n"] == 10 and 0 <= res["vqa"]["val2014_vqa_score"] <= 1
    assert "dev_acc" in res["nlvr"] and "test1_acc" in res["nlvr"] and "test_acc" in res["ve"]


def test_run_cached_parallel_in_worker_processes():
    run = _FakeRun()  # a stdlib job function keeps the spawned workers from importing torch
    out = aw.run_cached_parallel(run, {k: (operator.mul, (k, k), {}) for k in (2, 3, 4)}, workers=2)
    assert out == {2: 4, 3: 9, 4: 16} and sorted(run.computed) == [2, 3, 4]
