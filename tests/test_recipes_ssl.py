"""Recipes of notebook 02: self-supervised two-view training (contrastive_repro.recipes.ssl) and the CLIP two-tower
with the conventional / decomposable loss (contrastive_repro.recipes.clip_dcl). A few steps of each loss, finite
curves, result keys, the loss state in checkpoints, the batch-size analysis by hand, and the paper-profile data
paths under DATA_ROOT (a clear DatasetNotFoundError when empty; a tiny tree in the real formats runs end to end)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from contrastive_repro.data import DatasetNotFoundError
from contrastive_repro.recipes import clip_dcl, ssl
from contrastive_repro.training import latest_checkpoint, load_checkpoint

try:
    from fixtures import data_trees as ft
except ImportError:  # tests/ imported as a package
    from tests.fixtures import data_trees as ft

SSL_KEYS = {"loss", "batch_size", "knn", "linear_probe", "probe_C", "probe_val_accuracy", "curve", "final_loss",
            "final_conventional", "steps", "epochs", "lr", "n_train", "n_test", "train_seconds", "seconds", "config"}
CLIP_KEYS = {"loss", "zeroshot", "fewshot", "retrieval", "chance", "curve", "final_loss", "final_conventional",
             "logit_scale", "steps", "epochs", "vocab_size", "params", "n_train", "train_seconds", "seconds",
             "config"}


# ------------------------------------------------------------------------------------------------------- SSL
def _ssl_data(n_train=48, n_test=24, size=16, seed=0) -> ssl.SSLData:
    """Grayscale images whose brightness pattern depends on the class (4 classes)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % 4
        x = (torch.rand(n, 1, size, size, generator=g) * 120 + y.view(-1, 1, 1, 1) * 30).to(torch.uint8)
        return x, y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return ssl.SSLData("toy", xtr, ytr, xte, yte, channels=1, image_size=size, mean=(0.5,), std=(0.25,),
                       info={"n_train": n_train, "n_test": n_test, "classes": 4})


def _ssl_cfg(**kw) -> ssl.SSLConfig:
    base = dict(batch_size=8, steps=3, width=4, num_blocks=2, proj_dim=8, probe_Cs=(0.1, 1.0), knn_k=5,
                aug={"scale": (0.6, 1.0)}, device="cpu", probe_max_iter=100)
    base.update(kw)
    return ssl.SSLConfig(**base)


@pytest.mark.parametrize("loss,form", [("infonce", "symmetric"), ("infonce", "ntxent"), ("decomposable", "symmetric")])
def test_ssl_each_loss_trains_a_few_finite_steps(loss, form):
    data = _ssl_data()
    ssl.make_view_bank(data, n_views=3, seed=0)
    res = ssl.train_ssl(data, _ssl_cfg(loss=loss, infonce_form=form))
    assert SSL_KEYS <= set(res)
    assert res["steps"] == 3 and len(res["curve"]) == 3
    for rec in res["curve"]:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["conventional"])
    assert 0.0 <= res["knn"] <= 1.0 and 0.0 <= res["linear_probe"] <= 1.0
    assert res["probe_C"] in (0.1, 1.0)            # chosen on the training split's validation part
    assert res["n_train"] == 48 and res["n_test"] == 24
    if loss == "decomposable":
        assert 0.0 < res["dcl_state"]["seen_fraction"] <= 1.0
        assert math.isfinite(res["dcl_state"]["mean_log_z"])


def test_ssl_online_views_and_epoch_budget():
    data = _ssl_data(n_train=40)
    res = ssl.train_ssl(data, _ssl_cfg(loss="decomposable", steps=0, epochs=1.0, batch_size=16, view_mode="online"))
    assert res["steps"] == 40 // 16                 # one epoch, incomplete batch dropped
    assert res["epochs"] == pytest.approx(2 * 16 / 40)
    assert all(math.isfinite(r["loss"]) for r in res["curve"])


def test_ssl_lr_scaling_and_steps():
    assert ssl.scaled_lr(ssl.SSLConfig(lr=1e-3, batch_size=64, lr_ref_batch=256, lr_scaling="sqrt")) == \
        pytest.approx(5e-4)
    assert ssl.scaled_lr(ssl.SSLConfig(lr=1e-3, batch_size=64, lr_ref_batch=256, lr_scaling="linear")) == \
        pytest.approx(2.5e-4)
    assert ssl.scaled_lr(ssl.SSLConfig(lr=1e-3, batch_size=64, lr_scaling="none")) == pytest.approx(1e-3)
    assert ssl.num_steps(ssl.SSLConfig(batch_size=32, epochs=2.0), 100) == 6     # 3 full batches x 2 epochs
    assert ssl.num_steps(ssl.SSLConfig(batch_size=32, steps=7), 100) == 7
    with pytest.raises(ValueError):
        ssl.SSLConfig(loss="triplet")
    with pytest.raises(ValueError):
        ssl.num_steps(ssl.SSLConfig(batch_size=256), 100)


def test_ssl_checkpoint_holds_the_decomposable_state(tmp_path):
    data = _ssl_data()
    ssl.make_view_bank(data, n_views=2, seed=0)
    cfg = _ssl_cfg(loss="decomposable", steps=2)
    ssl.train_ssl(data, cfg, ckpt_dir=tmp_path)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / cfg.fingerprint()))
    state = ckpt["extra"]["loss"]
    assert state["log_z"].shape == (2, 48)          # symmetric: one row per direction
    assert int((state["last_update"] >= 0).sum()) == 2 * 2 * 8   # 2 steps x 8 anchors x 2 directions
    # a finished run resumes instantly from its checkpoint with the same result
    again = ssl.train_ssl(data, cfg, ckpt_dir=tmp_path)
    assert again["steps"] == 2


def test_batch_to_reach_by_hand():
    r = ssl.batch_to_reach([32, 64, 128, 256], [0.5, 0.6, 0.7, 0.8], 0.65)
    assert r["grid"] == 128 and not r["at_smallest"]
    assert r["interpolated"] == pytest.approx(2 ** 6.5)      # halfway between log2 64 and log2 128
    r = ssl.batch_to_reach([256, 32], [0.8, 0.9], 0.8)          # unsorted input, reached at the smallest
    assert r == {"grid": 32, "interpolated": 32.0, "at_smallest": True}
    assert ssl.batch_to_reach([32, 64], [0.1, 0.2], 0.5)["interpolated"] is None


def test_ssl_image_folder_missing_names_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        ssl.load_ssl_data("image_folder")
    msg = str(e.value)
    assert str(tmp_path) in msg and "DATA_ROOT" in msg and "imagenet/train" in msg
    with pytest.raises(DatasetNotFoundError, match="DATA_ROOT"):
        ssl.load_ssl_data("image_folder", root=tmp_path / "elsewhere")


def test_ssl_image_folder_path_runs(tmp_path):
    ft.make_image_folder(tmp_path / "imagenet" / "train", per_class=4)
    ft.make_image_folder(tmp_path / "imagenet" / "val", per_class=2)
    data = ssl.load_ssl_data("image_folder", root=tmp_path, image_size=16)
    assert data.channels == 3 and len(data.train) == 12 and len(data.test) == 6
    res = ssl.train_ssl(data, _ssl_cfg(loss="decomposable", view_mode="online", steps=2, batch_size=4,
                                       probe_Cs=(1.0,), knn_k=3))
    assert res["steps"] == 2 and all(math.isfinite(r["loss"]) for r in res["curve"])


# ------------------------------------------------------------------------------------------------------ CLIP
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star"]


def _clip_data(n_per=3, size=32, seed=0) -> clip_dcl.CLIPData:
    """Coloured noise images captioned "<colour> <shape> k"; classes = colours (zero-shot / probes)."""
    g = torch.Generator().manual_seed(seed)
    imgs, caps, labels = [], [], []
    for ci, c in enumerate(COLORS):
        for si, s in enumerate(SHAPES):
            for k in range(n_per):
                x = torch.rand(3, size, size, generator=g) * 60
                x[ci % 3] += 150
                imgs.append(x.to(torch.uint8))
                caps.append(f"a {c} {s} number {k}")
                labels.append(ci)
    imgs, labels = torch.stack(imgs), torch.tensor(labels)
    te = torch.arange(len(imgs)) % 3 == 0
    zs = {"colour": clip_dcl.ZeroShotSet(imgs[te], labels[te], COLORS, ("{}", "a {} thing")),
          "colour_ens": clip_dcl.ZeroShotSet(imgs[te], labels[te], COLORS, ("{}",),
                                             class_prompts=[[f"a {c} {s}" for s in SHAPES] for c in COLORS])}
    probes = {"colour": clip_dcl.ProbeSet(imgs[~te], labels[~te], imgs[te], labels[te])}
    return clip_dcl.CLIPData("toy", clip_dcl.TensorPairs(imgs[~te], [c for c, t in zip(caps, te) if not t]), zs,
                             probes, clip_dcl.TensorPairs(imgs[te], [c for c, t in zip(caps, te) if t]))


def _clip_cfg(**kw) -> clip_dcl.CLIPDCLConfig:
    base = dict(preset="tiny", batch_size=8, steps=3, shots=(1, 2), few_shot_draws=2, ks=(1, 5), device="cpu")
    base.update(kw)
    return clip_dcl.CLIPDCLConfig(**base)


@pytest.mark.parametrize("loss", clip_dcl.LOSSES)
@pytest.mark.parametrize("learn_temperature", [True, False])
def test_clip_each_loss_trains_a_few_finite_steps(loss, learn_temperature):
    data = _clip_data()
    res = clip_dcl.run_clip_dcl(data, _clip_cfg(loss=loss, learn_temperature=learn_temperature))
    assert CLIP_KEYS <= set(res)
    assert res["steps"] == 3 and len(res["curve"]) == 3
    for rec in res["curve"]:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["conventional"])
    assert set(res["zeroshot"]) == {"colour", "colour_ens"}
    for v in res["zeroshot"].values():
        assert 0.0 <= v["top1"] <= v["top5"] <= 1.0
    assert {"1", "1_std", "1_classes", "1_chance", "2", "2_std"} <= set(res["fewshot"]["colour"])
    assert res["fewshot"]["colour"]["1_classes"] == 4
    assert {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mean_recall"} <= set(res["retrieval"])
    assert res["chance"]["zeroshot/colour/uniform_top1"] == pytest.approx(0.25)
    assert res["vocab_size"] < 100                 # compact vocabulary
    if not learn_temperature:
        assert res["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_clip_checkpoint_holds_the_decomposable_state(tmp_path):
    data = _clip_data()
    cfg = _clip_cfg(loss="decomposable", steps=2)
    clip_dcl.train_clip_dcl(data, cfg, ckpt_dir=tmp_path)
    state = load_checkpoint(latest_checkpoint(tmp_path / cfg.fingerprint()))["extra"]["loss"]
    assert state["log_z"].shape == (2, len(data.train))
    assert int((state["last_update"] >= 0).sum()) == 2 * 2 * 8


def test_compact_tokenizer_keeps_eot_largest():
    texts = ["a red circle", "grinning face with big eyes"]
    full, small = clip_dcl.CompactTokenizer(16), clip_dcl.CompactTokenizer(16, texts)
    a, b = full(texts), small(texts)
    assert a.shape == b.shape == (2, 16)
    assert torch.equal(a != 0, b != 0)                               # same positions, same padding
    assert torch.equal(b.argmax(1), a.argmax(1))                     # end-of-text still the argmax
    assert int(b.max()) == small.vocab_size - 1
    assert int(small(["unseenword"])[0, 1]) == 1                     # unknown id


def test_random_resized_crop_shapes():
    x = torch.rand(5, 3, 16, 16)
    assert torch.equal(clip_dcl.random_resized_crop(x, scale=(1.0, 1.0)), x)
    y = clip_dcl.random_resized_crop(x, torch.Generator().manual_seed(0), scale=(0.5, 0.9))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_clip_paper_data_missing_names_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        clip_dcl.load_paper_data()
    msg = str(e.value)
    assert str(tmp_path) in msg and "DATA_ROOT" in msg and "cc3m/train.tsv" in msg
    # tables present, CIFAR absent: the zero-shot sets are named
    (tmp_path / "cc3m").mkdir()
    for name in ("train.tsv", "val.tsv"):
        (tmp_path / "cc3m" / name).write_text("filepath\ttitle\n")
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py") as e:
        clip_dcl.load_clip_data("paper")
    assert "DATA_ROOT" in str(e.value)


def test_clip_paper_data_path_runs(tmp_path):
    table, _ = ft.make_image_text(tmp_path / "cc3m")
    shutil.copy(table, tmp_path / "cc3m" / "train.tsv")
    shutil.copy(table, tmp_path / "cc3m" / "val.tsv")
    ft.make_cifar(tmp_path, "cifar10")
    ft.make_cifar(tmp_path, "cifar100")
    data = clip_dcl.load_paper_data(tmp_path, image_size=32, n_probe_train=20)
    assert set(data.zeroshot) == {"cifar10", "cifar100"} and len(data.train) == 4
    res = clip_dcl.run_clip_dcl(data, _clip_cfg(loss="decomposable", batch_size=2, steps=2, shots=(1,)))
    assert res["steps"] == 2 and len(res["zeroshot"]["cifar100"]) == 2
    assert 0.0 <= res["retrieval"]["i2t_R@1"] <= 1.0


def test_ssl_epochs_are_seekable_for_exact_resume():
    """make_epoch(epoch, offset) yields exactly the tail of make_epoch(epoch): a resumed run sees the same views."""
    data = _ssl_data()
    ssl.make_view_bank(data, n_views=3, seed=0)
    make_epoch = ssl._bank_epoch(data, _ssl_cfg())
    full, tail = list(make_epoch(1)), list(make_epoch(1, 2))
    assert len(tail) == len(full) - 2
    for (a1, b1, i1), (a2, b2, i2) in zip(full[2:], tail):
        assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(i1, i2)
    assert not torch.equal(full[0][0], full[0][1])          # two different views of each image
